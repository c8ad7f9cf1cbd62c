"""Speculative decoding / sampling (docs/strategies.md#speculative): property tests 8.4 (a)-(d) on scripted fake models (the
distribution of emitted tokens is the warped target distribution, greedy equals target greedy, tokens per round
under i.i.d. acceptance, an identical draft accepts everything), the adaptive draft-length rules, the model-free
drafters, trace/metric consistency, the CLI; and greedy identity on the embedded model with its distilled draft."""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager

import pytest
import torch

from declab.core.errors import UserError
from tests.fake import FakeLM, drafted_logits, hashed_logits, no_eos
from declab.run import Run, RunRequest
from declab.core.sampling import make_generator, warp
from declab.core.trace import Trace
from declab.core import RunContext, get_strategy
from strategies.speculative import NgramDrafter, PromptLookupDrafter
from strategies.two_model import (accept_probability, expected_speedup, expected_tokens_per_round, residual,
                                  speculative_step)

TOY_VOCAB = ("</s>", " a", " b", " c", " d", " e")


def pair(noise: float = 1.0, eos: bool = False):
    V = len(FakeLM().vocab)
    t, d = hashed_logits(V), drafted_logits(V, noise)
    return (FakeLM(t if eos else no_eos(t)), FakeLM(d if eos else no_eos(d), key="fake-draft"))


def run(lm, second=None, prompt=" the cat", n=40, seed=0, strategy="speculative", **params):
    models = {"draft": second} if second is not None else {}
    if strategy == "speculative":
        params.setdefault("measure_speedup", False)
    return Run(lm, RunRequest(model=lm.key, strategy=strategy, prompt=prompt, params=params, max_new_tokens=n,
                              seed=seed),
               models=models).run_to_end()


@contextmanager
def one_thread():
    """Tiny tensors: keep torch from paying thread synchronisation on every op (faster on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def drive(lm, draft, n, seed=0, **params):
    """Run the strategy loop directly (no context-length cap of the fake registry); returns (trace frame, ids,
    metrics)."""
    strat = get_strategy("speculative")
    cfg = strat.make_config(dict(params, measure_speedup=False))
    ctx = RunContext(lm=lm, prompt_ids=[1, 2], max_new_tokens=n, seed=seed, generator=make_generator(seed, "cpu"),
                     trace=Trace("t", "speculative", lm.key), stop=threading.Event(),
                     models={"draft": draft})
    gen = strat.run(ctx, cfg)
    try:
        while True:
            next(gen)
    except StopIteration as done:
        seqs = done.value
    return ctx.trace.frame(), seqs[0].token_ids, ctx.metrics.as_dict()


def constant_pair(p_logits, q_logits):
    p_logits, q_logits = torch.tensor(p_logits), torch.tensor(q_logits)
    return (FakeLM(lambda c: p_logits, vocab=TOY_VOCAB), FakeLM(lambda c: q_logits, vocab=TOY_VOCAB, key="toy-draft"))


NEG = float("-inf")
P_TOY = [NEG, 2.0, 1.0, 0.5, -1.0, 0.0]          # target: mass spread, mostly on ' a'
Q_TOY = [NEG, -1.0, 0.0, 2.5, 1.5, -2.0]         # draft: prefers ' c' / ' d' -> many rejections, residual path


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a token with zero target probability was emitted"
    expected = n * probs[keep]
    return float(((counts[keep] - expected) ** 2 / expected).sum())


CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47}         # 0.999 quantiles (df = kept tokens - 1)


# ------------------------------------------------------------------------------------------------ unit pieces
def test_acceptance_probability_and_residual_by_hand():
    p = torch.tensor([0.5, 0.5, 0.0])
    q = torch.tensor([1.0, 0.0, 0.0])
    assert accept_probability(p, q, 0) == pytest.approx(0.5)
    assert torch.allclose(residual(p, q), torch.tensor([0.0, 1.0, 0.0]))
    q2 = torch.tensor([0.25, 0.25, 0.5])
    assert accept_probability(p, q2, 0) == 1.0 and accept_probability(p, q2, 2) == 0.0
    assert torch.allclose(residual(p, q2), torch.tensor([0.5, 0.5, 0.0]))
    assert expected_tokens_per_round(1.0, 4) == 5 and expected_tokens_per_round(0.0, 4) == 1
    assert expected_tokens_per_round(0.5, 2) == pytest.approx(1.75)
    assert expected_speedup(0.5, 2, 0.25) == pytest.approx(1.75 / 1.5)


def test_speculative_step_alone_samples_p():
    """2x10^4 single-position rounds of the acceptance test: the emitted token follows p (residual path included).
    (docs/strategies.md#speculative mentions 10^5; 2x10^4 keeps the test a few seconds and still rejects a wrong residual, see below.)"""
    p = torch.tensor([0.1, 0.6, 0.05, 0.25, 0.0])
    q = torch.tensor([0.4, 0.1, 0.3, 0.1, 0.1])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(5)
    rejected = 0
    with one_thread():
        for _ in range(20_000):
            x = int(torch.multinomial(q, 1, generator=g))
            ok, tok, _u = speculative_step(p, q, x, g)
            counts[tok] += 1
            rejected += not ok
    assert rejected > 6_000                                        # the residual path carried much of the mass
    assert chi_square(counts, p) < CHI2_999[3]


# ------------------------------------------------------------------------------------------- 8.4 (b) greedy
@pytest.mark.parametrize("params", [
    {"num_draft_tokens": 1}, {"num_draft_tokens": 3}, {"num_draft_tokens": 8},
    {"adaptive": "heuristic", "num_draft_tokens": 2}, {"adaptive": "confidence", "confidence_threshold": 0.5},
    {"adaptive": "specdec", "h": 0.5}, {"draft": "ngram"}, {"draft": "prompt_lookup", "ngram_size": 2},
])
def test_greedy_speculative_equals_target_greedy(fake_registry, params):
    target, draft = pair()
    for prompt in (" the cat", " a dog ran on the mat and the cat"):
        ref = run(target, prompt=prompt, n=40, strategy="greedy").sequences[0].token_ids
        res = run(target, draft, prompt=prompt, n=40, **params)
        assert res.sequences[0].token_ids == ref, params
        assert len(ref) == 40


def test_greedy_speculative_stops_at_eos_like_greedy(fake_registry):
    target, draft = pair(eos=True)                        # the default fake script emits EOS after a few tokens
    for prompt in (" the cat", " a dog", " it was very big"):
        ref = run(target, prompt=prompt, n=30, strategy="greedy")
        res = run(target, draft, prompt=prompt, n=30, num_draft_tokens=5)
        assert res.sequences[0].token_ids == ref.sequences[0].token_ids
        tokens = res.frame[res.frame.kind == "token"]
        assert len(tokens) == len(ref.frame[ref.frame.kind == "token"])     # EOS row too, nothing after it


# ------------------------------------------------------------------------------------------ 8.4 (d) identical
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_identical_draft_accepts_everything(fake_registry, temperature):
    target, _ = pair()
    gamma = 4
    res = run(target, FakeLM(target.logits_fn, key="same"), n=41, num_draft_tokens=gamma, temperature=temperature)
    m = res.meta["metrics"]
    assert m["acceptance_rate"] == 1.0 and m["alpha_hat"] == 1.0
    tokens = res.frame[res.frame.kind == "token"]
    per_round = tokens.groupby("round").size().tolist()
    assert per_round[:-1] == [gamma + 1] * (len(per_round) - 1)            # gamma accepted + the bonus token
    assert m["mean_accepted_length"] == pytest.approx(41 / len(per_round))
    assert (tokens.groupby("round")["origin"].last().iloc[:-1] == "bonus").all()


# --------------------------------------------------------------------------------------- 8.4 (a) distribution
@pytest.mark.parametrize("warpers", [{"temperature": 1.0}, {"temperature": 0.7, "top_k": 4, "top_p": 0.9}])
def test_emitted_tokens_follow_the_warped_target_distribution(warpers):
    """p and q are constant, so every emitted token is an independent draw from the warped p, whatever was
    drafted, accepted, resampled or added as bonus."""
    target, draft = constant_pair(P_TOY, Q_TOY)
    with one_thread():
        frame, ids, m = drive(target, draft, n=3000, seed=1, num_draft_tokens=3, **warpers)
    p = warp(torch.tensor(P_TOY), warpers["temperature"], warpers.get("top_k", 0), warpers.get("top_p", 1.0))
    p = p.softmax(-1)
    counts = torch.bincount(torch.tensor(ids), minlength=len(TOY_VOCAB)).float()
    assert len(ids) == 3000
    q = warp(torch.tensor(Q_TOY), warpers["temperature"], warpers.get("top_k", 0), warpers.get("top_p", 1.0))
    beta = float(torch.minimum(p, q.softmax(-1)).sum())                 # per-position acceptance probability
    rounds = 3000 * (1 - beta) / (1 - beta ** 4)                       # gamma = 3: (1 - b^4) / (1 - b) tokens a round
    assert m["resampled_tokens"] > 150                                 # the residual path was taken
    if rounds * beta ** 3 >= 10:                                       # the bonus path, where it is expected often
        assert m["bonus_tokens"] > rounds * beta ** 3 / 3
    df = int((p > 0).sum()) - 1
    assert chi_square(counts, p) < CHI2_999[df], (counts, p)


def test_a_wrong_residual_would_be_caught():
    """Guard for the test above: emitting from p instead of the residual after a rejection biases the output, and
    the chi-square statistic sees it."""
    p = torch.tensor(P_TOY).softmax(-1)
    q = torch.tensor(Q_TOY).softmax(-1)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(len(TOY_VOCAB))
    for _ in range(6000):
        x = int(torch.multinomial(q, 1, generator=g))
        tok = x if float(torch.rand((), generator=g)) < accept_probability(p, q, x) else \
            int(torch.multinomial(p, 1, generator=g))
        counts[tok] += 1
    assert chi_square(counts, p) > CHI2_999[4]


# ------------------------------------------------------------------------------------- 8.4 (c) iid acceptance
def test_tokens_per_round_match_the_iid_formula():
    target, draft = constant_pair(P_TOY, [NEG, 1.0, 1.2, 0.8, 0.0, 0.3])
    p, q = torch.tensor(P_TOY).softmax(-1), torch.tensor([NEG, 1.0, 1.2, 0.8, 0.0, 0.3]).softmax(-1)
    alpha = float(torch.minimum(p, q).sum())
    gamma = 3
    with one_thread():
        frame, ids, m = drive(target, draft, n=4000, seed=2, num_draft_tokens=gamma, temperature=1.0)
    per_round = frame[frame.kind == "token"].groupby("round").size().iloc[:-1]     # the last round may be cut
    expected = expected_tokens_per_round(alpha, gamma)
    se = per_round.std() / math.sqrt(len(per_round))
    assert abs(per_round.mean() - expected) < 4 * se, (per_round.mean(), expected, se)
    assert m["alpha_hat"] == pytest.approx(alpha, abs=0.02)


# ------------------------------------------------------------------------------------------- adaptive rules
def _rounds(frame):
    return frame[frame.kind == "propose"].groupby("round")


def test_heuristic_schedule_adds_two_on_full_acceptance_and_drops_one_otherwise(fake_registry):
    target, draft = pair(noise=0.6)
    res = run(target, draft, n=120, adaptive="heuristic", num_draft_tokens=2, max_draft_tokens=9)
    f = res.frame
    allowed = _rounds(f)["gamma"].first()
    drafted = _rounds(f).size()
    accepted = f[f.kind == "accept"].groupby("round").size().reindex(allowed.index, fill_value=0)
    assert allowed.iloc[0] == 2
    changes = 0
    for r in allowed.index[:-3]:                     # the last rounds may be cut short by max_new_tokens
        want = min(9, allowed.loc[r] + 2) if accepted.loc[r] == drafted.loc[r] else max(1, allowed.loc[r] - 1)
        assert allowed.loc[r + 1] == want, (r, allowed.tolist())
        changes += want != allowed.loc[r]
    assert changes > 3


def test_confidence_rule_stops_after_the_first_unsure_token(fake_registry):
    target, draft = pair()
    res = run(target, draft, n=80, temperature=1.0, adaptive="confidence", confidence_threshold=0.5,
              max_draft_tokens=6, seed=3)
    lengths = []
    for _, rows in _rounds(res.frame):
        conf = rows["confidence"].tolist()
        assert all(c >= 0.5 for c in conf[:-1])
        assert conf[-1] < 0.5 or len(conf) == rows["gamma"].iloc[0]
        assert (rows["q"] == rows["confidence"]).all()
        lengths.append(len(conf))
    assert min(lengths) < max(lengths)


def test_specdec_rule_stops_when_the_predicted_rejection_chance_exceeds_h(fake_registry):
    target, draft = pair()
    res = run(target, draft, n=80, adaptive="specdec", h=0.6, max_draft_tokens=8)
    for _, rows in _rounds(res.frame):
        conf = rows["confidence"].tolist()
        prods = torch.tensor(conf).cumprod(0)
        assert all(1 - float(x) <= 0.6 for x in prods[:-1])
        assert 1 - float(prods[-1]) > 0.6 or len(conf) == rows["gamma"].iloc[0]


# ------------------------------------------------------------------------------------------- drafters
def test_prompt_lookup_copies_what_followed_the_trailing_ngram():
    d = PromptLookupDrafter(3, eos_ids={0})
    seq = [5, 6, 7, 8, 9, 5, 6, 7]
    props, _ = d.propose(seq, 3, lambda c: True)
    assert [p.token for p in props] == [8, 9, 5]
    props, _ = d.propose([5, 6, 1, 2, 9, 6], 4, lambda c: True)     # no 3- or 2-gram match; unigram 6 -> 1, 2, 9, 6
    assert [p.token for p in props] == [1, 2, 9, 6]
    assert d.propose([1, 2, 3], 3, lambda c: True)[0] == []
    assert [p.token for p in d.propose([4, 0, 4], 3, lambda c: True)[0]] == [0]      # stops at EOS


def test_ngram_table_follows_the_most_frequent_continuation_and_learns_as_it_goes():
    d = NgramDrafter(eos_ids={0})
    seq = [1, 2, 3, 1, 2, 4, 1, 2, 3, 9, 1, 2]
    props, _ = d.propose(seq, 3, lambda c: True)
    assert [p.token for p in props] == [3, 9, 1]     # (1,2)->3 twice, ->4 once; (2,3)->1 and ->9: the latest; (3,9)->1
    seq += [4, 7]
    props, _ = d.propose(seq, 2, lambda c: True)                 # (4,7) unseen, bigram 7 unseen -> nothing
    assert props == []
    seq += [1, 2, 4, 4]
    assert [p.token for p in d.propose(seq[:-1] + [1, 2], 1, lambda c: True)[0]] in ([3], [4])


# ---------------------------------------------------------------------------------------- trace and metrics
def test_trace_rows_and_metrics_agree(fake_registry):
    target, draft = pair()
    target.forwards = 0
    res = run(target, draft, n=60, temperature=0.9, top_p=0.95, seed=5, num_draft_tokens=4)
    f, m = res.frame, res.meta["metrics"]
    prop, dec, tok = f[f.kind == "propose"], f[f.kind.isin(["accept", "reject"])], f[f.kind == "token"]
    assert len(prop) == len(dec) == m["drafted"]
    assert (prop[["round", "draft_pos", "token_id"]].to_numpy() == dec[["round", "draft_pos", "token_id"]].to_numpy()).all()
    assert m["acceptance_rate"] == pytest.approx((dec.kind == "accept").mean())
    assert set(dec.verdict) <= {"accepted", "rejected", "discarded"}
    assert set(tok.origin) <= {"accepted", "resampled", "bonus"}
    assert len(tok) == 60 and list(tok.step) == list(range(60))
    assert m["mean_accepted_length"] == pytest.approx(60 / m["rounds"])
    assert target.forwards == m["rounds"]                          # one target forward per round
    for _, rows in dec.groupby("round"):
        v = rows.verdict.tolist()
        first_bad = v.index("rejected") if "rejected" in v else len(v)
        assert v[:first_bad] == ["accepted"] * first_bad and all(x == "discarded" for x in v[first_bad + 1:])
    accepted_rows = dec[dec.kind == "accept"]
    assert ((accepted_rows.u < accepted_rows.accept_prob) & (accepted_rows.accept_prob <= 1)).all()
    rej = dec[dec.verdict == "rejected"]
    assert (rej.u >= rej.accept_prob).all()
    assert m["acceptance_by_position"]["1"] >= m["acceptance_by_position"].get("4", 0)


def test_seeded_speculative_sampling_is_reproducible(fake_registry):
    target, draft = pair()
    a = run(target, draft, n=30, temperature=1.0, seed=11).sequences[0].token_ids
    b = run(target, draft, n=30, temperature=1.0, seed=11).sequences[0].token_ids
    c = run(target, draft, n=30, temperature=1.0, seed=12).sequences[0].token_ids
    assert a == b and a != c


def test_speedup_is_measured_in_the_same_run(fake_registry):
    target, draft = pair()
    m = run(target, draft, n=20, measure_speedup=True).meta["metrics"]
    assert m["speedup"] == pytest.approx(m["target_only_ms"] / m["spec_ms"], abs=1e-4)


def test_tokens_per_s_counts_the_runs_own_decoding_not_the_speedup_baseline(fake_registry):
    """measure_speedup times target-only decoding inside the run; the run's wall time and tokens/s leave it out."""
    target, draft = pair()
    target.delay_s = 0.01                # every target forward takes >= 10 ms, so the baseline is visible
    res = run(target, draft, n=20, measure_speedup=True)
    m, wall = res.meta["metrics"], res.meta["wall_s"]
    assert m["target_only_ms"] >= 20 * 10
    assert wall == pytest.approx(m["spec_ms"] / 1000, abs=0.05)            # the strategy's own decoding time
    assert m["tokens_per_s"] == pytest.approx(m["new_tokens"] / wall, rel=1e-3)


def test_bad_draft_settings_are_refused(fake_registry):
    with pytest.raises(UserError, match="draft must be"):
        get_strategy("speculative").make_config({"draft": " "})
    with pytest.raises(UserError, match="adaptive must be one of"):
        get_strategy("speculative").make_config({"adaptive": "sometimes"})
    target, _ = pair()
    other = FakeLM(vocab=TOY_VOCAB, key="fake-draft")
    with pytest.raises(UserError, match="share a tokenizer"):
        run(target, other, n=5)


def test_cli_runs_speculative_with_the_default_pair(fake_registry, tmp_path, capsys):
    import json

    from declab.cli import main
    out = tmp_path / "s.json"
    assert main(["run", "--strategy", "speculative", "--prompt", " the cat", "--max-new-tokens", "16",
                 "--json", str(out), "--csv", str(tmp_path / "s.csv"), "--quiet"]) == 0
    data = json.loads(out.read_text())
    assert data["metrics"]["drafter"] == "fake-draft" and "acceptance_rate" in data["metrics"]
    assert "speedup" in data["metrics"]
    assert main(["run", "--strategy", "speculative", "--set", "draft=nope", "--prompt", " the cat"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert main(["run", "--strategy", "speculative", "--set", "draft=ngram", "--prompt", " the cat the cat",
                 "--json", str(out), "--quiet"]) == 0
    assert json.loads(out.read_text())["metrics"]["drafter"] == "ngram"


# ------------------------------------------------------------------------------------------- embedded model
@pytest.mark.model
@pytest.mark.parametrize("prompt", ["Explain why the sky is blue.", "Write a Python function that adds two numbers."])
def test_greedy_speculative_equals_target_greedy_on_the_embedded_model(real_lm, draft_lm, prompt):
    def go(strategy, **params):
        return Run(real_lm, RunRequest(model=real_lm.key, strategy=strategy, prompt=prompt, prompt_format="chat",
                                       params=params, max_new_tokens=40, second_model=draft_lm.key),
                   models={"draft": draft_lm}).run_to_end()
    ref = go("greedy").sequences[0].token_ids
    res = go("speculative", num_draft_tokens=4, measure_speedup=False)
    assert res.sequences[0].token_ids == ref
    m = res.meta["metrics"]
    assert m["drafter"] == "smollm2-135m-draft" and m["rounds"] < len(ref)      # several tokens per target pass
