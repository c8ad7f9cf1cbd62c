"""viz: every figure built from small hand-written traces, checked for what it shows (traces, counts, axis titles,
threshold lines, escaping), plus one real run on the scripted fake model. No rendering, no real model."""

from __future__ import annotations

import json
import math
import random

import pandas as pd
import plotly.graph_objects as go
import pytest

import viz
from declab.core.trace import to_frame
from viz.common import chosen_path, link_parents, show_token, sorted_tokens
from viz.mechanism import collisions_per_step

EVIL = "<script>alert(1)</script>"


# ------------------------------------------------------------------------------------------------ frames
def chain_rows(n: int = 6, strategy: str = "sample", texts=None, alternatives: int = 3, **extra_cols) -> list[dict]:
    """A single chain like strategies/chain.py writes: per step one token row (+ fwd_ms/sel_ms) and candidates."""
    texts = texts or [f" w{i}" for i in range(n)]
    rows, t = [], 0.0
    for s in range(n):
        t += 10.0
        cols = {k: (v[s] if isinstance(v, list) else v) for k, v in extra_cols.items()}
        rows.append(dict(run_id="r", strategy=strategy, step=s, kind="token", branch_id=0, parent_id=0,
                         position=3 + s, token_id=100 + s, token_text=texts[s], logprob=-0.5 - 0.1 * s,
                         entropy=1.0 + 0.2 * s, score=-0.5 - 0.1 * s, model="m", accepted=True, t_ms=t, dt_ms=8.0,
                         fwd_ms=6.0, sel_ms=2.0, **cols))
        for r in range(alternatives):
            rows.append(dict(run_id="r", strategy=strategy, step=s, kind="candidate", branch_id=0, parent_id=0,
                             position=3 + s, token_id=100 + s if r == 0 else 200 + r, token_text=texts[s] if r == 0
                             else f" alt{r}", logprob=-0.5 - r, entropy=1.0 + 0.2 * s, model="m", accepted=r == 0,
                             t_ms=t + 0.1, rank=r))
    return rows


def beam_rows(num_beams: int = 8, steps: int = 40, candidates: int = 2, groups: int = 4, seed: int = 0) -> list[dict]:
    """Diverse-beam-like trace: beams reordered every step (parent = a random beam of the previous step) in `groups`
    groups, a penalty per token row, `candidates` candidate rows per beam and one prune row per step."""
    rng = random.Random(seed)
    rows, score = [], [0.0] * num_beams
    for s in range(steps):
        new_score = []
        for b in range(num_beams):
            p = rng.randrange(num_beams) if s else 0
            lp = -rng.random() * 3
            new_score.append(score[p] + lp)
            tok = rng.randrange(5) if b % 2 else 7          # odd beams collide often
            rows.append(dict(run_id="r", strategy="diverse_beam", step=s, kind="token", branch_id=b, parent_id=p,
                             position=4 + s, token_id=tok, token_text=f" t{s}.{b}", logprob=lp,
                             entropy=rng.random() * 4, score=new_score[-1], model="m", accepted=True,
                             t_ms=5.0 * s + b * 0.1, group=b // (num_beams // groups),
                             penalty=0.5 * (b // (num_beams // groups)), fwd_ms=3.0 if b == 0 else None))
            for c in range(candidates):
                rows.append(dict(run_id="r", strategy="diverse_beam", step=s, kind="candidate", branch_id=b,
                                 parent_id=p, token_id=300 + c, token_text=f" c{c}", logprob=lp - 1 - c,
                                 model="m", accepted=False, rank=c + 1, t_ms=5.0 * s + b * 0.1))
        rows.append(dict(run_id="r", strategy="diverse_beam", step=s, kind="prune", branch_id=0, parent_id=0,
                         token_id=999, token_text=" pruned", logprob=-9.0, model="m", accepted=False, t_ms=5.0 * s))
        score = new_score
    return rows


def speculative_rows() -> list[dict]:
    """3 rounds of 4 drafted tokens: accepted lengths 4, 1, 2; draft_ms/verify_ms on the round's first row."""
    rows, step = [], 0
    for rnd, n_acc in enumerate([4, 1, 2]):
        for pos in range(4):
            if pos > n_acc:
                break
            kind = "accept" if pos < n_acc else "reject"
            rows.append(dict(run_id="r", strategy="speculative", step=step, kind=kind, token_id=pos,
                             token_text=f"d{pos}", model="draft", accepted=kind == "accept", t_ms=10.0 * step,
                             round=rnd, draft_pos=pos, draft_ms=4.0 if pos == 0 else None,
                             verify_ms=6.0 if pos == 0 else None))
            if kind == "accept":
                rows.append(dict(run_id="r", strategy="speculative", step=step, kind="token", branch_id=0,
                                 parent_id=0, token_id=pos, token_text=f"d{pos}", logprob=-0.3, entropy=1.0,
                                 model="target", accepted=True, t_ms=10.0 * step + 1, round=rnd))
                step += 1
    return rows


def trace_names(fig: go.Figure) -> list[str]:
    return [t.name for t in fig.data]


def by_name(fig: go.Figure, name: str):
    return next(t for t in fig.data if t.name == name)


def fig_text(fig: go.Figure) -> str:
    return json.dumps(fig.to_plotly_json(), default=str, ensure_ascii=False)


# ------------------------------------------------------------------------------------------------ tree
def test_chain_tree_counts_and_chosen_path():
    frame = to_frame(chain_rows(6, alternatives=3))
    fig = viz.token_tree(frame)
    m = fig.layout.meta
    # 6 tokens + 2 alternatives per step (the taken candidate is the token itself) + the prompt root
    assert m["token_nodes"] == 6 and m["alternative_nodes"] == 12
    assert m["nodes"] == 1 + 6 + 12 and m["edges"] == m["nodes"] - 1
    assert m["chosen_nodes"] == 6
    chosen = by_name(fig, "chosen path")
    assert sum(1 for v in chosen.x if v is None) == 6                   # 6 red edges, one per chain token
    assert list(by_name(fig, "tokens").x) == [0, 1, 2, 3, 4, 5]
    assert fig.layout.xaxis.title.text == "step"
    assert fig.layout.title.text == "Token tree"


def test_tree_labels_are_escaped():
    texts = [" a", EVIL, ' "q" & \'s\'', "\n", " <b>x</b>", "=1+1"]
    frame = to_frame(chain_rows(6, texts=texts))
    fig = viz.token_tree(frame)
    dumped = fig_text(fig)
    assert "<script>" not in dumped and "<b>x" not in dumped
    assert "&lt;script&gt;" in dumped
    tokens = by_name(fig, "tokens")
    assert tokens.text[1].startswith("&lt;scri")                        # the label (cut to 8 characters)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in tokens.hovertext[1]  # the whole token in the hover
    assert tokens.text[3] == "↵"
    assert "&#34;q&#34; &amp; &#x27;s&#x27;" in tokens.hovertext[2]    # quotes as numeric entities plotly decodes
    assert show_token(None) == "" and show_token("   ") == "␣␣␣" and show_token("\x01") == "\\x01"


def test_beam_tree_8x40_layout_and_group_colours():
    frame = to_frame(beam_rows(num_beams=8, steps=40, candidates=2))
    fig = viz.token_tree(frame, color_by="group")
    m = fig.layout.meta
    assert m["token_nodes"] == 320
    assert m["alternative_nodes"] == 40 * 8 * 2 + 40                 # 2 candidates per beam (cap 2) + the prunes
    assert m["edges"] == m["nodes"] - 1
    assert 1 <= m["chosen_nodes"] <= 40
    # one node trace per group, in the legend
    assert [n for n in trace_names(fig) if n.startswith("group")] == ["group 0", "group 1", "group 2", "group 3"]
    # readable: no two nodes share a position, the view opens on the first steps, height grows with the lanes
    xy = []
    for t in fig.data:
        if t.mode and "markers" in t.mode:
            xy += list(zip(t.x, t.y))
    assert len(xy) == len(set(xy)) == m["nodes"]
    assert fig.layout.xaxis.range[1] <= 20 and fig.layout.dragmode == "pan"
    assert 600 <= fig.layout.height <= 1600
    assert len(fig.layout.yaxis.tickvals) == 8


def test_tree_parents_follow_branch_and_parent_ids():
    # step 0: beams 0,1 from the prompt; step 1: beam 0 <- 1, beam 1 <- 1 (beam 0 died); step 2: beam 0 <- 0
    rows = [dict(step=0, kind="token", branch_id=0, parent_id=0, token_text="a", score=-1.0),
            dict(step=0, kind="token", branch_id=1, parent_id=0, token_text="b", score=-2.0),
            dict(step=1, kind="token", branch_id=0, parent_id=1, token_text="c", score=-3.0),
            dict(step=1, kind="token", branch_id=1, parent_id=1, token_text="d", score=-2.5),
            dict(step=2, kind="token", branch_id=0, parent_id=0, token_text="e", score=-4.0),
            dict(step=2, kind="token", branch_id=1, parent_id=1, token_text="f", score=-3.5)]
    frame = to_frame(rows)
    tokens = sorted_tokens(frame)
    assert link_parents(tokens) == [-1, -1, 1, 1, 2, 3]
    assert list(chosen_path(frame)["token_text"]) == ["b", "d", "f"]     # best score at the last step
    frame = to_frame(rows + [dict(step=2, kind="finish", branch_id=0, score=0.0)])
    assert list(chosen_path(frame)["token_text"]) == ["b", "c", "e"]     # a finish row names the winner
    fig = viz.token_tree(frame)
    assert fig.layout.meta["nodes"] == 7 and fig.layout.meta["chosen_nodes"] == 3


def test_tree_without_tokens_and_without_optional_columns():
    empty = to_frame([dict(step=0, kind="candidate", token_text="x")])
    assert viz.token_tree(empty).layout.meta["nodes"] == 0
    bare = to_frame([dict(step=s, kind="token", token_text=f"t{s}") for s in range(3)])   # no ids, no logprob
    fig = viz.token_tree(bare, color_by="nonexistent")
    assert fig.layout.meta["token_nodes"] == 3 and fig.layout.meta["chosen_nodes"] == 3


# ------------------------------------------------------------------------------------------------ entropy / latency
def test_entropy_figure_surprise_in_bits_thresholds_and_switches():
    rows = chain_rows(5, strategy="mirostat")
    rows.append(dict(step=2, kind="switch", model="large", token_text=None))
    frame = to_frame(rows)
    fig = viz.entropy_figure(frame, {"strategy": "mirostat", "params": {"tau": 3.0, "eta": 0.1}})
    assert trace_names(fig) == ["entropy (bits)", "surprise −log₂p (bits)", "model switch"]
    surprise = by_name(fig, "surprise −log₂p (bits)").y
    assert surprise[0] == pytest.approx(0.5 / math.log(2))
    assert [s.y0 for s in fig.layout.shapes] == [3.0]                   # the tau line
    assert "τ target surprise" in fig.layout.annotations[0].text
    assert list(by_name(fig, "model switch").x) == [2]
    assert by_name(fig, "model switch").hovertext[0] == "switch to large"
    assert fig.layout.xaxis.title.text == "step" and fig.layout.yaxis.title.text == "bits"
    # no threshold for a strategy without one; ead's is its threshold param
    assert not viz.entropy_figure(frame, {"strategy": "sample", "params": {"tau": 3.0}}).layout.shapes
    ead = viz.entropy_figure(frame, {"strategy": "ead", "params": {"threshold": 2.5}})
    assert [s.y0 for s in ead.layout.shapes] == [2.5]
    assert not viz.entropy_figure(frame, {"strategy": "ead", "params": {"tau": 2.0}}).layout.shapes   # not ead's
    assert viz.entropy_figure(to_frame([dict(step=0, kind="token")])) is None


def test_latency_figure_stacks_time_columns_and_throughput():
    frame = to_frame(chain_rows(4))
    fig = viz.latency_figure(frame)
    assert trace_names(fig) == ["fwd_ms", "sel_ms", "other (wall − parts)", "tokens/s so far"]
    assert fig.layout.barmode == "stack"
    assert list(by_name(fig, "fwd_ms").y) == [6.0] * 4
    assert list(by_name(fig, "other (wall − parts)").y) == pytest.approx([2.1, 2.0, 2.0, 2.0])  # 10 ms/step - 8
    assert by_name(fig, "tokens/s so far").y[-1] == pytest.approx(4 / 0.0401)
    assert fig.layout.yaxis.title.text == "time per step (ms)" and fig.layout.yaxis2.title.text == "tokens/s"
    spec = viz.latency_figure(to_frame(speculative_rows()))
    assert {"draft_ms", "verify_ms"} <= set(trace_names(spec))
    assert viz.latency_figure(to_frame([dict(step=0, kind="token")])) is None   # no timing at all


def test_compare_figure_shared_axes_and_missing_columns():
    a, b = to_frame(chain_rows(5)), to_frame(chain_rows(3))
    fig = viz.compare_figure({"greedy": a, EVIL: b}, "entropy")
    assert len(fig.data) == 2 and [len(t.y) for t in fig.data] == [5, 3]
    assert fig.layout.yaxis.title.text == "entropy (bits)"
    assert "<script>" not in fig_text(fig) and fig.data[1].name.startswith("&lt;script")
    surprise = viz.compare_figure({"a": a}, "surprise")                # derived from logprob
    assert surprise.data[0].y[0] == pytest.approx(0.5 / math.log(2))
    missing = viz.compare_figure({"a": a, "b": to_frame(chain_rows(2)).drop(columns="dt_ms")}, "dt_ms")
    assert len(missing.data) == 1 and "no dt_ms in: b" in missing.layout.title.text


# ------------------------------------------------------------------------------------------------ acceptance
def test_acceptance_none_without_accept_rows():
    assert viz.acceptance_figure(to_frame(chain_rows(4))) is None


def test_acceptance_speculative_panels():
    fig = viz.acceptance_figure(to_frame(speculative_rows()))
    titles = [a.text for a in fig.layout.annotations]
    assert titles[:3] == ["Accepted tokens per round", "Acceptance by draft position",
                          "Rolling acceptance rate (last 20 decisions)"]
    assert list(by_name(fig, "accepted per round").y) == [4, 1, 2]
    # position 0: 3 accepts; 1: accept, reject, accept; 2: accept, reject; 3: accept
    assert list(by_name(fig, "acceptance by position").y) == pytest.approx([1.0, 2 / 3, 0.5, 1.0])
    assert by_name(fig, "rolling acceptance").y[-1] == pytest.approx(7 / 9)
    assert fig.layout.xaxis.title.text == "round" and fig.layout.yaxis2.title.text == "acceptance rate"


def test_acceptance_masked_mass_and_model_share():
    grammar = to_frame(chain_rows(4, strategy="gcd", masked_mass=[0.1, 0.5, 0.0, 0.9]))
    fig = viz.acceptance_figure(grammar)
    assert trace_names(fig) == ["masked mass"] and list(fig.data[0].y) == [0.1, 0.5, 0.0, 0.9]
    rows = chain_rows(4, strategy="ead")
    for r, model in zip([r for r in rows if r["kind"] == "token"], ["small", "large", "large", "small"]):
        r["model"] = model
    fig = viz.acceptance_figure(to_frame(rows))
    assert trace_names(fig) == ["share large", "share small"]
    assert list(by_name(fig, "share large").y) == pytest.approx([0, 0.5, 2 / 3, 0.5])
    assert viz.tree_color(to_frame(rows)) == "model"


# ------------------------------------------------------------------------------------------------ mechanisms
def test_mirostat_mechanism():
    n = 6
    frame = to_frame(chain_rows(n, strategy="mirostat", mu=[6.0, 5.5, 5.2, 5.0, 4.9, 4.8],
                                mu_after=[5.5, 5.2, 5.0, 4.9, 4.8, 4.7], surprise=[4.0, 2.0, 3.0, 3.0, 1.0, 5.0],
                                k=[10, 8, 7, 7, 6, 5]))
    figs = viz.mechanism_figures(frame, {"strategy": "mirostat", "params": {"tau": 3.0}})
    assert list(figs) == ["mirostat"]
    fig = figs["mirostat"]
    assert trace_names(fig) == ["μ before step", "μ after update", "observed surprise S_t", "running mean of S_t",
                                "k (tokens kept)"]
    assert list(by_name(fig, "running mean of S_t").y) == pytest.approx([4.0, 3.0, 3.0, 3.0, 2.6, 3.0])
    assert [s.y0 for s in fig.layout.shapes] == [3.0]
    assert fig.layout.yaxis.title.text == "bits"


def test_diverse_beam_mechanism_and_collisions():
    rows = [dict(step=0, kind="token", branch_id=b, parent_id=0, group=g, penalty=p, token_id=t, token_text="x")
            for b, g, p, t in [(0, 0, 0.0, 5), (1, 0, 0.0, 6), (2, 1, 0.5, 5), (3, 1, 0.0, 7), (4, 2, 1.0, 5),
                               (5, 2, 0.5, 6)]]
    frame = to_frame(rows)
    assert collisions_per_step(sorted_tokens(frame)).tolist() == [3]   # beams 2, 4, 5 repeat an earlier group
    fig = viz.mechanism_figures(frame, {})["diverse_beam"]
    assert trace_names(fig) == ["group 0", "group 1", "group 2", "collisions"]
    assert list(by_name(fig, "group 2").y) == [1.5]
    big = to_frame(beam_rows())
    assert set(viz.figures_for(big, {"strategy": "diverse_beam"})) == {"Token tree", "Entropy", "Latency",
                                                                       "Diverse beam"}


def test_no_mechanism_for_plain_chain():
    assert viz.mechanism_figures(to_frame(chain_rows(3)), {"strategy": "sample"}) == {}


# ------------------------------------------------------------------------------------------------ figures_for / report
def test_figures_for_order_and_degrades():
    frame = to_frame(chain_rows(5, strategy="mirostat", mu=5.0, surprise=3.0))
    figs = viz.figures_for(frame, {"strategy": "mirostat", "params": {"tau": 3.0}})
    assert list(figs) == ["Token tree", "Entropy", "Latency", "Mirostat"]
    assert all(f.layout.title.text for f in figs.values())
    assert viz.figures_for(to_frame([]), {}) == {}
    minimal = to_frame([dict(step=0, kind="token", token_text="a"), dict(step=1, kind="token", token_text="b")])
    assert list(viz.figures_for(minimal, None)) == ["Token tree"]
    odd = pd.DataFrame({"kind": ["token", "accept"], "step": [0, 0]})   # not even the base columns
    assert isinstance(viz.figures_for(odd, {}), dict)


def test_figures_for_never_fails_on_a_missing_column(caplog):
    # one frame with every kind of row the figures read (chain + mirostat + grammar, drafts, beams, a switch)
    rows = (chain_rows(3, strategy="mirostat", mu=5.0, surprise=3.0, masked_mass=0.1) + speculative_rows()
            + [dict(r, step=r["step"] + 20) for r in beam_rows(2, 2, candidates=1, groups=2)]
            + [dict(step=1, kind="switch", model="large")])
    frame = to_frame(rows)
    meta = {"strategy": "mirostat", "params": {"tau": 3.0}}
    assert {"Token tree", "Entropy", "Latency", "Acceptance", "Diverse beam"} <= set(viz.figures_for(frame, meta))
    for col in frame.columns:
        viz.figures_for(frame.drop(columns=col), meta)
    viz.figures_for(frame.assign(step=None, token_text=None, logprob=None, branch_id=None), meta)
    assert not [r for r in caplog.records if r.name == "viz.figures"], caplog.text


def test_html_report_self_contained_and_escaped():
    frame = to_frame(chain_rows(4, texts=[" a", EVIL, " b", "\n"]))
    meta = {"run_id": "r1", "strategy": "sample", "model": "m", "status": "ok", "seed": 0, "prompt": "say " + EVIL,
            "params": {"temperature": 1.0, "note": EVIL}, "metrics": {"perplexity": 2.5},
            "sequences": [{"text": " a" + EVIL + " b\n", "token_ids": [1, 2, 3], "score": -1.5}],
            "versions": {"declab": "0.1.0"}, "error": None}
    page = viz.html_report(meta, frame)
    assert "<script>alert" not in page
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 3      # prompt, text, params
    assert page.startswith("<!DOCTYPE html>") and "Plotly.newPlot" in page
    assert page.count("plotly.js v") >= 1 and "cdn.plot.ly" not in page.split("Plotly.newPlot")[0][-2000:]
    for label in ("Token tree", "Entropy", "Latency"):
        assert f"<h3>{label}</h3>" in page
    assert "perplexity" in page and "temperature" in page


def test_figures_for_every_registered_strategy_on_the_fake_model(fake_registry, tmp_path):
    from tests.fake import FakeLM
    from declab.run import Run, RunRequest
    from declab.core import STRATEGIES, get_strategy
    get_strategy("greedy")                                              # registers all
    assert {"greedy", "sample"} <= set(STRATEGIES)
    for strategy in STRATEGIES:
        result = Run(FakeLM(), RunRequest(model="fake", strategy=strategy, prompt=" the cat", max_new_tokens=12,
                                          seed=3)).run_to_end()
        figs = viz.figures_for(result.frame, result.meta)
        assert list(figs)[:3] == ["Token tree", "Entropy", "Latency"], strategy
        tree = figs["Token tree"].layout.meta
        assert tree["token_nodes"] == int((result.frame["kind"] == "token").sum()), strategy
        # the highlighted path is the strategy's best sequence (a chain also shows its final EOS token)
        path = [int(t) for t in chosen_path(result.frame)["token_id"]]
        best = result.meta["sequences"][0]["token_ids"]
        assert path[:len(best)] == best and len(path) - len(best) in (0, 1), strategy
        assert tree["chosen_nodes"] == len(path)
        page = viz.html_report(result.meta, result.frame)
        assert "<script>alert" not in page
        (tmp_path / f"{strategy}.html").write_text(page, encoding="utf-8")


def test_cli_html_report(fake_registry, tmp_path, capsys):
    from declab.cli import main
    out = tmp_path / "run.html"
    assert main(["run", "--strategy", "greedy", "--prompt", " the cat <script>alert(1)</script>",
                 "--max-new-tokens", "6", "--html", str(out), "--quiet"]) == 0
    page = out.read_text(encoding="utf-8")
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<h3>Token tree</h3>" in page
    assert main(["run", "--strategy", "greedy", "--prompt", "x", "--html", str(tmp_path / "no" / "r.html")]) == 2
    assert "folder does not exist" in capsys.readouterr().err
