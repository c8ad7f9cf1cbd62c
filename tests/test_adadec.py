"""AdaDec (docs/strategies.md#adadec): a scripted pause where the lookahead rerank overrules greedy, with the scores
worked out by hand; every run equal to an independent no-cache reference (both early-stop rules); tau = inf, B = 1
and L = 0 are greedy; the rollouts as branches whose rows carry the model's log-probabilities in their own context;
the fitted-threshold procedure; bad settings refused; a short run on the embedded model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from declab.core.errors import UserError
from declab.run import Run, RunRequest
from strategies.adadec import stop_indent
from tests.fake import DEFAULT_VOCAB, FakeLM

V = len(DEFAULT_VOCAB)
ID = {t: i for i, t in enumerate(DEFAULT_VOCAB)}


def dist(**probs: float) -> torch.Tensor:
    out = torch.full((V,), -math.inf)
    for t, p in probs.items():
        out[ID[t]] = math.log(p)
    return out


def uniform(*tokens: str) -> torch.Tensor:
    return dist(**{t: 1.0 / len(tokens) for t in tokens})


BAD = (" on", " mat", " a", " and")
# after " cat": p(sat) 0.5 > p(dog) 0.3 > p(ran) 0.2 (H = 1.03 nats), but " sat" leads into four-way uncertainty while
# " dog" and " ran" lead into certain text: the lookahead should pick " dog".
SCRIPT = {" the": uniform(" cat"), " cat": dist(**{" sat": 0.5, " dog": 0.3, " ran": 0.2}), " dog": uniform(" ran"),
          " ran": uniform("."), ".": uniform(" the"), " sat": uniform(*BAD), **{t: uniform(*BAD) for t in BAD}}


def script(context):
    return SCRIPT[DEFAULT_VOCAB[context[-1]] if context else " the"].clone()


def run(lm, n=20, strategy="adadec", prompt=" the", **params):
    return Run(lm, RunRequest(model=lm.key, strategy=strategy, prompt=prompt, params=params, max_new_tokens=n,
                              seed=0)).run_to_end()


def tokens(res, branch=0):
    f = res.frame
    return f[(f.kind == "token") & (f.branch_id == branch)].reset_index(drop=True)


def reference(lm, prompt_ids, n, tau, B=3, L=5, stop="none"):
    """AdaDec (beam 1) without a KV cache: every forward recomputed from the whole context."""
    out = []
    for _ in range(n):
        logp = torch.log_softmax(lm.logits_fn(prompt_ids + out).float(), -1)
        h = float(-(logp.exp() * torch.where(logp.isfinite(), logp, torch.zeros_like(logp))).sum())
        if h < tau or B == 1 or L == 0:
            tok = int(logp.argmax())
        else:
            top = torch.topk(logp, B)
            scores = []
            for c, lpc in zip(top.indices.tolist(), top.values.tolist()):
                seq, s = [c], lpc
                for _ in range(L if c != 0 else 0):
                    lp = torch.log_softmax(lm.logits_fn(prompt_ids + out + seq).float(), -1)
                    t = int(lp.argmax())
                    s += float(lp[t])
                    seq.append(t)
                    if t == 0 or (stop == "indent" and stop_indent(lm.decode(out + seq))):
                        break
                scores.append(s / len(seq))
            tok = top.indices.tolist()[max(range(B), key=lambda b: (scores[b], -b))]
        out.append(tok)
        if tok == 0:
            break
    return out


def test_pause_reranks_to_the_lookahead_best(fake_registry):
    lm = FakeLM(script)
    res = run(lm, n=6, tau=1.0)                        # the script's uncertain step has H = 1.03 nats
    tok, f = tokens(res), res.frame
    assert lm.decode(tok.token_id.tolist()) == " cat dog ran. the cat"
    # step 0 (" the" -> " cat", H = 0) is greedy; step 1 (H of 0.5/0.3/0.2) pauses and flips to " dog"
    assert tok.intervened.tolist()[:3] == [False, True, False]
    h = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2))
    assert tok.gate_entropy[1] == pytest.approx(h / math.log(2))
    assert tok.greedy_token[1] == ID[" sat"] and bool(tok.flip[1]) and tok.token_id[1] == ID[" dog"]
    la = f[(f.kind == "lookahead") & (f.step == 1)].sort_values("candidate")
    assert [DEFAULT_VOCAB[i] for i in la.token_id] == [" sat", " dog", " ran"]
    # (ln p(c) + sum of the greedy rollout's ln p) / (5 + 1): sat -> on x5; dog -> ran . the cat sat; ran -> . the
    # cat sat on
    ln = math.log
    expected = [(ln(0.5) + 5 * ln(0.25)) / 6, (ln(0.3) + ln(0.5)) / 6, (ln(0.2) + ln(0.5) + ln(0.25)) / 6]
    assert la.score.tolist() == pytest.approx(expected, abs=1e-5)
    assert la.chosen.tolist() == [False, True, False] and la.rollout_len.tolist() == [5, 5, 5]
    assert tok.lookahead_score[1] == pytest.approx(expected[1], abs=1e-5)
    assert lm.decode(lm.encode_prompt(la.token_text.iloc[1], "raw")) == " dog ran. the cat sat"
    # greedy would have said " sat" and stayed in four-way uncertainty
    g = run(lm, n=6, strategy="greedy")
    assert lm.decode(g.sequences[0].token_ids).startswith(" cat sat on")
    m = res.meta["metrics"]
    assert m["flips"] == 1 and m["interventions"] == 1 and m["decisions"] == 6
    assert m["forwards"] == 5 + 4 and m["forward_tokens"] == 5 * 3 + 4      # the pause: 5 three-row forwards


def test_rollouts_are_branches_with_the_models_own_logprobs(fake_registry):
    lm = FakeLM(script)
    res = run(lm, n=6, tau=1.0)                        # the script's uncertain step has H = 1.03 nats
    f, tok = res.frame, tokens(res)
    context = lm.encode_prompt(" the", "raw") + tok.token_id.tolist()
    P = len(lm.encode_prompt(" the", "raw"))
    la = f[(f.kind == "lookahead") & (f.step == 1)]
    for _, row in la.iterrows():
        br = f[(f.kind == "token") & (f.branch_id == row.branch_id)].sort_values("step")
        assert not br.accepted.any()
        ids = br.token_id.tolist()
        if row.chosen:        # the emitted candidate's rollout hangs from it, one step later
            assert br.step.tolist() == list(range(2, 7)) and br.parent_id.iloc[0] == 0
            ctx = context[:P + 2]
        else:                 # a rejected candidate starts its own branch at the pause step
            assert br.step.tolist() == list(range(1, 7)) and ids[0] == row.token_id
            ctx = context[:P + 1]
        for j, (tid, lp) in enumerate(zip(ids, br.logprob)):
            assert lp == pytest.approx(float(torch.log_softmax(script(ctx + ids[:j]), -1)[tid]))


@pytest.mark.parametrize("tau,stop", [(0.0, "none"), (1.5, "none"), (2.5, "none"), (1.5, "indent"), (0.0, "indent")])
def test_matches_no_cache_reference(fake_registry, tau, stop):
    lm = FakeLM()                                       # the hashed default script: varied entropy, EOS possible
    prompt = " the cat\n"
    res = run(lm, n=24, prompt=prompt, tau=tau, lookahead_stop=stop)
    ids = tokens(res).token_id.tolist()
    assert ids == reference(lm, lm.encode_prompt(prompt, "raw"), 24, tau, stop=stop)
    if tau == 0.0:
        assert res.meta["metrics"]["intervention_rate"] == 1.0


@pytest.mark.parametrize("params", [{"tau": math.inf}, {"lookahead_beam_size": 1}, {"lookahead_length": 0}])
def test_degenerate_settings_are_greedy(fake_registry, params):
    lm = FakeLM()
    g = run(lm, n=24, prompt=" the cat", strategy="greedy")
    a = run(lm, n=24, prompt=" the cat", **dict({"tau": 0.0}, **params))
    assert a.sequences[0].token_ids == g.sequences[0].token_ids
    assert not (a.frame.kind == "lookahead").any()
    assert run(lm, n=24, prompt=" the cat", tau=0.0).sequences[0].token_ids != g.sequences[0].token_ids


def test_stop_indent_rule():
    assert not stop_indent("    x = 1\n    return x")
    assert stop_indent("    return x\ndef f():")
    assert stop_indent("    x\n\n\n\n")
    assert not stop_indent("    x\n\n\n")


def test_threshold_fit_recovers_a_planted_boundary():
    """bench/adadec_threshold.py: y = [H < 1.2] with noise; the fitted tau lands near 1.2."""
    from bench.adadec_threshold import fit_tau
    rng = np.random.RandomState(0)
    h = rng.uniform(0, 4, 4000)
    y = ((h + rng.normal(0, 0.3, len(h))) < 1.2).astype(float)
    res = fit_tau(h, y)
    assert res["w"] < 0 and abs(res["tau"] - 1.2) < 0.15 and res["test_accuracy"] > 0.85


def test_bad_parameters():
    from declab.core import get_strategy
    s = get_strategy("adadec")
    with pytest.raises(UserError, match="lookahead_stop must be"):
        s.make_config({"lookahead_stop": "never"})
    with pytest.raises(UserError, match=r"lookahead_beam_size must be in \[1, 16\]"):
        s.make_config({"lookahead_beam_size": "0"})
    with pytest.raises(UserError, match="tau must be"):
        s.make_config({"tau": "-1"})


@pytest.mark.model
def test_embedded_model(real_lm):
    """A chat code prompt on the real model with a low tau: pauses happen, and the emitted tokens' logprobs are the
    model's own (one no-cache forward), so the forked, selected and cropped cache is right."""
    text = "Write a Python function that returns the square of x."
    req = RunRequest(model=real_lm.key, strategy="adadec", prompt=text, max_new_tokens=12, prompt_format="chat",
                     params={"tau": 0.3})
    res = Run(real_lm, req).run_to_end()
    f = res.frame
    tok = f[(f.kind == "token") & (f.branch_id == 0)]
    assert res.meta["metrics"]["interventions"] >= 1 and (f.kind == "lookahead").any()
    prompt = real_lm.encode_prompt(text, "chat")
    ids = tok.token_id.tolist()
    full = real_lm.prefill(prompt + ids, all_logits=True).logits[0, len(prompt) - 1: len(prompt) + len(ids) - 1]
    lp = torch.log_softmax(full, -1).gather(1, torch.as_tensor(ids)[:, None])[:, 0]
    assert tok.logprob.tolist() == pytest.approx(lp.tolist(), abs=2e-3)
