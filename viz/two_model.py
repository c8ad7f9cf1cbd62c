"""Mechanism views of the two-model strategies (strategies/speculative.py, strategies/ead.py).

- speculative (token rows with `origin`; accept/reject rows with `round`, `verdict`): the drafted text round by round.
  x = generated-token position (step), one row per round (top to bottom). Every drafted token is a marker with its
  text: accepted (green circle), rejected by the test (red cross), discarded after an earlier rejection (grey);
  the token the target added is a diamond: resampled at the first rejection (orange) or bonus when all passed
  (blue). Reading a row left to right shows how far the draft got; hover gives p, q, min(1, p/q) and u.
- ead (token rows with `rolling_entropy`, `role`): per-token entropy H_t (markers coloured by the model that
  produced the token), the rolling mean H̄_t, the threshold τ (from the params), the stretches where the large
  model was active shaded, and the switches (triangles at the first token of the new model).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from viz.common import PALETTE, chosen_path, fmt, has, meta_params, num, rows_of, show_token, style

VERDICT_STYLE = {"accepted": ("#2ca02c", "circle", "accepted draft"),
                 "rejected": ("#d62728", "x", "rejected draft"),
                 "discarded": ("#b0b0b0", "circle-open", "discarded (after a rejection)")}
ORIGIN_STYLE = {"resampled": ("#ff7f0e", "diamond", "resampled by the target"),
                "bonus": ("#1f77b4", "diamond", "bonus token")}
MAX_ROUNDS = 200


def speculative_figure(frame: pd.DataFrame, meta: dict | None = None) -> go.Figure | None:
    tokens = rows_of(frame, "token")
    decisions = rows_of(frame, "accept", "reject")
    if not has(tokens, "origin", "round", "step") or has(tokens, "depth"):    # spec_tree traces: viz/spec_tree.py
        return None
    rounds = sorted(set(num(tokens["round"])[~np.isnan(num(tokens["round"]))].astype(int)))[:MAX_ROUNDS]
    fig = go.Figure()
    if has(decisions, "verdict", "round"):
        for verdict, (color, symbol, label) in VERDICT_STYLE.items():
            rows = decisions[(decisions["verdict"] == verdict) & decisions["round"].isin(rounds)]
            if not len(rows):
                continue
            hover = [f"round {fmt(r.get('round'))}, draft position {fmt(r.get('draft_pos'))}: "
                     f"{show_token(r.get('token_text'), 30)}<br>p = {fmt(r.get('p'))}, q = {fmt(r.get('q'))}, "
                     f"min(1, p/q) = {fmt(r.get('accept_prob'))}, u = {fmt(r.get('u'))}" for _, r in rows.iterrows()]
            fig.add_trace(go.Scatter(x=num(rows["step"]), y=num(rows["round"]), mode="markers+text", name=label,
                                     text=[show_token(t, 8) for t in rows["token_text"]], textposition="top center",
                                     textfont={"size": 10, "color": color}, hovertext=hover, hoverinfo="text",
                                     marker={"color": color, "symbol": symbol, "size": 10}))
    for origin, (color, symbol, label) in ORIGIN_STYLE.items():
        rows = tokens[(tokens["origin"] == origin) & tokens["round"].isin(rounds)]
        if not len(rows):
            continue
        hover = [f"round {fmt(r.get('round'))}: {show_token(r.get('token_text'), 30)} ({origin})<br>"
                 f"target logprob {fmt(r.get('logprob'))}" for _, r in rows.iterrows()]
        fig.add_trace(go.Scatter(x=num(rows["step"]), y=num(rows["round"]), mode="markers+text", name=label,
                                 text=[show_token(t, 8) for t in rows["token_text"]], textposition="bottom center",
                                 textfont={"size": 10, "color": color}, hovertext=hover, hoverinfo="text",
                                 marker={"color": color, "symbol": symbol, "size": 11}))
    if not fig.data:
        return None
    fig.update_yaxes(autorange="reversed", dtick=1, title_text="round")
    return style(fig, "Speculative decoding: drafts per round (accepted, rejected, resampled, bonus)", "step", None,
                 height=min(2400, 220 + 34 * len(rounds)))


def _spans(roles: list[str], steps: np.ndarray, role: str) -> list[tuple[float, float]]:
    out, start = [], None
    for i, r in enumerate(roles):
        if r == role and start is None:
            start = steps[i]
        if r != role and start is not None:
            out.append((start, steps[i]))
            start = None
    if start is not None:
        out.append((start, steps[-1] + 1))
    return out


def ead_figure(frame: pd.DataFrame, meta: dict | None = None) -> go.Figure | None:
    path = chosen_path(frame)
    if not has(path, "rolling_entropy", "step"):
        return None
    x = num(path["step"])
    roles = [str(r) for r in path["role"]] if "role" in path else ["?"] * len(path)
    fig = go.Figure()
    for x0, x1 in _spans(roles, x, "large"):
        fig.add_vrect(x0=x0 - 0.5, x1=x1 - 0.5, fillcolor="#ff7f0e", opacity=0.12, line_width=0)
    models = path["model"].astype("string").fillna("?") if "model" in path else pd.Series(["?"] * len(path))
    for i, m in enumerate(sorted(models.unique())):
        sel = (models == m).to_numpy()
        hover = [f"step {fmt(s)}: {show_token(t, 30)}<br>H = {fmt(h)} bits" for s, t, h in
                 zip(path["step"][sel], path["token_text"][sel], path["entropy"][sel])]
        fig.add_trace(go.Scatter(x=x[sel], y=num(path["entropy"])[sel], mode="markers", name=f"H_t by {m}",
                                 hovertext=hover, hoverinfo="text",
                                 marker={"color": PALETTE[(i * 3) % len(PALETTE)], "size": 7}))
    fig.add_trace(go.Scatter(x=x, y=num(path["rolling_entropy"]), mode="lines", name="rolling mean H̄_t",
                             line={"color": "#222222", "width": 2, "shape": "hv"}))
    threshold = meta_params(meta).get("threshold")
    if isinstance(threshold, (int, float)) and np.isfinite(threshold):
        fig.add_hline(y=float(threshold), line_dash="dash", line_color=PALETTE[3],
                      annotation_text=f"threshold τ = {float(threshold):g} bits", annotation_position="top left")
    switches = rows_of(frame, "switch")
    if len(switches) and has(switches, "step"):
        fig.add_trace(go.Scatter(x=num(switches["step"]), y=num(switches["entropy"]) if has(switches, "entropy")
                                 else np.zeros(len(switches)), mode="markers", name="switch",
                                 hovertext=[f"switch to {fmt(m)}" for m in switches["model"]], hoverinfo="text+x",
                                 marker={"symbol": "triangle-down", "size": 13, "color": PALETTE[2]}))
    return style(fig, "EAD: entropy, rolling mean and the active model (large model shaded)", "step", "bits",
                 height=400)
