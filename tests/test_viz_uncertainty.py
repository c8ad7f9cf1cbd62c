"""viz.uncertainty (cautious / adadec mechanism views) and the token tree on their traces: the gate's markers sit at
exactly the steps where it fired, the threshold line at the gate's threshold, one kept star per intervention; the
trials / rollouts are branches of the token tree (every token row drawn, the chosen path = the emitted tokens);
model text is escaped; the app's figure list picks the views up."""

from __future__ import annotations

import math

import torch

from declab.run import Run, RunRequest
from tests.fake import DEFAULT_VOCAB, FakeLM
from viz import figures_for, token_tree
from viz.uncertainty import adadec_figure, cautious_figure

V = len(DEFAULT_VOCAB)
ID = {t: i for i, t in enumerate(DEFAULT_VOCAB)}
HOSTILE = " <script>alert(1)</script>"


def dist(*tokens):
    out = torch.full((V,), -math.inf)
    for t in tokens:
        out[ID[t]] = 0.0
    return out


SCRIPT = {" the": dist(" cat"), " cat": dist(" sat", HOSTILE, " ran"), " sat": dist("."), HOSTILE: dist(" ran", "."),
          " ran": dist(" on", " mat"), " on": dist(","), " mat": dist(".")}


def script(context):
    return SCRIPT.get(DEFAULT_VOCAB[context[-1]] if context else " the", dist(" the")).clone()


def run(strategy, n=24, **params):
    lm = FakeLM(script)
    return Run(lm, RunRequest(model=lm.key, strategy=strategy, prompt=" the", params=params, max_new_tokens=n,
                              seed=2)).run_to_end()


def emitted(res):
    f = res.frame
    return f[(f.kind == "token") & (f.branch_id == 0)]


def check_view(fig, res, alt_kind):
    tok = emitted(res)
    fired = tok[tok.intervened.fillna(False).astype(bool)]
    assert len(fired) >= 2
    marks = next(t for t in fig.data if t.name == "gate fired")
    assert list(marks.x) == fired.step.tolist()
    assert list(marks.y) == fired.gate_entropy.tolist()
    thr = float(tok.gate_threshold.dropna().iloc[0])
    assert any(abs(s.y0 - thr) < 1e-9 for s in fig.layout.shapes)
    stars = next(t for t in fig.data if t.name == "kept")
    assert len(stars.x) == len(fired) == (res.frame.kind == alt_kind).groupby(res.frame.step).any().sum()
    text = fig.to_json()
    assert "<script>" not in text and "&lt;script&gt;" in text


def test_cautious_view_and_tree(fake_registry):
    res = run("cautious", temperature=1.0, top_k=0, top_p=1.0)
    check_view(cautious_figure(res.frame, res.meta), res, "trial")
    f = res.frame
    assert (f[(f.kind == "token") & (f.branch_id != 0)].accepted == False).all()   # noqa: E712
    tree = token_tree(f)
    meta = tree.layout.meta
    assert meta["token_nodes"] == int((f.kind == "token").sum())              # every trial token is a node
    assert meta["chosen_nodes"] == len(emitted(res))                          # the red path is the emitted text
    assert "<script>" not in tree.to_json()
    figs = figures_for(f, res.meta)
    assert "Cautious" in figs and "Token tree" in figs and "Adadec" not in figs


def test_adadec_view_and_tree(fake_registry):
    res = run("adadec", tau=0.5)
    check_view(adadec_figure(res.frame, res.meta), res, "lookahead")
    f = res.frame
    tree = token_tree(f)
    assert tree.layout.meta["token_nodes"] == int((f.kind == "token").sum())
    assert tree.layout.meta["chosen_nodes"] == len(emitted(res))
    figs = figures_for(f, res.meta)
    assert "Adadec" in figs and "Cautious" not in figs


def test_no_view_without_the_columns(fake_registry):
    lm = FakeLM(script)
    g = Run(lm, RunRequest(model=lm.key, strategy="greedy", prompt=" the", max_new_tokens=8)).run_to_end()
    assert cautious_figure(g.frame, g.meta) is None and adadec_figure(g.frame, g.meta) is None
