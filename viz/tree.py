"""The token tree: what the strategy explored, from the (branch_id, parent_id, step) edges of the trace.

Layout (x = step, the prompt is the root at x = -1; y grows downwards):
- every branch id gets a lane; a `token` row is a node on its branch's lane, linked to its parent (the latest
  row of branch `parent_id` before this step), so beams that fork or get reordered show as crossing edges;
- alternatives (`candidate` rows not taken, `prune` and `reject` rows) are small grey nodes in the slots below
  their branch's lane, hanging from the same parent as the token they competed with;
- the chosen sequence (see `viz.common.chosen_leaf`) is drawn as a red path with red-outlined nodes.
Labels are the escaped token text (cut to a few characters; the hover shows it whole). For long runs the view
opens on the first steps; drag to pan. `fig.layout.meta` holds the counts: nodes (root included), edges,
token_nodes, alternative_nodes, chosen_nodes.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from viz.common import (AXIS_TITLES, HIGHLIGHT, MUTED, PALETTE, chosen_leaf, cells, esc, fmt, has, parent_finder,
                        path_positions, rows_of, show_token, sorted_tokens, style)

ALTERNATIVE_KINDS = ("candidate", "prune", "reject")
CATEGORICAL = ("group", "model", "draft", "draft_pos", "branch_id", "kind", "accepted")
HOVER_COLUMNS = ("logprob", "entropy", "score", "penalty", "group", "model", "rank", "draft_pos")
LABEL_CHARS = 8
VISIBLE_STEPS = 16           # steps shown before panning
ROW_PX = 26                  # pixels per y unit
ROOT_X = -1                  # x of the prompt node


def token_tree(frame: pd.DataFrame, color_by: str = "logprob", max_alternatives: int | None = None) -> go.Figure:
    """Token tree of a run. color_by: a column of the token rows (numeric -> colour scale, categorical such as
    group / model / draft -> one legend entry per value); falls back to logprob, then to one colour.
    max_alternatives: candidate rows drawn per (step, branch); default 4 for up to 2 branches, else 2 (prune and
    reject rows are always drawn)."""
    tokens = sorted_tokens(frame).reset_index(drop=True)
    fig = go.Figure()
    if not len(tokens):
        fig.add_annotation(text="no token rows in this trace", showarrow=False, xref="paper", yref="paper")
        fig.layout.meta = {"nodes": 0, "edges": 0, "token_nodes": 0, "alternative_nodes": 0, "chosen_nodes": 0}
        return style(fig, "Token tree")
    find = parent_finder(tokens)
    parents = [find(p, s) for p, s in zip(cells(tokens, "parent_id"), tokens["step"])]
    chosen = set(path_positions(parents, chosen_leaf(tokens, frame)))

    alts = _alternatives(frame, max_alternatives)
    branches = sorted(set(_ints(tokens, "branch_id")) | set(_ints(alts, "branch_id")))
    lane = {b: i for i, b in enumerate(branches)}
    slots = int(alts.groupby(["step", "branch_id"], dropna=False).size().max()) if len(alts) else 0
    spacing = slots + 1

    tx = _ints(tokens, "step")
    ty = np.array([lane[b] * spacing for b in _ints(tokens, "branch_id")])
    ax = _ints(alts, "step")
    slot = alts.groupby(["step", "branch_id"], dropna=False).cumcount().to_numpy() if len(alts) else np.array([])
    ay = np.array([lane[b] * spacing + s + 1 for b, s in zip(_ints(alts, "branch_id"), slot)])
    alt_parents = [find(p, s) for p, s in zip(cells(alts, "parent_id"), alts["step"])]

    def xy(pos):  # position of a token node, or the root
        return (ROOT_X, 0) if pos < 0 else (tx[pos], ty[pos])

    chosen_edges = [(xy(parents[k]), (tx[k], ty[k])) for k in range(len(tokens)) if k in chosen]
    other_edges = [(xy(parents[k]), (tx[k], ty[k])) for k in range(len(tokens)) if k not in chosen]
    alt_edges = [(xy(p), (x, y)) for p, x, y in zip(alt_parents, ax, ay)]
    fig.add_trace(_edges(alt_edges, "alternative edges", MUTED, 1, "dot"))
    if len(branches) > 2:                     # many lanes: alternative edges only on demand (click the legend)
        fig.data[-1].visible = "legendonly"
    fig.add_trace(_edges(other_edges, "edges", "#6a8caf", 1.5, "solid"))
    fig.add_trace(_edges(chosen_edges, "chosen path", HIGHLIGHT, 3, "solid"))
    if len(alts):
        fig.add_trace(go.Scatter(x=ax, y=ay, mode="markers+text", name="alternatives", legendgroup="alternatives",
                                 marker={"size": 7, "color": MUTED, "symbol": "circle-open"},
                                 text=[show_token(t, LABEL_CHARS) for t in cells(alts, "token_text")],
                                 textposition="middle right", textfont={"size": 9, "color": "#999999"},
                                 hovertext=_hover(alts), hoverinfo="text"))
    _add_token_nodes(fig, tokens, tx, ty, chosen, color_by)
    fig.add_trace(go.Scatter(x=[ROOT_X], y=[0], mode="markers+text", name="prompt", showlegend=False,
                             marker={"size": 12, "color": "#333333", "symbol": "square"}, text=["prompt"],
                             textposition="middle left", hovertext=["the prompt (root)"], hoverinfo="text"))

    n_nodes = 1 + len(tokens) + len(alts)
    fig.layout.meta = {"nodes": n_nodes, "edges": len(chosen_edges) + len(other_edges) + len(alt_edges),
                       "token_nodes": len(tokens), "alternative_nodes": len(alts), "chosen_nodes": len(chosen)}
    y_max = max(ty.max(initial=0), ay.max(initial=0))
    x_max = int(max(tx.max(initial=0), ax.max(initial=0)))
    height = int(np.clip(150 + ROW_PX * (y_max + 2), 320, 1600))
    style(fig, "Token tree", "step", None, height=height)
    fig.update_xaxes(range=[ROOT_X - 1, min(x_max, VISIBLE_STEPS) + 1], dtick=1 if x_max <= 60 else 5,
                     zeroline=False)
    fig.update_yaxes(range=[y_max + 0.8, -1.0], showticklabels=len(branches) > 1, zeroline=False, showgrid=False,
                     tickvals=[lane[b] * spacing for b in branches], ticktext=[f"branch {b}" for b in branches])
    fig.update_layout(dragmode="pan", hovermode="closest")
    return fig


def _ints(df: pd.DataFrame, col: str) -> np.ndarray:
    """Integer column (missing column or NA -> 0)."""
    if col not in df.columns or not len(df):
        return np.zeros(len(df), dtype=int)
    return pd.to_numeric(df[col], errors="coerce").fillna(0).astype("int64").to_numpy()


def _alternatives(frame: pd.DataFrame, max_alternatives: int | None) -> pd.DataFrame:
    """Rows drawn as greyed alternatives: every prune and reject row, and the candidates not taken, at most
    max_alternatives of them per (step, branch), best rank first when there is a rank column."""
    alts = rows_of(frame, *ALTERNATIVE_KINDS)
    if not len(alts) or "step" not in alts.columns:
        return alts.iloc[0:0]
    if "accepted" in alts.columns:
        taken = (alts["kind"] == "candidate") & alts["accepted"].fillna(False).astype(bool)
        alts = alts[~taken]
    alts = alts.copy()
    if "branch_id" not in alts.columns:
        alts["branch_id"] = 0
    alts["branch_id"] = alts["branch_id"].fillna(0)
    alts = alts.sort_values(["step", "rank"] if has(alts, "rank") else ["step"], kind="stable")
    if max_alternatives is None:
        n_branches = rows_of(frame, "token")["branch_id"].nunique() if has(frame, "branch_id") else 1
        max_alternatives = 4 if n_branches <= 2 else 2
    is_candidate = alts["kind"] == "candidate"
    rank = alts[is_candidate].groupby(["step", "branch_id"], dropna=False).cumcount()
    keep = ~is_candidate
    keep[rank.index] = rank < max_alternatives
    return alts[keep.to_numpy()].reset_index(drop=True)


def _edges(pairs, name: str, color: str, width: float, dash: str) -> go.Scatter:
    """One line trace for many edges ((x0, y0), (x1, y1)), separated by None."""
    xs, ys = [], []
    for (x0, y0), (x1, y1) in pairs:
        xs += [x0, x1, None]
        ys += [y0, y1, None]
    return go.Scatter(x=xs, y=ys, mode="lines", name=name, hoverinfo="skip", showlegend=name != "edges",
                      line={"color": color, "width": width, "dash": dash})


def _hover(rows: pd.DataFrame) -> list[str]:
    """Hover text per row, every part escaped: the whole token, kind, step, branch, then the HOVER_COLUMNS
    present (logprob also as p)."""
    head = [f"<b>{show_token(t)}</b> (id {fmt(i)})<br>{esc(k)} · step {fmt(s)} · branch {fmt(b)} ← {fmt(p)}"
            for t, i, k, s, b, p in zip(*(cells(rows, c) for c in ("token_text", "token_id", "kind", "step",
                                                                      "branch_id", "parent_id")))]
    for c in HOVER_COLUMNS:
        if not has(rows, c):
            continue
        unit = " bits" if c == "entropy" else ""
        for k, v in enumerate(rows[c].tolist()):
            text = fmt(v)
            if text:
                head[k] += f"<br>{esc(c)}: {text}{unit}" + (f" (p={np.exp(float(v)):.3g})" if c == "logprob" else "")
    return head


def _add_token_nodes(fig: go.Figure, tokens: pd.DataFrame, tx, ty, chosen: set, color_by: str) -> None:
    """Token nodes: coloured by `color_by`, chosen ones outlined in red, labelled with the escaped text."""
    outline = {"color": [HIGHLIGHT if k in chosen else "white" for k in range(len(tokens))],
               "width": [2.5 if k in chosen else 1 for k in range(len(tokens))]}
    labels = [show_token(t, LABEL_CHARS) for t in cells(tokens, "token_text")]
    hover = _hover(tokens)
    common = {"mode": "markers+text", "textposition": "top center", "textfont": {"size": 11},
              "hoverinfo": "text"}
    col = color_by if has(tokens, color_by) else ("logprob" if has(tokens, "logprob") else None)
    categorical = col is not None and (col in CATEGORICAL or not pd.api.types.is_numeric_dtype(tokens[col])
                                       or pd.api.types.is_bool_dtype(tokens[col]))
    if col is None:
        fig.add_trace(go.Scatter(x=tx, y=ty, name="tokens", text=labels, hovertext=hover,
                                 marker={"size": 11, "color": PALETTE[0], "line": outline}, **common))
    elif not categorical:
        values = pd.to_numeric(tokens[col], errors="coerce").astype("float64")
        values = values.fillna(values.mean()).to_numpy()
        fig.add_trace(go.Scatter(x=tx, y=ty, name="tokens", text=labels, hovertext=hover,
                                 marker={"size": 11, "color": values, "colorscale": "Viridis", "showscale": True,
                                         "colorbar": {"title": {"text": esc(AXIS_TITLES.get(col, col))},
                                                      "thickness": 12},
                                         "line": outline}, **common))
    else:
        values = tokens[col].astype("object").where(tokens[col].notna(), None)
        for i, value in enumerate(pd.unique(values)):
            idx = np.flatnonzero((values == value).to_numpy() if value is not None else values.isna().to_numpy())
            fig.add_trace(go.Scatter(
                x=tx[idx], y=ty[idx], name=f"{esc(col)} {fmt(value) or '–'}", text=[labels[k] for k in idx],
                hovertext=[hover[k] for k in idx],
                marker={"size": 11, "color": PALETTE[i % len(PALETTE)],
                        "line": {"color": [outline["color"][k] for k in idx],
                                 "width": [outline["width"][k] for k in idx]}}, **common))
