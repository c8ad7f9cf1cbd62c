"""Contrastive decoding (docs/strategies.md#contrastive) on fake expert/amateur pairs: every step re-derived from a no-cache
reference (both score forms), alpha = 1 is expert greedy, expert == amateur makes the score constant on V_head and
the lowest id wins (the documented tie rule), the amateur's temperature, the 'no amateur' error (runner and CLI),
and a short run on the embedded model with itself as amateur."""

from __future__ import annotations

import math

import pytest
import torch

from declab.cli import main as cli_main
from declab.core.errors import UserError
from tests.fake import FakeLM, drafted_logits, hashed_logits, no_eos
from declab.run import Run, RunRequest


def pair():
    V = len(FakeLM().vocab)
    return (FakeLM(no_eos(hashed_logits(V), -30.0)),          # finite: a -inf amateur logit would make the contrast inf
            FakeLM(no_eos(drafted_logits(V, 1.5), -30.0), key="fake-draft"))


def run(lm, amateur=None, prompt=" the cat", n=24, seed=0, **params):
    models = {"amateur": amateur} if amateur is not None else {}
    return Run(lm, RunRequest(model=lm.key, strategy="contrastive", prompt=prompt, params=params, max_new_tokens=n,
                              seed=seed),
               models=models).run_to_end()


def tokens(res):
    return res.frame[res.frame.kind == "token"].reset_index(drop=True)


def reference(exp, ama, ids, n, alpha=0.1, form="log_ratio", beta=0.5, tau=0.5):
    gen, out = [], []
    for _ in range(n):
        le, la = exp.logits_fn(ids + gen).double(), ama.logits_fn(ids + gen).double()
        lpe = le.log_softmax(-1)
        head = lpe >= lpe.max() + math.log(alpha)
        raw = lpe - (la / tau).log_softmax(-1) if form == "log_ratio" else (1 + beta) * le - beta * la
        s = torch.where(head, raw, torch.tensor(-math.inf, dtype=torch.float64))
        tok = int(s.argmax())
        out.append((tok, float(s[tok]), int(head.sum()), int(lpe.argmax())))
        gen.append(tok)
    return out


@pytest.mark.parametrize("form,alpha", [("log_ratio", 0.1), ("logit", 0.1), ("log_ratio", 0.01)])
def test_matches_no_cache_reference(fake_registry, form, alpha):
    exp, ama = pair()
    res = run(exp, ama, score=form, alpha=alpha, n=24)
    ref = reference(exp, ama, exp.encode_prompt(" the cat", "raw"), 24, alpha=alpha, form=form)
    tok = tokens(res)
    assert tok.token_id.tolist() == [r[0] for r in ref]
    assert tok.score.tolist() == pytest.approx([r[1] for r in ref], abs=1e-4)
    assert tok.head_size.tolist() == [r[2] for r in ref]
    assert tok.flip.tolist() == [r[0] != r[3] for r in ref]
    assert tok.flip.any()                                             # the amateur changed some choices
    assert res.meta["metrics"]["flips"] == int(tok.flip.sum())
    cand = res.frame[res.frame.kind == "candidate"]
    assert set(cand.source) == {"contrast", "expert"}


def test_alpha_one_is_expert_greedy(fake_registry):
    exp, ama = pair()
    greedy = Run(exp, RunRequest(model="fake", strategy="greedy", prompt=" the cat", max_new_tokens=24)).run_to_end()
    res = run(exp, ama, alpha=1.0)
    assert res.sequences[0].token_ids == greedy.sequences[0].token_ids
    assert (tokens(res).head_size == 1).all()


def test_d_expert_equals_amateur_constant_score_lowest_id(fake_registry):
    """5.4 (d): expert == amateur, amateur temperature 1: score 0 on all of V_head; ties -> the lowest id in V_head."""
    exp, _ = pair()
    same = FakeLM(exp.logits_fn, key="fake-draft")
    res = run(exp, same, amateur_temperature=1.0, alpha=0.05, n=16)
    tok = tokens(res)
    assert (tok.score == 0).all()
    ids, gen = exp.encode_prompt(" the cat", "raw"), []
    for t in tok.token_id.tolist():
        lpe = exp.logits_fn(ids + gen).log_softmax(-1)
        head = torch.nonzero(lpe >= lpe.max() + math.log(0.05)).flatten()
        assert t == int(head.min())
        gen.append(t)
    assert (tok.head_size > 1).any()                                  # real ties were broken


def test_sampling_stays_in_head_and_is_seeded(fake_registry):
    exp, ama = pair()
    a = run(exp, ama, temperature=1.0, seed=3, n=30)
    b = run(exp, ama, temperature=1.0, seed=3, n=30)
    assert a.sequences[0].token_ids == b.sequences[0].token_ids
    assert tokens(a).score.notna().all() and (tokens(a).score > -math.inf).all()


def test_no_amateur_is_a_clear_error(fake_registry, capsys):
    lone = FakeLM(key="fake-draft")                                   # lists no pairs in the fake registry
    with pytest.raises(UserError, match="no amateur"):
        run(lone)
    code = cli_main(["run", "--model", "fake-draft", "--strategy", "contrastive", "--prompt", " the cat",
                     "--max-new-tokens", "4", "--no-store"])
    assert code == 2
    err = capsys.readouterr().err
    assert "fake-draft" in err and "pairs" in err and "no amateur" in err and err.count("\n") == 1


def test_cli_default_pair(fake_registry, tmp_path):
    """The CLI attaches the model's first pair (fake -> fake-draft) as the amateur."""
    out = tmp_path / "r.csv"
    assert cli_main(["run", "--model", "fake", "--strategy", "contrastive", "--prompt", " the cat",
                     "--max-new-tokens", "6", "--csv", str(out), "--quiet"]) == 0
    import json
    meta = json.loads((tmp_path / "r.meta.json").read_text())
    assert meta["extras"]["second_model"] == "fake-draft" and meta["metrics"]["new_tokens"] >= 1


@pytest.mark.model
def test_embedded_self_contrast(real_lm):
    """Expert == amateur on the real model (5.4 d): constant score 0 on V_head, lowest id chosen."""
    res = Run(real_lm, RunRequest(model=real_lm.key, strategy="contrastive", prompt="The capital of France is",
                                  prompt_format="raw", params={"amateur_temperature": 1.0}, max_new_tokens=4,
                                  second_model=real_lm.key), models={"amateur": real_lm}).run_to_end()
    tok = tokens(res)
    assert len(tok) == 4 and (tok.score.abs() < 1e-5).all()
    cand = res.frame[(res.frame.kind == "candidate") & (res.frame.source == "contrast")]
    for step, grp in cand[cand.score.notna()].groupby("step"):
        assert int(tok.token_id[step]) <= int(grp.token_id.min())      # the lowest id among the tied head


def test_mechanism_figure(fake_registry):
    from viz.mechanism import mechanism_figures
    exp, ama = pair()
    res = run(exp, ama, n=16)
    figs = mechanism_figures(res.frame, res.meta)
    assert "contrastive" in figs and "uscd" not in figs
    tok = tokens(res)
    flips = next(t for t in figs["contrastive"].data if t.name == "flipped")
    assert list(flips.x) == tok.step[tok.flip.astype(bool)].tolist()


@pytest.mark.parametrize("form", ["log_ratio", "logit"])
def test_an_amateur_with_a_partial_vocabulary_is_floored_not_infinite(fake_registry, form):
    """The embedded draft's head covers part of the vocabulary (-inf elsewhere): those tokens must score as the
    amateur's least likely token, so they are not picked merely for being outside it."""
    expert, amateur = pair()
    V = len(FakeLM().vocab)
    outside = torch.zeros(V, dtype=torch.bool)
    outside[V // 2:] = True

    def partial(ctx):
        return amateur.logits_fn(ctx).masked_fill(outside, float("-inf"))

    def floored(ctx):
        la = amateur.logits_fn(ctx)
        return torch.where(outside, la[~outside].min(), la)

    a = tokens(run(expert, FakeLM(partial, key="fake-draft"), n=30, alpha=0.01, score=form, temperature=0))
    b = tokens(run(expert, FakeLM(floored, key="fake-draft"), n=30, alpha=0.01, score=form, temperature=0))
    assert a.score.map(math.isfinite).all()
    assert a.token_id.tolist() == b.token_id.tolist()
    assert a.score.tolist() == pytest.approx(b.score.tolist(), abs=1e-5)
