"""Contrastive search (docs/strategies.md#contrastive_search): property tests 9.2 (a) and (c) on the scripted fake model (exact) and on
the embedded model, the ranking against a from-scratch recomputation, and the one-forward-per-token structure.
The golden test against transformers 4.x is in test_contrastive_search_golden.py."""

import threading

import pytest
import torch

from declab.core.errors import UserError
from tests.fake import DEFAULT_VOCAB, FakeLM, hashed_logits
from declab.run import Run, RunRequest
from declab.core import get_strategy
from strategies.contrastive_search import contrastive_steps


def run(lm, strategy="contrastive_search", prompt=" the cat", n=30, seed=0, model=None, fmt=None, **params):
    return Run(lm, RunRequest(model=model or lm.key, strategy=strategy, prompt=prompt, params=params,
                              max_new_tokens=n, seed=seed, prompt_format=fmt)).run_to_end()


@pytest.fixture(autouse=True)
def _fake_registry(fake_registry):
    yield


def no_eos_lm(**kw) -> FakeLM:
    """The default scripted model with EOS made very unlikely, so runs go to their limit."""
    base = hashed_logits(len(DEFAULT_VOCAB))

    def fn(ctx):
        logits = base(ctx).clone()
        logits[0] = -30.0
        return logits
    return FakeLM(fn, **kw)


def test_alpha_zero_or_k_one_is_greedy(fake_lm):
    """9.2 (a)."""
    for prompt in (" the cat", " a dog ran", " it was very"):
        greedy = run(fake_lm, "greedy", prompt, n=40).sequences[0].token_ids
        assert run(fake_lm, prompt=prompt, n=40, penalty_alpha=0.0, top_k=6).sequences[0].token_ids == greedy
        assert run(fake_lm, prompt=prompt, n=40, penalty_alpha=0.6, top_k=1).sequences[0].token_ids == greedy
    # and the default (alpha 0.6, k 4) does re-rank on this model, so the two checks above are not vacuous
    assert run(fake_lm, n=40).sequences[0].token_ids != run(fake_lm, "greedy", n=40).sequences[0].token_ids


def test_next_step_logits_equal_a_fresh_forward_on_the_fake_model():
    """9.2 (c), exact: the look-ahead row kept for the chosen token (forked then selected cache) carries the same
    logits as a forward over prompt + chosen tokens."""
    lm = no_eos_lm()
    prompt = lm.encode_prompt(" the cat sat", "raw")
    chosen = []
    for st in contrastive_steps(lm, prompt, 0.6, 5, 40):
        assert torch.equal(st.logits, lm.logits_fn(prompt + chosen).float())
        chosen.append(st.token)
    assert len(chosen) == 40 and len(set(chosen)) > 5


def test_one_k_row_forward_per_token():
    lm = no_eos_lm()
    calls = []
    prefill, step = lm.prefill, lm.step

    def spy_prefill(ids, hidden=False, **kw):
        calls.append(("prefill", tuple(lm.as_ids(ids).shape), hidden))
        return prefill(ids, hidden=hidden, **kw)

    def spy_step(ids, cache, hidden=False, **kw):
        calls.append(("step", tuple(lm.as_ids(ids).shape), hidden))
        return step(ids, cache, hidden=hidden, **kw)
    lm.prefill, lm.step = spy_prefill, spy_step
    res = run(lm, n=12, top_k=3)
    steps = int((res.frame.kind == "token").sum())
    assert steps == 12 and lm.forwards == 1 + steps
    assert calls[0][0] == "prefill" and calls[0][1][0] == 1 and calls[0][2]      # prefill, with hidden states
    assert calls[1:] == [("step", (3, 1), True)] * steps     # then exactly one [k, 1] look-ahead per token


def test_ranking_matches_a_from_scratch_recomputation():
    """Every step: candidates = top-k by p; degeneration penalty = max cosine between the candidate's last-layer
    state and every context state (prompt included; on the fake model h is a fixed embedding of the token id);
    context_pos is that argmax; score = (1-a) p - a penalty; the chosen token is the first maximum."""
    alpha, k = 0.5, 5
    prompt = " the cat sat on the mat"
    fake_lm = no_eos_lm()
    res = run(fake_lm, prompt=prompt, n=40, penalty_alpha=alpha, top_k=k)
    df = res.frame
    context = fake_lm.encode_prompt(prompt, "raw")
    E = torch.nn.functional.normalize(fake_lm.embed, dim=-1)
    overrides = 0
    for _, row in df[df.kind == "token"].iterrows():
        cands = df[(df.kind == "candidate") & (df.step == row.step)].sort_values("rank")
        p = torch.softmax(fake_lm.logits_fn(context), -1)
        top = torch.topk(p, k)
        assert cands.token_id.tolist() == top.indices.tolist()
        assert cands.p.to_numpy() == pytest.approx(top.values.numpy(), abs=1e-6)
        cos = E[top.indices] @ E[context].T                                  # [k, len(context)]
        assert cands.degeneration_penalty.to_numpy() == pytest.approx(cos.max(-1).values.numpy(), abs=1e-5)
        for (_, c), crow in zip(cands.iterrows(), cos):
            assert crow[int(c.context_pos)] == pytest.approx(float(crow.max()), abs=1e-6)
        score = (1 - alpha) * cands.p.to_numpy() - alpha * cands.degeneration_penalty.to_numpy()
        assert cands.score.to_numpy() == pytest.approx(score, abs=1e-6)
        best = int(score.argmax())
        assert row.token_id == cands.token_id.iloc[best] and row["rank"] == best
        assert row.overridden == (best != 0) and cands.accepted.sum() == 1
        assert row.degeneration_penalty == pytest.approx(cands.degeneration_penalty.iloc[best])
        overrides += bool(row.overridden)
        context.append(int(row.token_id))
    assert overrides > 0 and len(context) == len(fake_lm.encode_prompt(prompt, "raw")) + 40


def test_a_token_already_in_the_context_pays_the_full_penalty():
    """Script: ' cat' is always the top-1 by a small margin over four runners-up. Greedy repeats it; contrastive
    search sees cos(h_v, h_v) = 1 for any candidate already in the context (the fake model's h is a fixed embedding
    of the id), so in five steps it uses each of the five candidates exactly once."""
    def fn(ctx):
        logits = torch.zeros(32)
        logits[2] = 2.0                   # ' cat'
        logits[5:9] = 1.8                 # four runners-up
        return logits
    lm = FakeLM(fn)
    assert run(lm, "greedy", " the", n=5).sequences[0].token_ids == [2] * 5
    res = run(lm, prompt=" the", n=5, penalty_alpha=0.6, top_k=5)
    assert sorted(res.sequences[0].token_ids) == [2, 5, 6, 7, 8]
    tok = res.frame[res.frame.kind == "token"]
    cand = res.frame[res.frame.kind == "candidate"]
    assert tok.overridden.sum() >= 4
    # every candidate already in the context was penalised by exactly 1 (cosine with itself)
    seen = {1}
    for step in range(5):
        rows = cand[cand.step == step]
        for _, c in rows[rows.token_id.isin(seen)].iterrows():
            assert c.degeneration_penalty == pytest.approx(1.0, abs=1e-6)
        seen.add(int(tok[tok.step == step].token_id.iloc[0]))


def test_eos_and_stop():
    lm = FakeLM(lambda ctx: torch.tensor([5.0 if len(ctx) > 4 else -5.0] + [0.0] * 31))
    res = run(lm, prompt=" the cat", n=30, penalty_alpha=0.0)
    assert res.status == "ok" and len(res.sequences[0].token_ids) == 3      # EOS at the 4th step, excluded
    assert res.frame[res.frame.kind == "token"].token_id.iloc[-1] == 0
    lm = no_eos_lm(delay_s=0.01)
    r = Run(lm, RunRequest(model="fake", strategy="contrastive_search", prompt=" the", max_new_tokens=500))
    for ev in r.events():
        if ev.step == 3:
            r.stop.set()
    assert r.result.status == "stopped" and len(r.result.sequences[0].token_ids) == 4


def test_parameters_and_validation(fake_lm):
    params = {p["name"]: p for p in get_strategy("contrastive_search").params()}
    assert params["penalty_alpha"]["default"] == 0.6 and params["top_k"]["default"] == 4
    with pytest.raises(UserError, match=r"penalty_alpha must be in \[0.0, 1.0\]"):
        run(fake_lm, n=2, penalty_alpha=1.5)
    with pytest.raises(UserError, match=r"top_k must be in \[1, 64\]"):
        run(fake_lm, n=2, top_k=0)
    assert len(run(FakeLM(), n=4, top_k=64).sequences[0].token_ids) >= 1    # k above the 32-token vocabulary


# ------------------------------------------------------------------------------------------------ real model
@pytest.mark.model
def test_next_step_logits_equal_a_fresh_forward_on_the_embedded_model(real_lm):
    """9.2 (c) in fp32: the chosen row of the batched look-ahead equals a fresh single-row forward of the whole
    prefix up to float rounding (measured here: at most ~4e-5 on logits of magnitude ~10-30)."""
    prompt = real_lm.encode_prompt("The history of the printing press begins", "raw")
    chosen = []
    for st in contrastive_steps(real_lm, prompt, 0.6, 4, 6):
        fresh = real_lm.prefill(prompt + chosen).logits[0]
        assert float((fresh - st.logits).abs().max()) < 1e-4
        assert float((fresh.softmax(-1) - st.logits.softmax(-1)).abs().max()) < 1e-5
        assert int(fresh.argmax()) == int(st.logits.argmax())
        chosen.append(st.token)
    assert len(chosen) == 6


def test_stop_event_is_honoured_inside_the_search():
    lm = no_eos_lm()
    stop = threading.Event()
    out = []
    for st in contrastive_steps(lm, [1, 2], 0.6, 4, 100, stop):
        out.append(st.token)
        if len(out) == 3:
            stop.set()
    assert len(out) == 3


# ------------------------------------------------------------------------------------------------ mechanism view
def test_mechanism_figure_plots_every_candidate_and_the_overrides():
    from viz.contrastive_search import contrastive_search_figure
    from viz.figures import figures_for
    from viz.mechanism import applicable

    res = run(no_eos_lm(), n=20, penalty_alpha=0.5, top_k=4)
    assert [name for name, _ in applicable(res.frame)] == ["contrastive_search"]
    fig = contrastive_search_figure(res.frame, res.meta)
    by_name = {t.name: t for t in fig.data}
    n_cand = sum(len(by_name[n].x) for n in ("other candidates", "model's top-1, not chosen", "chosen")
                 if n in by_name)
    assert n_cand == 20 * 4 and len(by_name["chosen"].x) == 20
    tok = res.frame[res.frame.kind == "token"]
    over = next(t for t in fig.data if (t.name or "").startswith("top-1 overridden"))
    assert len(over.x) == int(tok.overridden.sum()) > 0
    assert len(by_name["model's top-1, not chosen"].x) == int(tok.overridden.sum())
    assert any((t.name or "").startswith("iso-score") for t in fig.data)        # alpha read from the params
    assert "Contrastive search" in figures_for(res.frame, res.meta)
    assert "<script>" not in fig.to_json()
    greedy = run(no_eos_lm(), "greedy", n=3)
    assert contrastive_search_figure(greedy.frame, greedy.meta) is None
