"""Mechanism views of uscd and contrastive (CD).

uscd: top panel, the gate over steps: sum p_std^2 of every step (the vocabulary-free uncertainty statistic; 1 = sure)
with the run's `threshold` as a dashed line; steps where the contrast applied are filled markers below it, plain
steps hollow; steps where the choice flipped against plain greedy are red crosses (hover: chosen vs plain token).
Bottom panel: p_std and p_lame of the chosen token, so a flip shows as a token the lame prompt liked less.
Needs the token-row columns `sum_sq` and `contrast` (`flip`, `p_std`, `p_lame`, `plain_token` optional).

contrastive: per step |V_head| (bars) and the CD score of the chosen token, flips against the expert's greedy
choice marked. Needs `head_size` and `flip`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from viz.common import HIGHLIGHT, MUTED, PALETTE, chosen_path, fmt, has, meta_params, num, show_token, style


def _flags(rows: pd.DataFrame, name: str) -> np.ndarray:
    if name not in rows:
        return np.zeros(len(rows), bool)
    return rows[name].fillna(False).astype(bool).to_numpy()


def _hover(rows: pd.DataFrame) -> list[str]:
    out = []
    for _, r in rows.iterrows():
        line = (f"step {fmt(r.get('step'))}: {show_token(r.get('token_text'), 30)}"
                f"<br>Σp² = {fmt(r.get('sum_sq'))}, p_max = {fmt(r.get('p_max'))}, contrast = {r.get('contrast')}"
                f"<br>p_std = {fmt(r.get('p_std'))}, p_lame = {fmt(r.get('p_lame'))}")
        if bool(r.get("flip")) and r.get("flip") is not pd.NA:
            line += f"<br>flipped: plain greedy would take id {fmt(r.get('plain_token'))}"
        out.append(line)
    return out


def uscd_figure(frame: pd.DataFrame, meta: dict | None = None) -> go.Figure | None:
    path = chosen_path(frame)
    if not has(path, "sum_sq", "contrast") or not len(path):
        return None
    x, y = num(path["step"]), num(path["sum_sq"])
    on, flip = _flags(path, "contrast"), _flags(path, "flip")
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.6, 0.4], vertical_spacing=0.12,
                        subplot_titles=[f"Gate: contrast on {int(on.sum())} of {len(on)} steps, "
                                        f"{int(flip.sum())} flips against plain greedy",
                                        "Chosen token under the standard and the lame prompt"])
    hover = np.array(_hover(path), dtype=object)
    fig.add_trace(go.Scatter(x=x, y=y, mode="lines", line={"color": MUTED, "width": 1}, showlegend=False,
                             hoverinfo="skip"), row=1, col=1)
    for mask, name, marker in [(~on, "plain step (sure)", {"color": "rgba(0,0,0,0)", "size": 7,
                                                          "line": {"color": PALETTE[0], "width": 1.5}}),
                               (on, "contrast applied (unsure)", {"color": PALETTE[1], "size": 7})]:
        if mask.any():
            fig.add_trace(go.Scatter(x=x[mask], y=y[mask], mode="markers", name=name, marker=marker,
                                     hovertext=hover[mask], hoverinfo="text"), row=1, col=1)
    if flip.any():
        fig.add_trace(go.Scatter(x=x[flip], y=y[flip], mode="markers", name="flipped vs plain greedy",
                                 marker={"symbol": "x", "size": 11, "color": HIGHLIGHT},
                                 hovertext=hover[flip], hoverinfo="text"), row=1, col=1)
    params = meta_params(meta)
    thr = params.get("threshold")
    if isinstance(thr, (int, float)) and not params.get("std_threshold"):
        fig.add_hline(y=float(thr), line={"color": "#333333", "dash": "dash", "width": 1}, row=1, col=1,
                      annotation_text=f"threshold {fmt(thr)}", annotation_position="top left")
    fig.update_yaxes(title_text="Σ p_std² (1 = sure)", range=[-0.02, 1.05], row=1, col=1)
    for col, name, color in [("p_std", "p_std(chosen)", PALETTE[0]), ("p_lame", "p_lame(chosen)", PALETTE[2])]:
        if has(path, col):
            fig.add_trace(go.Scatter(x=x, y=num(path[col]), mode="lines+markers", name=name, marker={"size": 4},
                                     line={"color": color}, hovertext=hover, hoverinfo="text"), row=2, col=1)
    fig.update_yaxes(title_text="p", range=[-0.02, 1.05], row=2, col=1)
    fig.update_xaxes(title_text="step", row=2, col=1)
    return style(fig, "USCD: uncertainty gate and flips", height=540, legend_right=True)


def contrastive_figure(frame: pd.DataFrame, meta: dict | None = None) -> go.Figure | None:
    path = chosen_path(frame)
    if not has(path, "head_size", "flip") or not len(path):
        return None
    x = num(path["step"])
    flip = _flags(path, "flip")
    hover = np.array([f"step {fmt(r.get('step'))}: {show_token(r.get('token_text'), 30)}<br>|V_head| = "
                      f"{fmt(r.get('head_size'))}, score = {fmt(r.get('score'))}, expert logprob = {fmt(r.get('logprob'))}"
                      f", amateur logprob = {fmt(r.get('ama_logprob'))}"
                      + (f"<br>flipped: expert greedy would take id {fmt(r.get('plain_token'))}" if f else "")
                      for (_, r), f in zip(path.iterrows(), flip)], dtype=object)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.12,
                        subplot_titles=[f"Plausible set |V_head| per step ({int(flip.sum())} of {len(flip)} choices "
                                        f"differ from the expert's greedy)", "CD score of the chosen token"])
    fig.add_trace(go.Bar(x=x, y=num(path["head_size"]), name="|V_head|", marker_color=MUTED, hovertext=hover,
                         hoverinfo="text"), row=1, col=1)
    if flip.any():
        fig.add_trace(go.Scatter(x=x[flip], y=num(path["head_size"])[flip], mode="markers", name="flipped",
                                 marker={"symbol": "x", "size": 10, "color": HIGHLIGHT}, hovertext=hover[flip],
                                 hoverinfo="text"), row=1, col=1)
    if has(path, "score"):
        fig.add_trace(go.Scatter(x=x, y=num(path["score"]), mode="lines+markers", name="CD score",
                                 line={"color": PALETTE[0]}, marker={"size": 4}, hovertext=hover, hoverinfo="text"),
                      row=2, col=1)
    fig.update_yaxes(title_text="|V_head|", row=1, col=1)
    fig.update_yaxes(title_text="score", row=2, col=1)
    fig.update_xaxes(title_text="step", row=2, col=1)
    return style(fig, "Contrastive decoding: plausible set and flips", height=500, legend_right=True)
