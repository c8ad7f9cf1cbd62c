"""Entropy Adaptive Decoding (docs/strategies.md#ead): property tests 6.4 (a) threshold above every entropy = small-model
greedy, below zero = large-model greedy; (b) a forced switching schedule equals a no-cache reference (cache
catch-up); (c) no switch before min_dwell, and the whole schedule re-derived from the recorded entropies; metrics
and forward counts; the same identities on the embedded model and its distilled draft."""

from __future__ import annotations

import threading

import pytest
import torch

from tests.fake import FakeLM, drafted_logits, hashed_logits, no_eos
from declab.run import Run, RunRequest
from declab.core.sampling import make_generator
from declab.core.trace import Trace
from declab.core import RunContext
from strategies.ead import EAD


def pair():
    V = len(FakeLM().vocab)
    large = FakeLM(no_eos(hashed_logits(V)))
    small = FakeLM(no_eos(drafted_logits(V, 1.5)), key="fake-draft")
    return large, small


def run(lm, second=None, prompt=" the cat", n=40, seed=0, strategy="ead", **params):
    return Run(lm, RunRequest(model=lm.key, strategy=strategy, prompt=prompt, params=params, max_new_tokens=n,
                              seed=seed),
               models={"small": second} if second is not None else {}).run_to_end()


def greedy_ids(lm, prompt, n, key=None):
    """Greedy on one model (run under the key the registry knows)."""
    alias = FakeLM(lm.logits_fn, key=key or "fake")
    return run(alias, prompt=prompt, n=n, strategy="greedy").sequences[0].token_ids


class Forced(EAD):
    """EAD with a forced schedule: switch model every `every` tokens (6.4 b), starting on `start`."""

    def __init__(self, every: int, start: str):
        self.every, self.start = every, start

    def decide(self, cfg, rolling, active, dwell, step):
        if active is None:
            return self.start
        return ("large" if active == "small" else "small") if dwell >= self.every else active


def drive(strategy, large, small, prompt_ids, n, **params):
    cfg = strategy.make_config(params)
    ctx = RunContext(lm=large, prompt_ids=list(prompt_ids), max_new_tokens=n, seed=0,
                     generator=make_generator(0, "cpu"), trace=Trace("t", "ead", large.key), stop=threading.Event(),
                     models={"small": small})
    gen = strategy.run(ctx, cfg)
    try:
        while True:
            next(gen)
    except StopIteration as done:
        return done.value[0].token_ids, ctx.trace.frame(), ctx.metrics.as_dict()


def no_cache_reference(large, small, prompt_ids, n, every, start):
    """Each token from a fresh full forward of the scheduled model over the whole prefix (no cache at all)."""
    seq, out, model = list(prompt_ids), [], start
    for t in range(n):
        if t and t % every == 0:
            model = "large" if model == "small" else "small"
        lm = large if model == "large" else small
        with torch.inference_mode():
            token = int(lm.prefill(seq).logits[0].argmax())
        if token in large.eos_ids:
            break
        out.append(token)
        seq.append(token)
    return out


# ------------------------------------------------------------------------------------------------ 6.4 (a)
@pytest.mark.parametrize("min_dwell", [1, 4])
def test_threshold_extremes_give_each_models_greedy_output(fake_registry, min_dwell):
    large, small = pair()
    for prompt in (" the cat", " a dog ran on the mat"):
        hi = run(large, small, prompt=prompt, threshold=1000.0, min_dwell=min_dwell)
        lo = run(large, small, prompt=prompt, threshold=-1.0, min_dwell=min_dwell)
        assert hi.sequences[0].token_ids == greedy_ids(small, prompt, 40)
        assert lo.sequences[0].token_ids == greedy_ids(large, prompt, 40)
        assert hi.meta["metrics"]["large_fraction"] == 0.0 and lo.meta["metrics"]["large_fraction"] == 1.0
        assert hi.meta["metrics"]["switches"] == lo.meta["metrics"]["switches"] == 0
    assert greedy_ids(small, " the cat", 40) != greedy_ids(large, " the cat", 40)      # the test can tell them apart


# ------------------------------------------------------------------------------------------------ 6.4 (b)
@pytest.mark.parametrize("every, start", [(3, "small"), (3, "large"), (1, "small"), (5, "large")])
def test_forced_schedule_equals_a_no_cache_reference(every, start):
    large, small = pair()
    prompt = large.encode_prompt(" the cat sat on the mat", "raw")
    ids, frame, m = drive(Forced(every, start), large, small, prompt, 30, min_dwell=1)
    assert ids == no_cache_reference(large, small, prompt, 30, every, start)
    tokens = frame[frame.kind == "token"]
    assert tokens.role.tolist() == [start if (t // every) % 2 == 0 else ("large" if start == "small" else "small")
                                    for t in range(30)]
    assert m["switches"] == (30 - 1) // every
    # a model taking over feeds every generated token it has not seen: the other model's `every` tokens, plus its
    # own last token when it ran before (`catch_up` counts those beyond the one token always fed)
    roles, catch = tokens.role.tolist(), tokens.catch_up.tolist()
    starts = [t for t in range(30) if t == 0 or roles[t] != roles[t - 1]]
    assert [catch[t] for t in starts] == [0, every - 1] + [every] * (len(starts) - 2)
    assert all(catch[t] == 0 for t in range(30) if t not in starts)


# ------------------------------------------------------------------------------------------------ 6.4 (c)
@pytest.mark.parametrize("window, threshold, min_dwell", [(5, 2.0, 3), (1, 2.2, 1), (3, 1.8, 6), (2, 2.0, 2)])
def test_schedule_follows_the_rule_and_never_switches_before_min_dwell(fake_registry, window, threshold, min_dwell):
    large, small = pair()
    res = run(large, small, n=80, window=window, threshold=threshold, min_dwell=min_dwell, seed=1, temperature=1.0)
    f = res.frame
    tokens = f[f.kind == "token"].reset_index(drop=True)
    switches = f[f.kind == "switch"]
    assert res.meta["metrics"]["switches"] == len(switches) > 2
    assert (switches.dwell >= min_dwell).all()
    # re-derive the whole schedule from the recorded entropies
    role = "large" if tokens.role.iloc[0] == "large" else "small"
    dwell, hist = 0, []
    for t, row in tokens.iterrows():
        assert row.role == role, t
        hist.append(row.entropy)
        rolling = sum(hist[-window:]) / len(hist[-window:])
        assert row.rolling_entropy == pytest.approx(rolling)
        dwell += 1
        assert row.dwell == dwell
        want = "large" if rolling > threshold else "small"
        if want != role and dwell >= min_dwell and t + 1 < len(tokens):
            assert (switches.step == t + 1).any() and switches[switches.step == t + 1].role.iloc[0] == want
            role, dwell = want, 0
        else:
            assert not (switches.step == t + 1).any()
    model_of = {"small": small.key, "large": large.key}
    assert (tokens.model == tokens.role.map(model_of)).all()


def test_first_model_is_chosen_from_the_small_models_prompt_entropy(fake_registry):
    large, small = pair()
    h0 = float(-(small.prefill([1, 2]).logits[0].log_softmax(-1).exp() *
                 small.prefill([1, 2]).logits[0].log_softmax(-1)).nan_to_num().sum() / torch.log(torch.tensor(2.0)))
    below = run(large, small, prompt=" the cat", threshold=h0 - 0.01, n=3)
    above = run(large, small, prompt=" the cat", threshold=h0 + 0.01, n=3)
    assert below.frame[below.frame.kind == "token"].role.iloc[0] == "large"
    assert above.frame[above.frame.kind == "token"].role.iloc[0] == "small"


# ------------------------------------------------------------------------------------------- caches, metrics
def test_each_token_costs_one_forward_of_its_model_and_metrics_add_up(fake_registry):
    large, small = pair()
    large.num_params, small.num_params = 400, 100
    res = run(large, small, n=60, threshold=2.0, min_dwell=2, window=3)
    m = res.meta["metrics"]
    tokens = res.frame[res.frame.kind == "token"]
    n_large = int((tokens.role == "large").sum())
    assert m["large_tokens"] == n_large and m["small_tokens"] == 60 - n_large
    assert 0 < n_large < 60
    started_small = tokens.role.iloc[0] == "small"
    assert large.forwards == n_large                                  # catch-up rides along in one forward
    assert small.forwards == 60 - n_large + (0 if started_small else 1)   # + the prompt-entropy probe
    assert m["catch_up_tokens"] == int(tokens.catch_up.sum()) > 0
    f_l = n_large / 60
    assert m["large_fraction"] == pytest.approx(f_l)
    assert m["compute_ratio"] == pytest.approx(f_l + (1 - f_l) * 0.25)
    assert m["compute_saved"] == pytest.approx(1 - m["compute_ratio"])


def test_seeded_sampling_is_reproducible_and_figures_show_switches(fake_registry):
    from viz.figures import figures_for
    large, small = pair()
    a = run(large, small, n=30, temperature=1.0, seed=4, min_dwell=1)
    b = run(large, small, n=30, temperature=1.0, seed=4, min_dwell=1)
    assert a.sequences[0].token_ids == b.sequences[0].token_ids
    figs = figures_for(a.frame, a.meta)
    assert {"Entropy", "Acceptance"} <= set(figs)
    assert any(t.name == "model switch" for t in figs["Entropy"].data)


def test_cli_runs_ead_with_the_default_pair(fake_registry, tmp_path):
    import json

    from declab.cli import main
    out = tmp_path / "e.json"
    assert main(["run", "--strategy", "ead", "--set", "threshold=2.0", "--prompt", " the cat", "--max-new-tokens",
                 "20", "--json", str(out), "--quiet"]) == 0
    m = json.loads(out.read_text())["metrics"]
    assert {"large_fraction", "switches", "catch_up_tokens"} <= set(m)


# ------------------------------------------------------------------------------------------- embedded model
@pytest.mark.model
def test_threshold_extremes_on_the_embedded_model(real_lm, draft_lm):
    prompt = "Give me three tips for staying focused."

    def go(lm, strategy, **params):
        return Run(lm, RunRequest(model=lm.key, strategy=strategy, prompt=prompt, prompt_format="chat",
                                  params=params, max_new_tokens=16, second_model=draft_lm.key),
                   models={"small": draft_lm}).run_to_end()
    assert go(real_lm, "ead", threshold=1000.0).sequences[0].token_ids == go(draft_lm, "greedy").sequences[0].token_ids
    assert go(real_lm, "ead", threshold=-1.0).sequences[0].token_ids == go(real_lm, "greedy").sequences[0].token_ids


@pytest.mark.model
def test_forced_schedule_on_the_embedded_model_equals_a_no_cache_reference(real_lm, draft_lm):
    prompt = real_lm.encode_prompt("Name three primary colours.", "chat")
    ids, frame, m = drive(Forced(3, "small"), real_lm, draft_lm, prompt, 12, min_dwell=1)
    assert ids == no_cache_reference(real_lm, draft_lm, prompt, 12, 3, "small")
    assert m["switches"] == 3 and m["catch_up_tokens"] > 0
