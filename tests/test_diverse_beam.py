"""beam and diverse_beam on the scripted fake model: properties of docs/strategies.md#diverse_beam, an unvectorised no-cache
reference of HF 4.x group beam search, the pitfalls, the trace and the config limits."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch

from declab.cli import main
from declab.core.errors import UserError
from tests.fake import FakeLM, hashed_logits
from declab.run import Run, RunRequest
from declab.core import get_strategy
from viz.common import chosen_path
from viz.figures import figures_for
from viz.mechanism import mechanism_figures


@pytest.fixture(autouse=True)
def _fake_registry(fake_registry):
    yield


def run(lm, strategy="diverse_beam", prompt=" the cat", n=12, **params):
    return Run(lm, RunRequest(model=lm.key, strategy=strategy, prompt=prompt, params=params, max_new_tokens=n,
                              seed=0)).run_to_end()


def rows(res, kind):
    return res.frame[res.frame.kind == kind]


# ------------------------------------------------------------------------------------------------ reference
def reference(lm, prompt_ids, n, B, G, lam, alpha=1.0, early=False, n_return=None):
    """HF 4.36-4.56 group beam search written from docs/strategies.md#diverse_beam with plain loops and no cache: every beam's
    logits come from logits_fn(full context). Returns [(token_ids, float32 score)], best first."""
    S, P, V = B // G, len(prompt_ids), lm.vocab_size
    eos, pad = sorted(lm.eos_ids), min(lm.eos_ids)
    K = max(2, 1 + len(eos)) * S
    beams = [list(prompt_ids) for _ in range(B)]
    scores = torch.full((B,), -1e9)
    scores[::S] = 0.0
    hyps = [[] for _ in range(G)]          # [(score, ids)] in insertion order
    worst = [1e9] * G
    done = [False] * G
    for step in range(n):
        cur = [0] * B
        new_beams, new_scores = [None] * B, scores.clone()
        for g in range(G):
            if done[g]:
                for i in range(S):
                    new_beams[g * S + i], cur[g * S + i], new_scores[g * S + i] = beams[g * S] + [pad], pad, 0.0
                continue
            count = Counter(cur[: g * S])
            cand = []
            for i in range(S):
                lp = torch.log_softmax(lm.logits_fn(beams[g * S + i]).float(), -1)
                pen = lam * torch.tensor([count[v] for v in range(V)]) if g and lam else 0.0   # as HF: λ * counts
                cand.append(lp - pen + scores[g * S + i])
            top_s, top_i = torch.topk(torch.stack(cand).view(1, -1), K, dim=1, largest=True, sorted=True)
            kept = []
            for r, (s, idx) in enumerate(zip(top_s[0].tolist(), top_i[0].tolist())):
                parent, tok = g * S + idx // V, idx % V
                if tok in eos:
                    if r >= S:
                        continue
                    h = (s / (step + 1) ** alpha, beams[parent][P:])
                    if len(hyps[g]) < S or h[0] > worst[g]:
                        hyps[g].append(h)
                        if len(hyps[g]) > S:
                            order = sorted((x[0], j) for j, x in enumerate(hyps[g]))
                            del hyps[g][order[0][1]]
                            worst[g] = order[1][0]
                        else:
                            worst[g] = min(h[0], worst[g])
                else:
                    kept.append((parent, tok, top_s[0][r]))
                if len(kept) == S:
                    break
            if len(hyps[g]) == S:
                best = top_s[0, 0].item()
                length = (n + P if early == "never" and alpha > 0 else P + step + 1) - P
                done[g] = done[g] or early is True or worst[g] >= best / length ** alpha
            for i, (parent, tok, s) in enumerate(kept):
                new_beams[g * S + i], cur[g * S + i], new_scores[g * S + i] = beams[parent] + [tok], tok, s
        beams, scores = new_beams, new_scores
        if all(done):
            break
    for g in range(G):
        if done[g]:
            continue
        for i in range(S):
            s = scores[g * S + i].item() / (len(beams[g * S + i]) - P) ** alpha
            ids = beams[g * S + i][P:]
            if len(hyps[g]) < S or s > worst[g]:
                hyps[g].append((s, ids))
                if len(hyps[g]) > S:
                    order = sorted((x[0], j) for j, x in enumerate(hyps[g]))
                    del hyps[g][order[0][1]]
                    worst[g] = order[1][0]
                else:
                    worst[g] = min(s, worst[g])
    pooled = sorted([h for lst in hyps for h in lst], key=lambda h: h[0])
    return [(ids, float(torch.tensor(s, dtype=torch.float32))) for s, ids in
            (pooled.pop() for _ in range(n_return or B))]


def eos_prone(seed: int):
    """Hashed logits with EOS made likely, so hypotheses finish, groups close and pads enter the counts."""
    base = hashed_logits(32)

    def fn(ctx):
        x = base(ctx).clone()
        x[0] += 2.5 + (seed % 3)
        return x
    return fn


CASES = [dict(B=4, G=1, lam=0.0), dict(B=4, G=2, lam=1.0), dict(B=6, G=3, lam=0.5), dict(B=8, G=4, lam=2.0),
         dict(B=8, G=2, lam=0.3, alpha=0.0, early="never"), dict(B=4, G=2, lam=1.0, alpha=2.0, early="never"),
         dict(B=6, G=2, lam=1.5, early=True), dict(B=4, G=4, lam=10.0, alpha=-1.0)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("eos_bias", [False, True])
def test_equals_the_unvectorised_no_cache_reference(case, eos_bias):
    lm = FakeLM(eos_prone(case["B"]) if eos_bias else None)
    early = case.get("early", False)
    strategy = "beam" if case["G"] == 1 else "diverse_beam"
    params = dict(num_beams=case["B"], length_penalty=case.get("alpha", 1.0), early_stopping=early)
    if strategy == "diverse_beam":
        params.update(num_beam_groups=case["G"], diversity_penalty=case["lam"])
    res = run(lm, strategy, n=10, **params)
    ref = reference(lm, lm.encode_prompt(" the cat", "raw"), 10, case["B"], case["G"], case["lam"],
                    case.get("alpha", 1.0), early)
    assert [(s.token_ids, s.score) for s in res.sequences] == ref
    if eos_bias:
        assert rows(res, "finish").eos.any()          # the EOS paths were exercised


def test_one_batched_forward_and_one_cache_reorder_per_step(monkeypatch):
    lm = FakeLM()
    calls = []
    select = lm.select
    monkeypatch.setattr(lm, "select", lambda cache, r: calls.append(list(r)) or select(cache, r))
    res = run(lm, n=9, num_beams=8, num_beam_groups=4, diversity_penalty=0.5)
    steps = int(res.frame.step.max()) + 1
    assert steps == 9
    assert lm.forwards == steps                       # prefill (B rows) + one B-row forward per later step
    assert len(calls) == steps - 1 and all(len(c) == 8 for c in calls)


def test_loglik_and_scores_recompute_from_scratch():
    lm = FakeLM(eos_prone(1))
    prompt = lm.encode_prompt(" the cat", "raw")
    res = run(lm, n=10, num_beams=6, num_beam_groups=3, diversity_penalty=0.7)
    for s in res.sequences:
        ctx, ll = list(prompt), 0.0
        for t in s.token_ids + ([0] if s.extra["eos"] else []):
            ll += float(torch.log_softmax(lm.logits_fn(ctx).float(), -1)[t])
            ctx.append(t)
        assert s.extra["loglik"] == pytest.approx(ll, abs=1e-4)               # cache rows follow their beams
        assert s.extra["cum_score"] == pytest.approx(ll - s.extra["penalty"], abs=1e-3)  # penalties included
        assert s.extra["gen_len"] == len(s.token_ids) + s.extra["eos"]
        assert s.score == pytest.approx(s.extra["cum_score"] / s.extra["gen_len"], rel=1e-6)
    assert any(s.extra["penalty"] > 0 for s in res.sequences)


# ------------------------------------------------------------------------------------------------ properties
def test_one_group_equals_beam_search_and_scores_are_log_likelihoods():
    lm = FakeLM(eos_prone(0))
    a = run(lm, "beam", num_beams=4)
    b = run(lm, "diverse_beam", num_beams=4, num_beam_groups=1, diversity_penalty=0.0)
    assert [(s.token_ids, s.score) for s in a.sequences] == [(s.token_ids, s.score) for s in b.sequences]
    assert all(s.extra["penalty"] == 0 and s.extra["cum_score"] == pytest.approx(s.extra["loglik"], abs=1e-4)
               for s in a.sequences)


def test_enough_beams_make_beam_search_exhaustive():
    """V = 3 (EOS + 2 tokens), 3 steps, 16 beams, length_penalty 0, early_stopping never: every path fits in the
    beam, so the returned list is the brute-force ranking of all 15 complete sequences by log-probability."""
    torch.manual_seed(3)
    table = {}

    def fn(ctx):
        key = tuple(ctx[-3:])
        if key not in table:
            table[key] = torch.randn(3) * 2
        return table[key]
    lm = FakeLM(fn, vocab=("</s>", " a", " b"))
    prompt = [1]
    res = run(lm, "beam", prompt=" a", n=3, num_beams=16, length_penalty=0.0, early_stopping="never",
              num_return_sequences=15)

    def logp(seq):
        ctx, total = list(prompt), 0.0
        for t in seq:
            total += float(torch.log_softmax(fn(ctx), -1)[t])
            ctx.append(t)
        return total
    complete = [list(p) + [0] for k in range(3) for p in itertools.product((1, 2), repeat=k)]
    complete += [list(p) for p in itertools.product((1, 2), repeat=3)]
    brute = sorted(complete, key=logp, reverse=True)
    ours = [s.token_ids + ([0] if s.extra["eos"] else []) for s in res.sequences]
    assert ours == brute
    assert [s.score for s in res.sequences] == pytest.approx([logp(c) for c in brute], abs=1e-5)


def test_huge_penalty_with_one_beam_per_group_makes_every_step_distinct():
    lm = FakeLM()
    res = run(lm, n=10, num_beams=8, num_beam_groups=8, diversity_penalty=1e4)
    tokens = rows(res, "token")
    for _, at in tokens.groupby("step"):
        assert at.token_id.is_unique
    assert tokens.collisions.sum() == 0
    tiny = rows(run(lm, n=10, num_beams=8, num_beam_groups=8, diversity_penalty=1e-6), "token")
    assert tiny.collisions.sum() > 0                  # without the penalty the groups do collide


def test_tiny_penalty_makes_every_group_a_width_s_beam_search():
    lm = FakeLM(eos_prone(2))
    narrow = run(lm, "beam", num_beams=2)
    diverse = run(lm, num_beams=6, num_beam_groups=3, diversity_penalty=1e-9)
    by_group = {}
    for s in diverse.sequences:
        by_group.setdefault(s.extra["group"], []).append(s.token_ids)
    assert len(by_group) == 3
    for seqs in by_group.values():
        assert sorted(seqs) == sorted(s.token_ids for s in narrow.sequences)


# ------------------------------------------------------------------------------------------------ pitfalls
def test_penalty_counts_earlier_groups_at_this_step_only_and_spares_group_0():
    lam = 0.75
    res = run(FakeLM(), n=10, num_beams=6, num_beam_groups=3, diversity_penalty=lam)
    tokens, cands = rows(res, "token"), rows(res, "candidate")
    assert (cands[cands.group == 0].penalty == 0).all()
    for (step, g), at in cands.groupby(["step", "group"]):
        earlier = Counter(tokens[(tokens.step == step) & (tokens.group < g)].token_id.tolist())
        assert at.penalty.tolist() == pytest.approx([lam * earlier[t] for t in at.token_id])
        assert at.aug_logprob.tolist() == pytest.approx((at.logprob - at.penalty).tolist())
    assert (tokens.penalty > 0).any()


def test_logprobs_are_the_models_log_softmax_before_the_penalty():
    lm = FakeLM()
    prompt = lm.encode_prompt(" the cat", "raw")
    res = run(lm, n=1, num_beams=4, num_beam_groups=2, diversity_penalty=3.0)
    lp = torch.log_softmax(lm.logits_fn(prompt).float(), -1)
    cands = rows(res, "candidate")
    assert cands.logprob.tolist() == pytest.approx(lp[cands.token_id.tolist()].tolist())


def test_scores_accumulate_with_penalties_along_the_tree():
    res = run(FakeLM(), n=8, num_beams=6, num_beam_groups=2, diversity_penalty=1.0)
    tokens = rows(res, "token")
    prev = {}
    for step, at in tokens.groupby("step"):
        for _, r in at.iterrows():
            base = prev.get(r.parent_id, 0.0) if step else 0.0
            assert r.score == pytest.approx(base + r.logprob - r.penalty, abs=1e-4)
        prev = dict(zip(at.branch_id, at.score))


@pytest.mark.parametrize("eos", [0, 7])
def test_a_done_group_pads_with_eos_which_penalises_eos_for_later_groups(eos):
    """Group 0 finishes at step 1 (EOS after ' cat'); from step 2 its pad (= EOS, as HF sets it when the model has no
    pad) costs group 1 λ on EOS, so group 1 does not end where it otherwise would. eos=7 checks that the pad id, not
    token 0, enters the counts."""
    script = {1: {2: 5.0, 3: 4.0, eos: -5.0}, 2: {eos: 10.0, 5: 3.0}, 3: {4: 5.0, eos: 4.0}, 4: {eos: 10.0, 6: 7.0}}

    def fn(ctx):
        x = torch.zeros(32)
        for t, v in script.get(ctx[-1], {}).items():
            x[t] = v
        return x
    lm = FakeLM(fn)
    lm.eos_ids = frozenset({eos})
    res = run(lm, prompt=" the", n=4, num_beams=2, num_beam_groups=2, diversity_penalty=5.0)
    done = res.frame[res.frame.kind == "group_done"]
    assert done.group.tolist()[0] == 0 and int(done.step.iloc[0]) == 1
    cands = rows(res, "candidate")
    eos_g1 = cands[(cands.step == 2) & (cands.group == 1) & (cands.token_id == eos)]
    assert eos_g1.penalty.tolist() == [5.0] and eos_g1.status.tolist() == ["pruned"]
    assert rows(res, "token").query("step == 2").token_id.tolist() == [6]    # without the pad: EOS at rank 0
    assert [s.token_ids for s in res.sequences][0] == [2]       # group 0's " cat" + EOS is the best


def test_max_new_tokens_counts_generated_tokens_only():
    lm = FakeLM(lambda ctx: torch.arange(32.0))                  # never EOS
    for prompt in (" the", " the cat sat on the mat and the dog ran"):
        res = run(lm, "beam", prompt=prompt, n=5, num_beams=3)
        assert all(len(s.token_ids) == 5 for s in res.sequences)
        assert int(res.frame.step.max()) == 4


# ------------------------------------------------------------------------------------------------ trace
def test_trace_records_every_candidate_and_the_beam_tree():
    B, G = 6, 3
    S, K = B // G, 2 * (B // G)
    res = run(FakeLM(eos_prone(0)), n=10, num_beams=B, num_beam_groups=G, diversity_penalty=0.5)
    cands, tokens, finish = rows(res, "candidate"), rows(res, "token"), rows(res, "finish")
    done_at = {int(r.group): int(r.step) for _, r in res.frame[res.frame.kind == "group_done"].iterrows()}
    for (step, g), at in cands.groupby(["step", "group"]):
        assert len(at) == K and at["rank"].tolist() == list(range(K))
        assert (at.status == "kept").sum() == S == at.accepted.sum()
        assert set(at.status) <= {"kept", "finished", "pruned", "eos_skipped"}
        assert step <= done_at.get(g, 99)
        assert at.score.is_monotonic_decreasing
    for step, at in tokens.groupby("step"):
        alive = [g for g in range(G) if step <= done_at.get(g, 99)]
        assert sorted(at.branch_id) == [g * S + i for g in alive for i in range(S)]
        assert ((at.branch_id // S) == at.group).all() and ((at.parent_id // S) == at.group).all()
        if step:
            assert set(at.parent_id) <= set(tokens[tokens.step == step - 1].branch_id)
    assert tokens.groupby("step").fwd_ms.count().eq(1).all() and (tokens.dt_ms > 0).all()
    ranks = finish.final_rank.dropna().astype(int).tolist()
    assert sorted(ranks) == list(range(len(res.sequences)))
    best = finish[finish.final_rank == 0].iloc[0]
    assert best.score == pytest.approx(res.sequences[0].extra["normalised_score"])
    assert finish[finish.eos].eos_step.notna().all()


@pytest.mark.parametrize("n, bias", [(10, True), (6, False)])
def test_the_tree_highlights_the_best_returned_sequence(n, bias):
    res = run(FakeLM(eos_prone(1) if bias else None), n=n, num_beams=4, num_beam_groups=2, diversity_penalty=1.0)
    assert res.sequences[0].extra["eos"] is bias            # both kinds of leaf: an EOS hypothesis, a running beam
    assert chosen_path(res.frame).token_id.tolist() == res.sequences[0].token_ids


def test_figures_show_the_group_coloured_tree_and_the_mechanism():
    res = run(FakeLM(), n=8, num_beams=4, num_beam_groups=2, diversity_penalty=1.0)
    figs = figures_for(res.frame, res.meta)
    assert {"Token tree", "Diverse beam"} <= set(figs)
    names = [t.name for t in figs["Token tree"].data]
    assert "group 0" in names and "group 1" in names
    assert figs["Token tree"].layout.meta["token_nodes"] == len(rows(res, "token"))
    assert "diverse_beam" in mechanism_figures(res.frame, res.meta)


def test_progress_streams_the_best_running_beam_and_stop_keeps_it():
    lm = FakeLM()
    r = Run(lm, RunRequest(model="fake", strategy="beam", prompt=" the", params={"num_beams": 4}, max_new_tokens=20))
    seen = []
    for ev in r.events():
        seen.append(list(ev.token_ids))
        if ev.step == 3:
            r.stop.set()
    assert r.result.status == "stopped" and len(seen) == 4 and [len(s) for s in seen] == [1, 2, 3, 4]
    assert r.result.sequences[0].token_ids == seen[-1]


# ------------------------------------------------------------------------------------------------ config
def test_defaults_and_num_return_sequences():
    cfg = get_strategy("diverse_beam").make_config({})
    assert (cfg.num_beams, cfg.num_beam_groups, cfg.diversity_penalty, cfg.length_penalty, cfg.early_stopping,
            cfg.num_return_sequences) == (4, 2, 0.5, 1.0, "false", 0)
    assert len(run(FakeLM(), n=5).sequences) == 4                            # 0 = num_beams
    res = run(FakeLM(), n=5, num_beams=6, num_beam_groups=3, diversity_penalty=1.0, num_return_sequences=2)
    assert len(res.sequences) == 2
    assert res.sequences[0].score >= res.sequences[1].score
    assert get_strategy("beam").make_config({"early_stopping": True}).early_stopping == "true"
    assert get_strategy("beam").make_config({"early_stopping": "never"}).early_stopping == "never"


@pytest.mark.parametrize("strategy, params, message", [
    ("diverse_beam", {"num_beams": 6, "num_beam_groups": 4}, "divisible by num_beam_groups (4); with 6 beams use"),
    ("diverse_beam", {"num_beams": 4, "num_beam_groups": 8}, "num_beam_groups (8) must be at most num_beams (4)"),
    ("diverse_beam", {"diversity_penalty": 0.0}, "diversity_penalty must be > 0 when num_beam_groups > 1"),
    ("diverse_beam", {"num_beam_groups": 1, "diversity_penalty": 0.5}, "needs num_beam_groups >= 2"),
    ("diverse_beam", {"num_beams": 32}, "num_beams must be in [2, 16]"),
    ("beam", {"num_beams": 1}, "num_beams must be in [2, 16]"),
    ("beam", {"num_beams": 4, "num_return_sequences": 5}, "num_return_sequences (5) must be at most num_beams (4)"),
    ("beam", {"early_stopping": "sometimes"}, "early_stopping must be one of false, true, never"),
    ("diverse_beam", {"diversity_penalty": -1.0}, "diversity_penalty must be in [0.0, 1000000.0]"),
])
def test_limits_are_enforced_with_clear_messages(strategy, params, message):
    with pytest.raises(UserError, match=None) as err:
        get_strategy(strategy).make_config(params)
    assert message in str(err.value) and str(err.value).startswith(strategy + ":")


def test_cli_runs_ranked_json_and_refuses_bad_groups(tmp_path, capsys):
    out = tmp_path / "o.json"
    assert main(["run", "--strategy", "diverse_beam", "--set", "num_beams=4", "--set", "num_beam_groups=2",
                 "--set", "diversity_penalty=1.0", "--prompt", " the cat", "--max-new-tokens", "8",
                 "--json", str(out), "--csv", str(tmp_path / "o.csv")]) == 0
    import json
    data = json.loads(out.read_text())
    scores = [s["score"] for s in data["sequences"]]
    assert len(scores) == 4 and scores == sorted(scores, reverse=True)
    assert capsys.readouterr().out.startswith("[0] ")
    assert main(["run", "--strategy", "diverse_beam", "--set", "num_beams=6", "--set", "num_beam_groups=4",
                 "--prompt", "x the"]) == 2
    err = capsys.readouterr().err.strip()
    assert "divisible" in err and "\n" not in err and "Traceback" not in err
    assert main(["list"]) == 0
    listing = capsys.readouterr().out
    assert "diversity_penalty" in listing and "num_beam_groups" in listing
    assert not math.isnan(scores[0])


def test_the_app_form_runs_diverse_beam_with_its_parameters(fake_registry):
    from streamlit.testing.v1 import AppTest
    from tests.conftest import ROOT
    at = AppTest.from_file(str(ROOT / "app" / "Home.py"), default_timeout=60).run()
    at.selectbox(key="run:strategy").set_value("diverse_beam").run()
    at.number_input(key="run:diverse_beam:num_beams").set_value(6)
    at.number_input(key="run:diverse_beam:num_beam_groups").set_value(3)
    at.selectbox(key="run:diverse_beam:early_stopping").set_value("never")
    at.number_input(key="run:max_new_tokens").set_value(8)
    at.button(key="run:go").click().run()
    assert not at.exception and not at.error
    (rec,) = at.session_state["declab_runs"]
    assert rec.status == "ok" and rec.meta["params"]["num_beam_groups"] == 3
    assert rec.meta["params"]["early_stopping"] == "never" and len(rec.meta["sequences"]) == 6
    assert any(c.value.startswith("Sequence 6 · score") for c in at.caption)
    assert len(at.get("plotly_chart")) >= 2
