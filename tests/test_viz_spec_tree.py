"""viz.spec_tree on real spec_tree traces of the scripted fake model: the draft tree drawn for a round is that
round's propose rows plus the root and the final token, the accepted path is the verifier's, the acceptance-by-depth
bars are the rates re-derived from the trace and TreeMetrics' acceptance_by_depth, tokens per round and tree sizes
follow the token and propose rows, model text is escaped, and every builder returns None on frames without its
columns (never raises). The generic figures (viz.figures_for) still build on spec_tree traces."""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import pytest

import viz
from declab.core.trace import to_frame
from declab.run import Run, RunRequest
from tests.fake import FakeLM, drafted_logits, hashed_logits, no_eos
from tests.test_viz import EVIL, by_name, chain_rows, fig_text, speculative_rows
from viz.common import HIGHLIGHT, fmt, show_token
from viz.mechanism import MECHANISMS
from viz.spec_tree import (FINAL_STYLE, NODE_STYLE, REJECTED, ROLLING_ROUNDS, UNVERIFIED, depth_acceptance,
                           depth_figure, draft_tree_figure, round_lengths, round_trees, rounds_figure,
                           spec_tree_figure)

BUILDERS = (spec_tree_figure, draft_tree_figure, depth_figure, rounds_figure)


def spec_run(prompt: str = " the cat", n: int = 30, **params):
    V = len(FakeLM().vocab)
    draft = FakeLM(no_eos(drafted_logits(V, 1.0)), key="fake-draft")
    target = FakeLM(no_eos(hashed_logits(V)))
    params = {"branching": 2, "tree_budget": 6, "measure_speedup": False, **params}
    res = Run(target, RunRequest(model="fake", strategy="spec_tree", prompt=prompt, max_new_tokens=n, params=params),
              models={"draft": draft}).run_to_end()
    assert res.status == "ok"
    return res.frame, res.meta


@pytest.fixture
def run(fake_registry):
    return spec_run()


def of_round(frame: pd.DataFrame, kind, rnd: int) -> pd.DataFrame:
    kinds = (kind,) if isinstance(kind, str) else kind
    return frame[frame["kind"].isin(kinds) & (frame["round"] == rnd)]


def round_traces(fig, rnd: int, part: str | None = None) -> list:
    return [t for t in fig.data if isinstance(t.meta, dict) and t.meta.get("round") == rnd
            and (part is None or t.meta.get("part") == part)]


def rederived_rates(frame: pd.DataFrame) -> dict[int, float]:
    """rounds whose path reached depth d / rounds whose path reached d-1 and drafted a node at depth d."""
    offered, reached = {}, {}
    for rnd in sorted(frame["round"].dropna().unique()):
        depths = set(of_round(frame, "propose", rnd)["depth"].astype(int))
        reach = int((of_round(frame, ("accept", "reject"), rnd)["verdict"] == "accepted").sum())
        for d in depths:
            if reach >= d - 1:
                offered[d] = offered.get(d, 0) + 1
                reached[d] = reached.get(d, 0) + (reach >= d)
    return {d: reached[d] / offered[d] for d in sorted(offered)}


# ------------------------------------------------------------------------------------------------ the draft tree
def test_round_zero_tree_is_the_rounds_nodes_plus_root_and_final_token(run):
    frame, meta = run
    fig = spec_tree_figure(frame, meta)
    proposals = of_round(frame, "propose", 0)
    decisions = of_round(frame, ("accept", "reject"), 0)
    tokens = of_round(frame, "token", 0)
    nodes = round_traces(fig, 0, "nodes")
    assert sum(len(t.x) for t in nodes) == len(proposals) + 2              # + the root + the bonus/resampled token
    assert fig.layout.meta["nodes_per_round"][0] == len(proposals) + 2
    drawn = {n: (x, t.meta["verdict"]) for t in nodes for n, x in zip(t.meta["nodes"], t.x)}
    for node, depth, verdict in zip(decisions["node"], decisions["depth"], decisions["verdict"]):
        assert drawn[int(node)] == (int(depth), verdict)                   # x = depth, grouped by the verdict
    # the accepted path: the accept rows = the accepted token rows, outlined in red, joined by the red path
    path = sorted(int(n) for n in decisions.loc[decisions["verdict"] == "accepted", "node"])
    accepted_tokens = tokens[tokens["origin"] == "accepted"]
    assert path == sorted(int(b) for b in accepted_tokens["node"]) == fig.layout.meta["path_per_round"][0]
    assert path, "round 0 of this trace accepts drafts"
    accepted = next(t for t in nodes if t.meta["verdict"] == "accepted")
    assert sorted(accepted.meta["nodes"]) == path and accepted.marker.line.color == HIGHLIGHT
    final_row = tokens[tokens["origin"].isin(["bonus", "resampled"])].iloc[-1]
    final = next(t for t in nodes if t.meta["nodes"] == ["final"])
    assert final.meta["verdict"] == final_row["origin"]
    assert final.marker.color == FINAL_STYLE[final_row["origin"]][0] and final.marker.symbol == "diamond"
    assert final.x[0] == int(final_row["depth"]) == len(path) + 1          # appended at the end of the path
    edges = round_traces(fig, 0, "path")[0]
    assert sum(v is None for v in edges.x) == len(path) + 1                 # root -> path nodes -> final token
    assert edges.line.color == HIGHLIGHT
    # rejected grey, unverified faint, as many as the trace says
    for verdict, colour in (("rejected", REJECTED), ("unverified", UNVERIFIED)):
        rows = decisions[decisions["verdict"] == verdict]
        traces = [t for t in nodes if t.meta["verdict"] == verdict]
        assert sum(len(t.x) for t in traces) == len(rows)
        assert all(t.marker.color == colour for t in traces)
    assert NODE_STYLE["unverified"][2] < 1                                   # faint
    # labels: the token texts, whitespace made visible; hover: node id, q, p, accept_prob, verdict
    texts = {int(n): t for n, t in zip(proposals["node"], proposals["token_text"])}
    labels = {n: lab for t in nodes for n, lab in zip(t.meta["nodes"], t.text)}
    for n, text in texts.items():
        assert labels[n] == show_token(text, 10)
    hover = {n: h for t in nodes for n, h in zip(t.meta["nodes"], t.hovertext)}
    first = decisions.iloc[0]
    h = hover[int(first["node"])]
    assert f"node {int(first['node'])}" in h and f"verdict: {first['verdict']}" in h
    assert f"q = {fmt(first['q'])}" in h and f"p = {fmt(first['p'])}" in h
    assert "accept_prob = " in h
    assert fig.layout.annotations[0].text.startswith("Round 0: ")


def test_every_round_on_the_slider_matches_its_rows(run):
    frame, meta = run
    fig = spec_tree_figure(frame, meta)
    rounds = sorted(frame["round"].dropna().astype(int).unique())
    assert fig.layout.meta["rounds"] == fig.layout.meta["rounds_total"] == len(rounds)
    steps = fig.layout.sliders[0].steps
    assert [s.label for s in steps] == [str(r) for r in rounds]
    for rnd, step in zip(rounds, steps):
        tokens = of_round(frame, "token", rnd)
        has_final = tokens["origin"].isin(["bonus", "resampled"]).any()
        assert fig.layout.meta["nodes_per_round"][rnd] == len(of_round(frame, "propose", rnd)) + 1 + has_final
        assert fig.layout.meta["path_per_round"][rnd] == \
            [int(b) for b in tokens.loc[tokens["origin"] == "accepted", "node"]]
        visible = step.args[0]["visible"]
        assert len(visible) == len(fig.data)
        for k, t in enumerate(fig.data):                                    # this round's tree, and the panels
            own = isinstance(t.meta, dict) and "round" in t.meta
            assert visible[k] == (not own or t.meta["round"] == rnd)
        assert step.args[1]["annotations[0].text"].startswith(f"Round {rnd}: ")
    assert all(t.visible for t in round_traces(fig, 0)) and not any(t.visible for t in round_traces(fig, 1))
    assert fig.layout.sliders[0].active == 0


def test_rounds_are_capped_and_the_title_says_so(run):
    frame, meta = run
    total = int(frame["round"].max()) + 1
    fig = spec_tree_figure(frame, meta, max_rounds=5)
    assert len(fig.layout.sliders[0].steps) == 5 and fig.layout.meta["rounds"] == 5
    assert f"first 5 of {total} rounds" in fig.layout.title.text
    assert not round_traces(fig, 5)
    assert "first 5 of" not in spec_tree_figure(frame, meta).layout.title.text
    alone = draft_tree_figure(frame, meta, max_rounds=5)
    assert len(alone.layout.sliders[0].steps) == 5 and f"first 5 of {total} rounds" in alone.layout.title.text


# ------------------------------------------------------------------------------------------------ panels
def test_acceptance_by_depth_is_the_rederived_rate_and_the_metric(run):
    frame, meta = run
    expected = rederived_rates(frame)
    metric = meta["metrics"]["acceptance_by_depth"]
    assert {int(d) for d in metric} == set(expected)
    for fig in (spec_tree_figure(frame, meta), depth_figure(frame, meta)):
        bars = by_name(fig, "acceptance by depth")
        assert list(bars.x) == list(expected)                               # every drafted depth was offered here
        assert list(bars.y) == pytest.approx([expected[d] for d in bars.x])
        assert list(bars.y) == pytest.approx([metric[str(d)] for d in bars.x], abs=5e-5)
        nodes = by_name(fig, "nodes drafted at depth d")
        proposals = frame[frame["kind"] == "propose"]
        assert list(nodes.y) == [int((proposals["depth"] == d).sum()) for d in nodes.x]
    assert spec_tree_figure(frame, meta).layout.meta["depth_rates"] == {str(d): r for d, r in expected.items()}


def test_tokens_per_round_against_time_and_tree_size(run):
    frame, meta = run
    fig = spec_tree_figure(frame, meta)
    tokens = frame[frame["kind"] == "token"]
    per_round = tokens.groupby("round")
    emitted = by_name(fig, "tokens emitted")
    assert list(emitted.y) == per_round.size().tolist()
    assert list(emitted.x) == pytest.approx(per_round["t_ms"].max().tolist())     # the round's end
    assert sum(emitted.y) == len(tokens)
    sizes = frame[frame["kind"] == "propose"].groupby("round").size()
    assert list(by_name(fig, "tree size (drafted nodes)").y) == [int(sizes.get(r, 0)) for r in per_round.size().index]
    assert not [t for t in fig.data if t.name and t.name.startswith("rolling")]     # model drafter: no table
    assert rounds_figure(frame, meta).data[0].y.tolist() == list(emitted.y)
    # without t_ms: the summed round_ms
    no_clock = frame.drop(columns="t_ms")
    table = round_lengths(no_clock)
    assert table["end_ms"].tolist() == pytest.approx(per_round["round_ms"].max().cumsum().tolist())


def test_table_drafter_shows_its_rolling_acceptance(fake_registry):
    frame, meta = spec_run(n=60, drafter="token_recycling", tree_budget=8)
    fig = spec_tree_figure(frame, meta)
    rolling = by_name(fig, f"rolling acceptance (last {ROLLING_ROUNDS} rounds)")
    table = round_lengths(frame)
    acc, drafted = table["accepted"], table["tree_size"]
    k = len(table) - 1
    lo = max(0, k - ROLLING_ROUNDS + 1)
    assert rolling.y[-1] == pytest.approx(acc[lo:].sum() / drafted[lo:].sum())
    finite = np.asarray(rolling.y, dtype=float)
    assert np.nanmin(finite) >= 0 and np.nanmax(finite) <= 1
    assert "table fill-up" in fig.layout.annotations[2].text
    assert by_name(fig, "acceptance by depth").y == pytest.approx(
        [meta["metrics"]["acceptance_by_depth"][str(d)] for d in by_name(fig, "acceptance by depth").x], abs=5e-5)


# ------------------------------------------------------------------------------------------------ escaping
def test_hostile_model_text_is_escaped(fake_registry):
    frame, meta = spec_run(prompt=" the cat " + EVIL)
    assert frame["token_text"].astype(str).str.contains("<script>").any()        # the draft proposes it
    # and everything else hostile too: drafts, final tokens and roots, the drafter name in the title
    hostile = frame.copy()
    hostile["token_text"] = [EVIL if i % 3 == 0 else (' "q" & <b>x</b>' if i % 3 == 1 else "\n")
                             for i in range(len(hostile))]
    meta = dict(meta, params=dict(meta["params"], drafter=EVIL, verify="<b>v</b>"))
    for f in (frame, hostile):
        for build in BUILDERS:
            dumped = fig_text(build(f, meta))
            assert "<script>" not in dumped and "<b>x" not in dumped and "<b>v" not in dumped, build.__name__
    dumped = fig_text(spec_tree_figure(hostile, meta))
    assert "&lt;script&gt;" in dumped and "&#34;q&#34; &amp; &lt;b&gt;x" in dumped and "↵" in dumped
    nodes = [t for t in spec_tree_figure(frame, meta).data if isinstance(t.meta, dict)
             and t.meta.get("part") == "nodes"]
    assert any("&lt;scri" in lab for t in nodes for lab in t.text)
    assert any("&lt;script&gt;alert(1)&lt;/script&gt;" in h for t in nodes for h in t.hovertext)


# ------------------------------------------------------------------------------------------------ missing columns
def test_none_without_the_columns_and_never_raises(run):
    frame, meta = run
    for build in BUILDERS:
        assert build(frame.drop(columns="round"), meta) is None, build.__name__
        assert build(to_frame(chain_rows(5)), meta) is None, build.__name__
        assert build(to_frame([]), meta) is None, build.__name__
        assert build(pd.DataFrame({"kind": ["token"], "step": [0]}), None) is None, build.__name__
    assert spec_tree_figure(frame.drop(columns="origin"), meta) is None
    assert depth_figure(frame[frame["kind"] != "propose"], meta) is None
    assert depth_acceptance(frame[frame["kind"] == "token"]) is None and round_trees(to_frame([]))[0] == []
    for col in frame.columns:                                               # drop any column: None or a figure
        dropped = frame.drop(columns=col)
        spec_tree_figure(dropped, meta, max_rounds=4)                       # every panel (a few rounds: fast)
        depth_figure(dropped, meta)
        rounds_figure(dropped, meta)
    for build in BUILDERS:                                                  # empty cells everywhere
        build(frame.assign(node=None, depth=None, parent_id=None, verdict=None, token_text=None, t_ms=None), meta)
        build(frame.head(3), {})
    assert spec_tree_figure(frame[frame["kind"] != "token"], meta) is None      # no token rows: no rounds emitted
    bare = spec_tree_figure(frame[frame["kind"] != "propose"], meta)             # no drafts: root + final token
    assert bare is not None and set(bare.layout.meta["nodes_per_round"]) == {2}


# ------------------------------------------------------------------------------------------------ registry
def test_registered_as_the_spec_tree_mechanism_and_figures_for_builds(run, caplog):
    frame, meta = run
    assert MECHANISMS["spec_tree"][1] is spec_tree_figure
    assert "spec_tree" in viz.mechanism_figures(frame, meta)
    assert "spec_tree" not in viz.mechanism_figures(to_frame(speculative_rows()), {"strategy": "speculative"})
    with caplog.at_level(logging.ERROR, logger="viz.figures"):
        figs = viz.figures_for(frame, meta)
    assert not [r for r in caplog.records if r.name == "viz.figures"], caplog.text
    assert {"Token tree", "Spec tree"} <= set(figs)
    tree = figs["Token tree"].layout.meta                                   # the generic tree still builds
    assert tree["token_nodes"] == int((frame["kind"] == "token").sum())
    page = viz.html_report(meta, frame)
    assert "<h3>Spec tree</h3>" in page and "<script>alert" not in page


@pytest.mark.parametrize("params", [dict(temperature=1.0, verify="multi_round", branching=3),
                                    dict(temperature=1.0, verify="spectr"), dict(temperature=1.0, verify="rsd"),
                                    dict(drafter="aded", mcts_iterations=20), dict(drafter="lookahead"),
                                    dict(drafter="prompt_lookup"), dict(branching=1, tree_budget=4)])
def test_other_drafters_and_verifiers_draw_their_trees(fake_registry, params):
    frame, meta = spec_run(prompt=" the cat sat on the mat the cat", n=24, **params)
    fig = spec_tree_figure(frame, meta)
    drawn = zip(fig.layout.meta["nodes_per_round"], fig.layout.meta["path_per_round"])
    for rnd, (n_nodes, path) in enumerate(drawn):
        tokens = of_round(frame, "token", rnd)
        final = tokens["origin"].isin(["bonus", "resampled"]).any()
        assert n_nodes == len(of_round(frame, "propose", rnd)) + 1 + final
        assert path == [int(b) for b in tokens.loc[tokens["origin"] == "accepted", "node"]]
    metric = meta["metrics"]["acceptance_by_depth"]
    rates = fig.layout.meta["depth_rates"]
    assert set(rates) == set(metric) and rates == pytest.approx(metric, abs=5e-5)
    assert rates == pytest.approx({str(d): r for d, r in rederived_rates(frame).items()})
    bars = by_name(fig, "acceptance by depth")                              # a depth never offered: no bar
    assert [str(d) for d, y in zip(bars.x, bars.y) if not math.isnan(y)] == list(rates)
    if params.get("temperature"):                                         # the stochastic tests' u in the hover
        hovers = [h for t in fig.data if isinstance(t.meta, dict) and t.meta.get("part") == "nodes"
                  for h in t.hovertext]
        assert any("u = 0." in h for h in hovers)
