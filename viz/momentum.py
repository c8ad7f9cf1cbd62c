"""Momentum decoding's mechanism view: the walk on the token graph, and the steps where resistance overrode greedy.

Top panel, an arc diagram of the token graph (docs/strategies.md#momentum): one node per distinct generated token, placed
left to right in order of first visit; node size = visits in the generation. Each step is an edge from the previous
token to the chosen one, coloured by the chosen token's repeat length l (`repeat_len`):
- l = 0, a new node (grey, below the axis);
- l = 1, a revisit over a new edge: the walk closes a new loop (orange arc above);
- l >= 2, the n-gram repeats: the walk goes round a loop it already closed (red arc, thicker for longer l).
Nodes that were already in the prompt at their first generated visit, or that the generation revisits, are marked.

Bottom panel, per step: p of the model's top-1 and p of the chosen token (`p_top1`, `p`), with the steps where the
top-1 was overridden (`overridden`) marked; hover shows what was overridden, its l and R.
Needs the token-row columns `repeat_len` (and `p`, `p_top1`, `overridden`, `rank` when present).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from viz.common import HIGHLIGHT, PALETTE, chosen_path, fmt, has, num, rows_of, show_token, style

NEW, LOOP, REPEAT = "#9a9a9a", "#ff7f0e", HIGHLIGHT


def _arc(x0: float, x1: float, up: bool, n: int = 24) -> tuple[list, list]:
    """A half-ellipse from x0 to x1 (above the axis when up), height proportional to the span; ends with None."""
    t = np.linspace(0.0, np.pi, n)
    mid, half = (x0 + x1) / 2.0, (x1 - x0) / 2.0
    xs = mid - half * np.cos(t)
    ys = (1 if up else -1) * (0.15 + 0.5 * np.sqrt(abs(half))) * np.sin(t)
    return xs.tolist() + [None], ys.tolist() + [None]


def momentum_figure(frame: pd.DataFrame, meta: dict | None = None) -> go.Figure | None:
    path = chosen_path(frame)
    if not has(path, "repeat_len", "token_id"):
        return None
    path = path[path["token_id"].notna()]
    ids = [int(t) for t in path["token_id"]]
    texts = path["token_text"].tolist() if "token_text" in path else [str(t) for t in ids]
    steps = num(path["step"])
    lengths = np.nan_to_num(num(path["repeat_len"]))
    in_prompt = (path["revisit"].fillna(False).astype(bool).tolist() if has(path, "revisit")
                 else [length > 0 for length in lengths])

    order: dict[int, int] = {}
    visits: dict[int, list[int]] = {}
    prompt_node: dict[int, bool] = {}
    for i, t in enumerate(ids):
        if t not in order:
            order[t] = len(order)
            prompt_node[t] = bool(in_prompt[i])
        visits.setdefault(t, []).append(int(steps[i]))
    text_of = {t: texts[i] for i, t in reversed(list(enumerate(ids)))}

    fig = make_subplots(rows=2, cols=1, row_heights=[0.58, 0.42], vertical_spacing=0.12,
                        subplot_titles=["Token graph (nodes left to right in order of first visit): loops above, new nodes below",
                                        "Where resistance overrode greedy"])
    arcs = {"new": ([], [], []), "loop": ([], [], []), "repeat": ([], [], [])}
    for i in range(1, len(ids)):
        x0, x1 = order[ids[i - 1]], order[ids[i]]
        kind = "new" if lengths[i] == 0 else ("loop" if lengths[i] == 1 else "repeat")
        if kind == "new" and x1 == x0 + 1:
            xs, ys = [x0, x1, None], [0.0, 0.0, None]          # the common case: a straight step to a new node
        else:
            xs, ys = _arc(min(x0, x1), max(x0, x1) if x0 != x1 else x0 + 0.6, up=kind != "new")
        arcs[kind][0].extend(xs)
        arcs[kind][1].extend(ys)
    styles = {"new": (NEW, 1.0, "edge to a new node (l = 0)"),
              "loop": (LOOP, 1.6, "closes a loop (l = 1)"),
              "repeat": (REPEAT, 2.4, "repeats an n-gram (l ≥ 2)")}
    for kind, (xs, ys, _) in arcs.items():
        if xs:
            color, width, name = styles[kind]
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=name, hoverinfo="skip",
                                     line={"color": color, "width": width}, opacity=0.75), row=1, col=1)
    nodes = list(order)
    counts = np.array([len(visits[t]) for t in nodes])
    colors = [REPEAT if len(visits[t]) > 1 else (LOOP if prompt_node[t] else PALETTE[0]) for t in nodes]
    hover = [f"{show_token(text_of[t], 40)}<br>visits: {len(visits[t])} (steps "
             f"{', '.join(str(s) for s in visits[t][:12])}{'…' if len(visits[t]) > 12 else ''})"
             f"{'<br>already in the prompt' if prompt_node[t] else ''}" for t in nodes]
    labelled = len(nodes) <= 60                                   # beyond that, labels only on hover
    fig.add_trace(go.Scatter(x=[order[t] for t in nodes], y=[0.0] * len(nodes),
                             mode="markers+text" if labelled else "markers",
                             name="token (red: revisited, orange: from the prompt)",
                             text=[show_token(text_of[t], 10) for t in nodes] if labelled else None,
                             textposition="top center", textfont={"size": 9}, hovertext=hover, hoverinfo="text",
                             marker={"size": 7 + 3 * np.sqrt(counts), "color": colors,
                                     "line": {"color": "#333333", "width": 0.5}}), row=1, col=1)
    fig.update_yaxes(visible=False, row=1, col=1)
    fig.update_xaxes(visible=False, row=1, col=1)

    x = steps
    if has(path, "p_top1"):
        fig.add_trace(go.Scatter(x=x, y=num(path["p_top1"]), mode="lines", name="p of the model's top-1",
                                 line={"color": "#7f7f7f", "dash": "dot"}), row=2, col=1)
    if has(path, "p"):
        hov = [f"step {int(s)}: {show_token(t, 30)}<br>p = {fmt(p)}, l = {fmt(int(length))}"
               for s, t, p, length in zip(steps, texts, num(path["p"]), lengths)]
        fig.add_trace(go.Scatter(x=x, y=num(path["p"]), mode="lines+markers", name="p of the chosen token",
                                 line={"color": PALETTE[0]}, marker={"size": 4}, hovertext=hov, hoverinfo="text"),
                      row=2, col=1)
        if has(path, "overridden"):
            over = path["overridden"].fillna(False).astype(bool).to_numpy()
            if over.any():
                top1 = _top1_rows(frame)
                hov = []
                for _, r in path[over].iterrows():
                    t1 = top1.get(int(r["step"]))
                    what = (f"overrode {show_token(t1['token_text'], 30)} (p = {fmt(t1['p'])}, "
                            f"l = {fmt(t1['repeat_len'])}, R = {fmt(t1['resistance'])})") if t1 else "overrode the top-1"
                    hov.append(f"step {int(r['step'])}: chose {show_token(r.get('token_text'), 30)} "
                               f"(rank {fmt(r.get('rank'))})<br>{what}")
                fig.add_trace(go.Scatter(x=x[over], y=num(path["p"])[over], mode="markers",
                                         name=f"top-1 overridden ({int(over.sum())} of {len(over)} steps)",
                                         marker={"symbol": "x", "size": 10, "color": HIGHLIGHT},
                                         hovertext=hov, hoverinfo="text"), row=2, col=1)
    fig.update_yaxes(title_text="p", row=2, col=1)
    fig.update_xaxes(title_text="step", row=2, col=1)
    return style(fig, "Momentum decoding: graph walk and resistance", height=640, legend_right=True)


def _top1_rows(frame: pd.DataFrame) -> dict[int, dict]:
    """step -> the rank-0 candidate row (token_text, p, repeat_len, resistance), when candidates were traced."""
    cands = rows_of(frame, "candidate")
    if not has(cands, "rank", "repeat_len"):
        return {}
    top = cands[pd.to_numeric(cands["rank"], errors="coerce") == 0]
    return {int(r["step"]): {k: r.get(k) for k in ("token_text", "p", "repeat_len", "resistance")}
            for _, r in top.iterrows()}
