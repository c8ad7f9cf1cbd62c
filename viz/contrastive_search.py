"""Contrastive search's mechanism view: model confidence against degeneration penalty for every candidate.

Top panel: one point per look-ahead candidate (`candidate` rows): x = degeneration penalty (max cosine between
its last-layer state and the context's), y = p. Chosen tokens are red; a top-1 that lost is a hollow circle.
Dotted lines are iso-score lines (1-α)·p - α·penalty = s (α = penalty_alpha from the run's params) through a few
chosen scores: the ranking picks, within each step, the candidate on the highest such line (up and to the left).
Bottom panel, per step: the penalty of the chosen token and of the model's top-1, with overridden steps marked.
Needs the token-row column `degeneration_penalty` (candidate rows with `p` and `rank` for the top panel).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from viz.common import HIGHLIGHT, MUTED, PALETTE, chosen_path, fmt, has, meta_params, num, rows_of, show_token, style


def _hover(rows: pd.DataFrame) -> list[str]:
    return [f"step {fmt(r.get('step'))}, rank {fmt(r.get('rank'))}: {show_token(r.get('token_text'), 30)}"
            f"<br>p = {fmt(r.get('p'))}, penalty = {fmt(r.get('degeneration_penalty'))}, score = {fmt(r.get('score'))}"
            for _, r in rows.iterrows()]


def contrastive_search_figure(frame: pd.DataFrame, meta: dict | None = None) -> go.Figure | None:
    path = chosen_path(frame)
    if not has(path, "degeneration_penalty"):
        return None
    cands = rows_of(frame, "candidate")
    cands = cands[cands["step"].isin(path["step"])] if len(cands) and "step" in cands else cands
    fig = make_subplots(rows=2, cols=1, row_heights=[0.6, 0.4], vertical_spacing=0.18,
                        subplot_titles=["Candidates: confidence vs degeneration penalty",
                                        "Degeneration penalty per step"])
    if has(cands, "p", "degeneration_penalty"):
        chosen = cands["accepted"].fillna(False).astype(bool).to_numpy() if "accepted" in cands else \
            np.zeros(len(cands), bool)
        rank0 = (pd.to_numeric(cands["rank"], errors="coerce") == 0).to_numpy() if "rank" in cands else \
            np.zeros(len(cands), bool)
        other = ~chosen & ~rank0
        lost = ~chosen & rank0
        for mask, name, marker in [
            (other, "other candidates", {"color": MUTED, "size": 6, "opacity": 0.6}),
            (lost, "model's top-1, not chosen", {"color": "rgba(0,0,0,0)", "size": 9,
                                                  "line": {"color": PALETTE[0], "width": 1.5}}),
            (chosen, "chosen", {"color": HIGHLIGHT, "size": 7})]:
            if mask.any():
                sub = cands[mask]
                fig.add_trace(go.Scatter(x=num(sub["degeneration_penalty"]), y=num(sub["p"]), mode="markers",
                                         name=name, marker=marker, hovertext=_hover(sub), hoverinfo="text"),
                              row=1, col=1)
        alpha = meta_params(meta).get("penalty_alpha")
        if isinstance(alpha, (int, float)) and 0 < alpha < 1 and chosen.any():
            xs = np.array([np.nanmin(num(cands["degeneration_penalty"])), np.nanmax(num(cands["degeneration_penalty"]))])
            scores = (1 - alpha) * num(cands["p"])[chosen] - alpha * num(cands["degeneration_penalty"])[chosen]
            for i, s in enumerate(np.unique(np.nanquantile(scores, [0.1, 0.5, 0.9]).round(4))):
                fig.add_trace(go.Scatter(x=xs, y=(s + alpha * xs) / (1 - alpha), mode="lines",
                                         name="iso-score (1-α)p - α·penalty", showlegend=i == 0, hoverinfo="skip",
                                         line={"color": "#999999", "dash": "dot", "width": 1}), row=1, col=1)
            fig.update_yaxes(range=[-0.02, min(1.02, float(np.nanmax(num(cands["p"]))) * 1.08 + 0.02)], row=1, col=1)
    fig.update_xaxes(title_text="degeneration penalty (max cosine to the context)", row=1, col=1)
    fig.update_yaxes(title_text="p (model confidence)", row=1, col=1)

    x = num(path["step"])
    fig.add_trace(go.Scatter(x=x, y=num(path["degeneration_penalty"]), mode="lines+markers",
                             name="penalty of the chosen token", line={"color": HIGHLIGHT}, marker={"size": 4},
                             hovertext=_hover(path), hoverinfo="text"), row=2, col=1)
    if has(cands, "rank", "degeneration_penalty"):
        top = cands[pd.to_numeric(cands["rank"], errors="coerce") == 0].sort_values("step")
        fig.add_trace(go.Scatter(x=num(top["step"]), y=num(top["degeneration_penalty"]), mode="lines",
                                 name="penalty of the model's top-1", line={"color": PALETTE[0], "dash": "dot"},
                                 hovertext=_hover(top), hoverinfo="text"), row=2, col=1)
    if has(path, "overridden"):
        over = path["overridden"].fillna(False).astype(bool).to_numpy()
        if over.any():
            fig.add_trace(go.Scatter(x=x[over], y=num(path["degeneration_penalty"])[over], mode="markers",
                                     name=f"top-1 overridden ({int(over.sum())} of {len(over)} steps)",
                                     marker={"symbol": "x", "size": 9, "color": "#333333"},
                                     hovertext=_hover(path[over]), hoverinfo="text"), row=2, col=1)
    fig.update_xaxes(title_text="step", row=2, col=1)
    fig.update_yaxes(title_text="max cosine", row=2, col=1)
    return style(fig, "Contrastive search: confidence against degeneration", height=640, legend_right=True)
