"""Mechanism view of tree speculative decoding (strategies/spec_tree.py; docs/strategies.md#spec_tree).

One figure, three panels (`spec_tree_figure`; each panel also alone: `draft_tree_figure`, `depth_figure`,
`rounds_figure`):
- The draft tree of a round (top): x = depth (0 = the root, the last emitted token), y = the siblings laid out
  leaf by leaf (a parent sits in the middle of its children). Nodes are labelled with their token text (escaped,
  whitespace made visible); accepted nodes are green and joined to the root by the red accepted path, rejected
  nodes grey, unverified ones (never reached) faint, and the token the target added at the end of the path is
  a diamond: bonus (blue: the path ended on a node without children) or resampled (orange: the last path node's
  children were all rejected). Hover: node id, parent, q, p, the acceptance probability, u, verdict, cum ln q,
  multiplicity. A slider steps through the rounds (the first MAX_ROUNDS; the title says so when the run had more).
- Acceptance by depth (bottom left): bars = rounds whose accepted path reached depth d / rounds whose path reached
  d-1 and that drafted a node at depth d, re-derived from the trace (the same rule as TreeMetrics'
  acceptance_by_depth); line (right axis) = nodes drafted at depth d over the run.
- Tokens per round against time (bottom right): x = the round's end (t_ms of its last token row, else the summed
  round_ms), y = tokens emitted that round (the bonus / resampled one included) and the drafted tree size; for the
  table-based drafters (token_recycling, aded, lookahead) the rolling acceptance (accepted / drafted nodes over the
  last ROLLING_ROUNDS rounds, right axis) shows their tables filling up.

Reads: `propose` rows (round, depth, parent_id, node or branch_id), `accept`/`reject` rows (round, node, verdict,
p, accept_prob, u), `token` rows (round, origin, parent_id; t_ms or round_ms). Every builder returns None when the
rows it draws are missing. `fig.layout.meta` holds what was drawn: rounds, rounds_total, nodes_per_round (root and
final token included), path_per_round (accepted node ids), depth_rates ({depth: rate}, the depths some round
was offered, as TreeMetrics).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from viz.common import HIGHLIGHT, PALETTE, cells, esc, fmt, has, meta_params, num, rows_of, show_token, style

MAX_ROUNDS = 60                    # rounds on the slider
ROLLING_ROUNDS = 10                # window of the rolling acceptance
TABLE_DRAFTERS = ("token_recycling", "aded", "lookahead")
LABEL_CHARS = 10
LEAF_PX = 34                       # pixels per leaf of the tallest drawn tree
ACCEPTED, REJECTED, UNVERIFIED = "#2ca02c", "#8c8c8c", "#d0d0d0"
NODE_STYLE = {   # verdict -> (marker colour, symbol, opacity, legend name)
    "accepted": (ACCEPTED, "circle", 1.0, "accepted"),
    "rejected": (REJECTED, "circle", 1.0, "rejected"),
    "unverified": (UNVERIFIED, "circle-open", 0.7, "unverified (not reached)"),
}
FINAL_STYLE = {"bonus": ("#1f77b4", "bonus token"), "resampled": ("#ff7f0e", "resampled by the target")}


# ------------------------------------------------------------------------------------------------ data
def _round_of(rows: pd.DataFrame) -> np.ndarray:
    return num(rows["round"]) if "round" in rows.columns else np.full(len(rows), np.nan)


def _node_ids(rows: pd.DataFrame) -> np.ndarray:
    return num(rows["node"]) if has(rows, "node") else num(cells(rows, "branch_id"))


def _decisions(frame: pd.DataFrame) -> pd.DataFrame:
    rows = rows_of(frame, "accept", "reject")
    return rows[~np.isnan(_round_of(rows))] if len(rows) and "round" in rows.columns else rows.iloc[0:0]


def _verdicts(decisions: pd.DataFrame) -> pd.Series:
    """The verdict of each decision row: the `verdict` column, else accepted / rejected from the row kind."""
    kind = decisions["kind"].map({"accept": "accepted", "reject": "rejected"})
    if "verdict" in decisions.columns:
        return decisions["verdict"].astype("object").where(decisions["verdict"].notna(), kind)
    return kind


def _accepted(decisions: pd.DataFrame) -> pd.Series:
    """True for the decision rows whose verdict is accepted."""
    return _verdicts(decisions).astype("string").eq("accepted").fillna(False).astype(bool)


PROPOSE_COLUMNS = ("token_text", "token_id", "q", "cum_logq", "multiplicity", "source", "rank")
DECISION_COLUMNS = ("p", "accept_prob", "u")
TOKEN_COLUMNS = ("node", "origin", "token_text", "token_id", "logprob")


def _records(rows: pd.DataFrame, columns) -> list[dict]:
    """The rows as plain dicts of the given columns (missing column or NA -> None)."""
    values = {c: [None if v is None or (not isinstance(v, str) and pd.isna(v)) else v
                  for v in cells(rows, c).tolist()] for c in columns}
    return [dict(zip(values, vs)) for vs in zip(*values.values())] if columns else []


def _by_round(rows: pd.DataFrame, columns, **numbers: np.ndarray) -> dict[int, list[dict]]:
    """round -> the rows of that round as records (in trace order), with the given numeric columns added."""
    out: dict[int, list[dict]] = {}
    for rec, rnd, *nums in zip(_records(rows, columns), _round_of(rows), *numbers.values()):
        if not np.isnan(rnd):
            rec.update(zip(numbers, nums))
            out.setdefault(int(rnd), []).append(rec)
    return out


def round_trees(frame: pd.DataFrame, max_rounds: int = MAX_ROUNDS) -> tuple[list[dict], int]:
    """([tree of each of the first max_rounds rounds], number of rounds in the trace). A tree: round, nodes (dicts:
    id (0 = root, 'final' = the token the target added), parent, depth, text, verdict, x, y and the hover columns),
    path (accepted node ids in order), origin (bonus / resampled / None), leaves, drafted."""
    tokens = rows_of(frame, "token")
    if not has(tokens, "round", "origin"):
        return [], 0
    proposals = rows_of(frame, "propose")
    proposals = proposals if has(proposals, "round", "depth") else proposals.iloc[0:0]
    decisions = _decisions(frame)
    emitted = _by_round(tokens, TOKEN_COLUMNS)
    drafted = _by_round(proposals, PROPOSE_COLUMNS, node=_node_ids(proposals),
                        parent=num(cells(proposals, "parent_id")), depth=num(cells(proposals, "depth")))
    decided: dict[tuple[int, int], dict] = {}
    if len(decisions):
        verdicts = _verdicts(decisions).tolist()
        for rnd, recs in _by_round(decisions.assign(_verdict=verdicts), DECISION_COLUMNS + ("_verdict",),
                                   node=_node_ids(decisions)).items():
            for rec in recs:
                if not np.isnan(rec["node"]):
                    decided[(rnd, int(rec["node"]))] = rec
    rounds = sorted(set(emitted) | set(drafted))
    out = []
    for i, rnd in enumerate(rounds[:max_rounds]):
        before = emitted.get(rounds[i - 1], []) if i else []
        root_text = before[-1]["token_text"] if before else None
        out.append(_one_tree(rnd, drafted.get(rnd, []), emitted.get(rnd, []), decided, root_text))
    return out, len(rounds)


def _one_tree(rnd: int, proposals: list[dict], emitted: list[dict], decided: dict, root_text) -> dict:
    root = {"id": 0, "parent": None, "depth": 0, "text": root_text, "verdict": "root"}
    nodes = {0: root}
    for row in proposals:
        node, parent, depth = row["node"], row["parent"], row["depth"]
        if np.isnan(node) or int(node) in nodes:
            continue
        d = decided.get((rnd, int(node)), {})
        verdict = d.get("_verdict")
        nodes[int(node)] = dict({c: row[c] for c in PROPOSE_COLUMNS}, **{c: d.get(c) for c in DECISION_COLUMNS},
                                id=int(node), parent=0 if np.isnan(parent) else int(parent),
                                depth=1 if np.isnan(depth) else int(depth), text=row["token_text"],
                                verdict=verdict if isinstance(verdict, str) else "unverified")
    for n in nodes.values():                                   # orphans (parent not drafted) hang from the root
        if n["id"] and n["parent"] not in nodes or n["parent"] == n["id"]:
            n["parent"] = 0
    if any((rnd, u) in decided for u in nodes):                # the verifier's verdicts give the path
        path = sorted((u for u, n in nodes.items() if n["verdict"] == "accepted"), key=lambda u: nodes[u]["depth"])
    else:                                                      # else the accepted token rows (their `node`)
        path = [int(r["node"]) for r in emitted
                if r["origin"] == "accepted" and r.get("node") is not None and not pd.isna(r["node"])
                and int(r["node"]) in nodes]
    finals = [r for r in emitted if r["origin"] in FINAL_STYLE]
    origin = None
    if finals:
        row = finals[-1]
        origin = str(row["origin"])
        parent = path[-1] if path else 0
        nodes["final"] = {"id": "final", "parent": parent, "depth": nodes[parent]["depth"] + 1,
                          "text": row["token_text"], "token_id": row["token_id"], "logprob": row["logprob"],
                          "verdict": origin}
    leaves = _layout(nodes)
    return {"round": rnd, "nodes": list(nodes.values()), "path": path, "origin": origin, "leaves": leaves,
            "drafted": len(nodes) - 1 - (origin is not None)}


def _layout(nodes: dict) -> int:
    """x = depth; y = leaf order (depth-first, children by node id, the final token last), a parent in the middle
    of its first and last child. Returns the number of leaves."""
    children: dict = {u: [] for u in nodes}
    for u, n in nodes.items():
        if n["parent"] is not None:
            children[n["parent"]].append(u)
    for u in children:
        children[u].sort(key=lambda c: (c == "final", c if c != "final" else 0))
    leaf = 0
    order, stack, seen = [], [0], set()
    while stack:                                               # pre-order, then place bottom-up
        u = stack.pop()
        if u in seen:
            continue
        seen.add(u)
        order.append(u)
        stack.extend(reversed(children[u]))
    for u in order:                                            # pre-order visits leaves top to bottom
        if not children[u]:
            nodes[u]["y"] = float(leaf)
            leaf += 1
    for u in reversed(order):
        kids = [c for c in children[u] if "y" in nodes[c]]
        if kids:
            nodes[u]["y"] = (nodes[kids[0]]["y"] + nodes[kids[-1]]["y"]) / 2
        nodes[u]["x"] = nodes[u]["depth"]
    for n in nodes.values():                                   # unreachable (a cycle in odd data): below the rest
        if "y" not in n:
            n["x"], n["y"] = n["depth"], float(leaf)
            leaf += 1
    return max(leaf, 1)


def depth_acceptance(frame: pd.DataFrame) -> pd.DataFrame | None:
    """Per depth d: offered (rounds whose path reached d-1 and that drafted a node at depth d), reached (of those,
    rounds whose path reached d), rate = reached / offered, nodes (nodes drafted at depth d). None without
    propose rows (round, depth) and accept/reject rows (round)."""
    proposals = rows_of(frame, "propose")
    decisions = _decisions(frame)
    if not has(proposals, "round", "depth") or not len(decisions):
        return None
    reach = _accepted(decisions).groupby(_round_of(decisions)).sum()
    p_round, p_depth = _round_of(proposals), num(proposals["depth"])
    ok = ~np.isnan(p_round) & ~np.isnan(p_depth)
    p_round, p_depth = p_round[ok].astype(int), p_depth[ok].astype(int)
    offered: dict[int, int] = {}
    reached: dict[int, int] = {}
    for rnd in sorted(set(p_round)):
        r = int(reach.get(float(rnd), 0))
        for d in set(p_depth[p_round == rnd]):
            if r >= d - 1:
                offered[d] = offered.get(d, 0) + 1
                reached[d] = reached.get(d, 0) + (r >= d)
    depths = sorted(set(p_depth))
    if not depths:
        return None
    out = pd.DataFrame({"depth": depths, "offered": [offered.get(d, 0) for d in depths],
                        "reached": [reached.get(d, 0) for d in depths],
                        "nodes": [int((p_depth == d).sum()) for d in depths]})
    out["rate"] = np.where(out["offered"] > 0, out["reached"] / out["offered"].where(out["offered"] > 0, 1), np.nan)
    return out


def round_lengths(frame: pd.DataFrame) -> pd.DataFrame | None:
    """Per round: emitted (token rows), end_ms (t_ms of its last token row, else the summed round_ms), tree_size
    (drafted nodes), accepted (accepted nodes), rolling (accepted / drafted over the last ROLLING_ROUNDS rounds).
    None without token rows carrying round."""
    tokens = rows_of(frame, "token")
    if not has(tokens, "round"):
        return None
    t_round = _round_of(tokens)
    tokens = tokens[~np.isnan(t_round)]
    t_round = t_round[~np.isnan(t_round)]
    grouped = tokens.groupby(t_round)
    out = pd.DataFrame({"round": grouped.size().index.astype(int), "emitted": grouped.size().to_numpy()})
    if has(tokens, "t_ms"):
        out["end_ms"] = pd.to_numeric(tokens["t_ms"], errors="coerce").groupby(t_round).max().to_numpy()
        out["time"] = "t_ms"
    elif has(tokens, "round_ms"):
        out["end_ms"] = pd.to_numeric(tokens["round_ms"], errors="coerce").fillna(0).groupby(t_round).sum() \
            .cumsum().to_numpy()
        out["time"] = "round_ms"
    else:
        out["end_ms"], out["time"] = np.nan, None
    proposals = rows_of(frame, "propose")
    sizes = proposals.groupby(_round_of(proposals)).size() if has(proposals, "round") else pd.Series(dtype=float)
    out["tree_size"] = [int(sizes.get(float(r), 0)) for r in out["round"]]
    decisions = _decisions(frame)
    acc = (_accepted(decisions).groupby(_round_of(decisions)).sum() if len(decisions)
           else pd.Series(dtype=float))
    out["accepted"] = [int(acc.get(float(r), 0)) for r in out["round"]]
    drafted = out["tree_size"].rolling(ROLLING_ROUNDS, min_periods=1).sum()
    out["rolling"] = (out["accepted"].rolling(ROLLING_ROUNDS, min_periods=1).sum() / drafted.where(drafted > 0))
    return out


# ------------------------------------------------------------------------------------------------ panels
def _hover(n: dict, rnd: int) -> str:
    head = f"<b>{show_token(n.get('text'), 40)}</b>"
    if n["id"] == 0:
        return f"{head}<br>round {rnd}: the root (the last emitted token{'' if rnd else '; here the prompt'})"
    if n["id"] == "final":
        what = "bonus token (every draft on the path accepted)" if n["verdict"] == "bonus" else \
            "resampled by the target (its children rejected)"
        return (f"{head} (id {fmt(n.get('token_id'))})<br>round {rnd}, depth {n['depth']}: {what}"
                f"<br>target logprob {fmt(n.get('logprob'))}")
    return (f"{head} (id {fmt(n.get('token_id'))})<br>round {rnd} · node {n['id']} ← parent {n['parent']} · depth "
            f"{n['depth']}<br>q = {fmt(n.get('q'))}, p = {fmt(n.get('p'))}, accept_prob = {fmt(n.get('accept_prob'))}"
            f", u = {fmt(n.get('u'))}<br>verdict: {esc(n['verdict'])}<br>cum ln q = {fmt(n.get('cum_logq'))}, "
            f"multiplicity {fmt(n.get('multiplicity'))}, rank {fmt(n.get('rank'))}, source {fmt(n.get('source'))}")


def _label(n: dict) -> str:
    if n["id"] == 0 and (n.get("text") is None or pd.isna(n.get("text"))):
        return "prompt"
    return show_token(n.get("text"), LABEL_CHARS)


def _tree_traces(tree: dict) -> list[dict]:
    """The traces of one round (plain dicts: plotly validates them once, when they are added): edges, the accepted
    path, nodes by verdict, the final token, the root."""
    nodes = {n["id"]: n for n in tree["nodes"]}
    rnd = tree["round"]
    on_path = set(tree["path"]) | ({"final"} if "final" in nodes else set())
    edges, path_edges = ([], []), ([], [])
    for n in nodes.values():
        if n["parent"] is None:
            continue
        par = nodes[n["parent"]]
        xs, ys = path_edges if n["id"] in on_path else edges
        xs += [par["x"], n["x"], None]
        ys += [par["y"], n["y"], None]
    meta = {"round": rnd}
    out = [dict(type="scatter", x=edges[0], y=edges[1], mode="lines", name="draft edges", showlegend=False,
                hoverinfo="skip", line={"color": "#c7d3e3", "width": 1.5}, meta=dict(meta, part="edges")),
           dict(type="scatter", x=path_edges[0], y=path_edges[1], mode="lines", name="accepted path",
                hoverinfo="skip", line={"color": HIGHLIGHT, "width": 3}, meta=dict(meta, part="path"))]
    for verdict, (color, symbol, opacity, name) in NODE_STYLE.items():
        group = [n for n in nodes.values() if n["id"] not in (0, "final") and
                 (n["verdict"] == verdict or verdict == "unverified" and n["verdict"] not in NODE_STYLE)]
        if not group:
            continue
        accepted = verdict == "accepted"
        out.append(dict(type="scatter", x=[n["x"] for n in group], y=[n["y"] for n in group], mode="markers+text",
                        name=name, text=[_label(n) for n in group], textposition="top center",
                        textfont={"size": 11, "color": "#222222" if accepted else "#888888"},
                        hovertext=[_hover(n, rnd) for n in group], hoverinfo="text", opacity=opacity,
                        marker={"color": color, "symbol": symbol, "size": 13 if accepted else 10,
                                "line": {"color": HIGHLIGHT if accepted else color, "width": 2 if accepted else 1}},
                        meta=dict(meta, part="nodes", verdict=verdict, nodes=[n["id"] for n in group])))
    if "final" in nodes:
        n = nodes["final"]
        color, name = FINAL_STYLE.get(n["verdict"], (PALETTE[0], esc(n["verdict"])))
        out.append(dict(type="scatter", x=[n["x"]], y=[n["y"]], mode="markers+text", name=name, text=[_label(n)],
                        textposition="top center", textfont={"size": 11, "color": color},
                        hovertext=[_hover(n, rnd)], hoverinfo="text",
                        marker={"color": color, "symbol": "diamond", "size": 14,
                                "line": {"color": HIGHLIGHT, "width": 2}},
                        meta=dict(meta, part="nodes", verdict=n["verdict"], nodes=["final"])))
    root = nodes[0]
    out.append(dict(type="scatter", x=[root["x"]], y=[root["y"]], mode="markers+text",
                    name="root (last emitted token)", text=[_label(root)], textposition="middle left",
                    textfont={"size": 11}, hovertext=[_hover(root, rnd)], hoverinfo="text",
                    marker={"color": "#333333", "symbol": "square", "size": 12},
                    meta=dict(meta, part="nodes", verdict="root", nodes=[0])))
    return out


def _caption(tree: dict) -> str:
    final = next((n for n in tree["nodes"] if n["id"] == "final"), None)
    tail = (f" + {esc(tree['origin'])} “{show_token(final.get('text'), 20)}”" if final is not None else "")
    return (f"Round {tree['round']}: {tree['drafted']} drafted nodes, {len(tree['path'])} accepted{tail}")


def _add_tree(fig: go.Figure, trees: list[dict], total: int, row: int, col: int) -> dict:
    """The rounds' trees on (row, col), the first one visible; returns the slider and what was drawn."""
    spans, traces = [], []
    for i, tree in enumerate(trees):
        first = len(fig.data) + len(traces)
        for tr in _tree_traces(tree):
            traces.append(dict(tr, visible=i == 0, legendgroup=tr["name"]))
        spans.append((first, len(fig.data) + len(traces)))
    fig.add_traces(traces, rows=[row] * len(traces), cols=[col] * len(traces))
    max_leaves = max(t["leaves"] for t in trees)
    max_depth = max(max(n["x"] for n in t["nodes"]) for t in trees)
    fig.update_xaxes(range=[-0.6, max_depth + 0.6], dtick=1, tickvals=list(range(max_depth + 1)),
                     ticktext=["root"] + [f"depth {d}" for d in range(1, max_depth + 1)], zeroline=False,
                     showgrid=False, row=row, col=col)
    fig.update_yaxes(range=[max_leaves - 0.4, -0.8], showticklabels=False, zeroline=False, showgrid=False,
                     row=row, col=col)
    return {"trees": trees, "total": total, "max_leaves": max_leaves, "spans": spans}


def _slider(fig: go.Figure, drawn: dict, **position) -> dict:
    """One step per drawn round: that round's tree traces visible, every other panel's traces kept, the tree
    panel's title (annotations[0]) set to the round's caption. Built once every trace is in the figure."""
    own = {k for a, b in drawn["spans"] for k in range(a, b)}
    steps = []
    for tree, (a, b) in zip(drawn["trees"], drawn["spans"]):
        visible = [a <= k < b if k in own else True for k in range(len(fig.data))]
        steps.append({"method": "update", "label": str(tree["round"]),
                      "args": [{"visible": visible}, {"annotations[0].text": _caption(tree)}]})
    n, total = len(drawn["trees"]), drawn["total"]
    prefix = "round " if n == total else f"round (first {n} of {total}) "
    return dict({"active": 0, "steps": steps, "currentvalue": {"prefix": prefix, "font": {"size": 12}},
                 "pad": {"t": 8, "b": 4}, "len": 1.0, "x": 0, "xanchor": "left"}, **position)


def _add_depth(fig: go.Figure, depths: pd.DataFrame, row: int, col: int) -> None:
    hover = [f"depth {d}: {r} of {o} rounds that reached depth {d - 1} with a node at depth {d}"
             f"<br>rate {fmt(rate)} · {n} nodes drafted at this depth"
             for d, r, o, rate, n in zip(depths["depth"], depths["reached"], depths["offered"], depths["rate"],
                                         depths["nodes"])]
    fig.add_trace(go.Bar(x=depths["depth"].to_numpy(), y=depths["rate"].to_numpy(), name="acceptance by depth",
                         marker_color=ACCEPTED, text=[fmt(v, 2) for v in depths["rate"]], textposition="outside",
                         hovertext=hover, hoverinfo="text", meta={"part": "depth"}),
                  row=row, col=col, secondary_y=False)
    fig.add_trace(go.Scatter(x=depths["depth"].to_numpy(), y=depths["nodes"].to_numpy(), mode="lines+markers",
                             name="nodes drafted at depth d", line={"color": PALETTE[3], "dash": "dot"},
                             hovertext=hover, hoverinfo="text", meta={"part": "depth_nodes"}),
                  row=row, col=col, secondary_y=True)
    fig.update_xaxes(title_text="depth d", dtick=1, row=row, col=col)
    fig.update_yaxes(title_text="acceptance rate", range=[0, 1.15], row=row, col=col, secondary_y=False)
    fig.update_yaxes(title_text="nodes drafted", range=[0, 1.15 * max(1, int(depths["nodes"].max()))],
                     tickmode="auto", showgrid=False, row=row, col=col, secondary_y=True)


def _add_rounds(fig: go.Figure, rounds: pd.DataFrame, table: bool, row: int, col: int) -> None:
    timed = rounds["end_ms"].notna().any()
    x = rounds["end_ms"].to_numpy() if timed else rounds["round"].to_numpy()
    hover = [f"round {r}: {e} tokens emitted, {a} of {s} drafted nodes accepted<br>ends at {fmt(t)} ms"
             for r, e, a, s, t in zip(rounds["round"], rounds["emitted"], rounds["accepted"], rounds["tree_size"],
                                      rounds["end_ms"])]
    fig.add_trace(go.Scatter(x=x, y=rounds["emitted"].to_numpy(), mode="lines+markers", name="tokens emitted",
                             line={"color": ACCEPTED, "shape": "vh"}, hovertext=hover, hoverinfo="text",
                             meta={"part": "emitted"}), row=row, col=col, secondary_y=False)
    fig.add_trace(go.Scatter(x=x, y=rounds["tree_size"].to_numpy(), mode="lines", name="tree size (drafted nodes)",
                             line={"color": "#9aa9bd", "dash": "dot", "shape": "vh"}, hovertext=hover, hoverinfo="text",
                             meta={"part": "tree_size"}), row=row, col=col, secondary_y=False)
    if table:
        fig.add_trace(go.Scatter(x=x, y=rounds["rolling"].to_numpy(), mode="lines",
                                 name=f"rolling acceptance (last {ROLLING_ROUNDS} rounds)",
                                 line={"color": PALETTE[1], "width": 2.5}, meta={"part": "rolling"}),
                      row=row, col=col, secondary_y=True)
        fig.update_yaxes(title_text="accepted / drafted", range=[0, 1.05], tickmode="auto", showgrid=False,
                         row=row, col=col, secondary_y=True)
    time = rounds["time"].iloc[0] if "time" in rounds else None
    fig.update_xaxes(title_text=("time (ms, end of round)" if time == "t_ms" else "time (ms, summed round_ms)")
                     if timed else "round", row=row, col=col)
    fig.update_yaxes(title_text="tokens / nodes", rangemode="tozero", row=row, col=col, secondary_y=False)


def _drafter(meta: dict | None) -> str:
    params = meta_params(meta)
    metrics = (meta or {}).get("metrics") or {}
    name = params.get("drafter") or "?"
    model = metrics.get("drafter") if isinstance(metrics, dict) else None
    verify = params.get("verify")
    parts = [esc(name) + (f" ({esc(model)})" if model and model != name else "")]
    if verify:
        parts.append(f"verify {esc(verify)}")
    for key in ("tree_budget", "tree_depth", "branching"):
        if params.get(key) is not None:
            parts.append(f"{key} {fmt(params[key])}")
    return ", ".join(parts)


def _is_table(meta: dict | None) -> bool:
    return meta_params(meta).get("drafter") in TABLE_DRAFTERS


def _meta(trees: list[dict], total: int, depths: pd.DataFrame | None) -> dict:
    return {"rounds": len(trees), "rounds_total": total,
            "nodes_per_round": [len(t["nodes"]) for t in trees],
            "path_per_round": [list(t["path"]) for t in trees],
            "depth_rates": {} if depths is None else      # as TreeMetrics: depths some round was offered
            {str(int(d)): float(r) for d, r in zip(depths["depth"], depths["rate"]) if not pd.isna(r)}}


# ------------------------------------------------------------------------------------------------ figures
def spec_tree_figure(frame: pd.DataFrame, meta: dict | None = None, max_rounds: int = MAX_ROUNDS) -> go.Figure | None:
    """The draft tree of each round (slider), acceptance by depth, tokens per round against time; None without
    spec_tree token rows (round, origin)."""
    trees, total = round_trees(frame, max_rounds)
    if not trees:
        return None
    depths, rounds = depth_acceptance(frame), round_lengths(frame)
    tree_px = int(np.clip(90 + LEAF_PX * max(t["leaves"] for t in trees), 300, 1400))
    bottom_px = 340
    titles = [_caption(trees[0]), "Acceptance by depth" + ("" if depths is not None else " (no data)"),
              "Tokens per round" + (" and table fill-up" if _is_table(meta) else "")]
    fig = make_subplots(rows=2, cols=2, row_heights=[tree_px, bottom_px], vertical_spacing=130 / (tree_px + bottom_px),
                        horizontal_spacing=0.12, subplot_titles=titles,
                        specs=[[{"colspan": 2}, None], [{"secondary_y": True}, {"secondary_y": True}]])
    drawn = _add_tree(fig, trees, total, 1, 1)
    if depths is not None:
        _add_depth(fig, depths, 2, 1)
    if rounds is not None:
        _add_rounds(fig, rounds, _is_table(meta), 2, 2)
    capped = f" · first {len(trees)} of {total} rounds" if total > len(trees) else ""
    style(fig, f"Tree speculative decoding: draft trees round by round{capped}<br><sup>{_drafter(meta)}</sup>",
          height=tree_px + bottom_px + 230, legend_right=True)
    fig.update_layout(sliders=[_slider(fig, drawn, y=fig.layout.yaxis.domain[0] - 0.02, yanchor="top")],
                      hovermode="closest", bargap=0.35, margin={"t": 95})
    fig.layout.meta = _meta(trees, total, depths)
    return fig


def draft_tree_figure(frame: pd.DataFrame, meta: dict | None = None, max_rounds: int = MAX_ROUNDS) -> go.Figure | None:
    """The draft tree panel alone (slider over the rounds)."""
    trees, total = round_trees(frame, max_rounds)
    if not trees:
        return None
    fig = make_subplots(rows=1, cols=1, subplot_titles=[_caption(trees[0])])
    drawn = _add_tree(fig, trees, total, 1, 1)
    capped = f" · first {len(trees)} of {total} rounds" if total > len(trees) else ""
    style(fig, f"Draft trees round by round{capped}<br><sup>{_drafter(meta)}</sup>",
          height=int(np.clip(260 + LEAF_PX * drawn["max_leaves"], 420, 1600)), legend_right=True)
    fig.update_layout(sliders=[_slider(fig, drawn)], hovermode="closest", margin={"t": 95})
    fig.layout.meta = _meta(trees, total, None)
    return fig


def depth_figure(frame: pd.DataFrame, meta: dict | None = None) -> go.Figure | None:
    """Acceptance by depth alone."""
    depths = depth_acceptance(frame)
    if depths is None:
        return None
    fig = make_subplots(rows=1, cols=1, specs=[[{"secondary_y": True}]])
    _add_depth(fig, depths, 1, 1)
    return style(fig, f"Acceptance by depth ({_drafter(meta)})", height=380)


def rounds_figure(frame: pd.DataFrame, meta: dict | None = None) -> go.Figure | None:
    """Tokens per round against time alone (with the rolling acceptance for table-based drafters)."""
    rounds = round_lengths(frame)
    if rounds is None:
        return None
    fig = make_subplots(rows=1, cols=1, specs=[[{"secondary_y": True}]])
    _add_rounds(fig, rounds, _is_table(meta), 1, 1)
    return style(fig, f"Tokens per round ({_drafter(meta)})", height=380)
