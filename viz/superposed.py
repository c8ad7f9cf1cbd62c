"""Superposed decoding's mechanism view: the draft lattice over steps with the superposition weights.

Top panel, the lattice: x = step, y = draft slot (0 at the top). One node per alive draft per step (`token` rows:
branch_id = slot, parent_id = the slot it came from), labelled with its token; node size and colour = the draft's
superposition weight omega_d (`weight`: its share of the single input embedding fed at the next step). An edge joins
each node to its parent slot at the previous step, so drafts that swap slots or fork from one parent show as
crossing or splitting edges. Nodes on a fallback step (no n-gram hit, `fallback`) are drawn with a black ring; hover
shows the token, LP_d, omega_d, the n-gram orders that matched and the cosine between the superposed embedding and
the token's own. The drafts returned by the strategy (`finish` rows with a `final_rank`) are marked at their end.

Bottom panel, per step: the entropy of omega in bits (`weight_entropy`; 0 = one draft takes the whole embedding,
log2 k = an even blend) and the number of distinct tokens mixed (`mixture_nnz`).
Needs the token-row columns `weight` and `branch_id` (plus `weight_entropy`, `mixture_nnz`, `fallback`,
`ngram_orders`, `cosine` when present).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from viz.common import PALETTE, cells, fmt, has, num, rows_of, show_token, style


def superposed_figure(frame: pd.DataFrame, meta: dict | None = None) -> go.Figure | None:
    tokens = rows_of(frame, "token")
    if not has(tokens, "weight", "branch_id", "step"):
        return None
    tokens = tokens[tokens["step"].notna()]
    steps = num(tokens["step"])
    slots = np.nan_to_num(num(tokens["branch_id"]))
    parents = np.nan_to_num(num(cells(tokens, "parent_id")))
    weights = np.nan_to_num(num(tokens["weight"]))
    texts = cells(tokens, "token_text").tolist()
    fallback = cells(tokens, "fallback").fillna(False).astype(bool).to_numpy() if has(tokens, "fallback") \
        else np.zeros(len(tokens), dtype=bool)

    fig = make_subplots(rows=2, cols=1, row_heights=[0.72, 0.28], vertical_spacing=0.1, shared_xaxes=True,
                        subplot_titles=["Draft lattice: size/colour = superposition weight ω, edges = parent slot",
                                        "Blend per step"])
    # edges, one trace (None-separated)
    ex, ey = [], []
    for s, d, p in zip(steps, slots, parents):
        if s > 0:
            ex += [s - 1, s, None]
            ey += [p, d, None]
    if ex:
        fig.add_trace(go.Scatter(x=ex, y=ey, mode="lines", line={"color": "#c8c8c8", "width": 1.2},
                                 hoverinfo="skip", showlegend=False), row=1, col=1)
    hover = []
    for i, (_, row) in enumerate(tokens.iterrows()):
        hover.append(
            f"step {fmt(row.get('step'))} · draft {fmt(row.get('branch_id'))} (from {fmt(row.get('parent_id'))})<br>"
            f"token {show_token(texts[i], 30)}<br>LP_d {fmt(row.get('score'))} · ω {fmt(row.get('weight'))}<br>"
            f"n-gram orders {fmt(row.get('ngram_orders')) or '-'} · fallback {bool(fallback[i])}<br>"
            f"cos(e, token) {fmt(row.get('cosine'))}")
    fig.add_trace(go.Scatter(
        x=steps, y=slots, mode="markers+text", text=[show_token(t, 10) for t in texts], textposition="top center",
        textfont={"size": 9}, hovertext=hover, hoverinfo="text", name="draft token",
        marker={"size": 6 + 22 * np.sqrt(np.clip(weights, 0, 1)), "color": weights, "colorscale": "Blues",
                "cmin": 0, "cmax": 1, "colorbar": {"title": "ω", "len": 0.6, "y": 0.7},
                "line": {"color": np.where(fallback, "black", "#5a7bb5").tolist(),
                         "width": np.where(fallback, 2.5, 0.8).tolist()}}), row=1, col=1)
    finish = rows_of(frame, "finish")
    if has(finish, "final_rank", "branch_id"):
        ranked = finish[finish["final_rank"].notna()]
        fig.add_trace(go.Scatter(
            x=num(ranked["step"]) + 0.35, y=num(ranked["branch_id"]), mode="markers+text",
            text=[f"#{int(r)}" for r in num(ranked["final_rank"])], textposition="middle right",
            marker={"symbol": "triangle-left", "size": 11, "color": PALETTE[3]}, name="returned draft (rank)",
            hovertext=[f"rank {fmt(r.get('final_rank'))} · ppl {fmt(r.get('ppl'))} · eos {fmt(r.get('eos'))}"
                       for _, r in ranked.iterrows()], hoverinfo="text"), row=1, col=1)
    per_step = tokens.groupby("step")
    xs = np.array(sorted(per_step.groups), dtype=float)
    if has(tokens, "weight_entropy"):
        fig.add_trace(go.Scatter(x=xs, y=num(per_step["weight_entropy"].first()), mode="lines+markers",
                                 name="H(ω) bits", line={"color": PALETTE[0]}), row=2, col=1)
    if has(tokens, "mixture_nnz"):
        fig.add_trace(go.Bar(x=xs, y=num(per_step["mixture_nnz"].first()), name="tokens mixed",
                             marker_color="#bbbbbb", opacity=0.6), row=2, col=1)
    fig.update_yaxes(title_text="draft slot", autorange="reversed", dtick=1, row=1, col=1)
    fig.update_yaxes(title_text="H(ω) / tokens", row=2, col=1)
    fig.update_xaxes(title_text="step", row=2, col=1)
    return style(fig, "Superposed decoding: drafts sharing one input embedding", height=560, legend_right=True)
