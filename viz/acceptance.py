"""Acceptance views: how much of what was proposed survived.

Panels, each drawn only when its rows/columns exist (stacked vertically in one figure):
- accepted length per round: number of `accept` rows per `round` (speculative decoding);
- acceptance by draft position: accept / (accept + reject) per `draft_pos`;
- rolling acceptance rate: the mean of accept (1) / reject (0) over the last ROLLING_WINDOW such rows, by step;
- masked mass per step: the `masked_mass` column (probability mass the grammar mask removed; gcd / asap);
- model share: the cumulative share of emitted tokens produced by each model, when token rows come from more than
  one model (ead: the large model's share).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from viz.common import PALETTE, chosen_path, esc, has, num, rows_of, style

ROLLING_WINDOW = 20
INTEGER_AXES = ("round", "draft position")
UNIT_AXES = ("acceptance rate", "share of tokens", "masked mass")         # fractions in [0, 1]


def _accepted_flags(rows: pd.DataFrame) -> np.ndarray:
    return (rows["kind"] == "accept").to_numpy(dtype=float)


def _per_round(decisions: pd.DataFrame):
    if not has(decisions, "round"):
        return None
    per = pd.Series(_accepted_flags(decisions), index=decisions.index).groupby(decisions["round"]).sum()
    return ("Accepted tokens per round", "round", "accepted tokens",
            [go.Bar(x=num(per.index.to_series()), y=per.to_numpy(), name="accepted per round",
                    marker_color=PALETTE[0], showlegend=False)])


def _by_draft_pos(decisions: pd.DataFrame):
    if not has(decisions, "draft_pos"):
        return None
    rate = pd.Series(_accepted_flags(decisions), index=decisions.index).groupby(decisions["draft_pos"]).agg(
        ["mean", "size"])
    return ("Acceptance by draft position", "draft position", "acceptance rate",
            [go.Bar(x=num(rate.index.to_series()), y=rate["mean"].to_numpy(), name="acceptance by position",
                    customdata=rate["size"].to_numpy(), marker_color=PALETTE[1], showlegend=False,
                    hovertemplate="position %{x}: %{y:.2f} of %{customdata}<extra></extra>")])


def _rolling(decisions: pd.DataFrame):
    if not len(decisions):
        return None
    rate = pd.Series(_accepted_flags(decisions)).rolling(ROLLING_WINDOW, min_periods=1).mean().to_numpy()
    x = num(decisions["step"]) if has(decisions, "step") else np.arange(len(decisions))
    return (f"Rolling acceptance rate (last {ROLLING_WINDOW} decisions)", "step", "acceptance rate",
            [go.Scatter(x=x, y=rate, mode="lines", name="rolling acceptance", line={"color": PALETTE[2]},
                        showlegend=False)])


def _masked_mass(frame: pd.DataFrame):
    if not has(frame, "masked_mass", "step"):
        return None
    per = frame[frame["masked_mass"].notna()].groupby("step")["masked_mass"].mean()
    return ("Probability mass removed by the grammar mask", "step", "masked mass",
            [go.Scatter(x=num(per.index.to_series()), y=num(per), mode="lines+markers", name="masked mass",
                        line={"color": PALETTE[3]}, showlegend=False)])


def _model_share(frame: pd.DataFrame):
    path = chosen_path(frame)
    if not has(path, "model") or path["model"].nunique() < 2:
        return None
    models = path["model"].astype("string").fillna("?")
    n = np.arange(1, len(path) + 1)
    traces = [go.Scatter(x=num(path["step"]), y=np.cumsum((models == m).to_numpy()) / n, mode="lines",
                         name=f"share {esc(m)}", line={"color": PALETTE[(4 + i) % len(PALETTE)]})
              for i, m in enumerate(sorted(models.unique()))]
    return ("Share of tokens by model (cumulative)", "step", "share of tokens", traces)


def acceptance_figure(frame: pd.DataFrame) -> go.Figure | None:
    """Every acceptance panel that applies, stacked; None when none does (no accept/reject rows, no
    masked_mass, one model)."""
    if frame is None or "kind" not in frame.columns:
        return None
    decisions = rows_of(frame, "accept", "reject")
    panels = [p for p in (_per_round(decisions), _by_draft_pos(decisions), _rolling(decisions),
                          _masked_mass(frame), _model_share(frame)) if p is not None]
    if not panels:
        return None
    fig = make_subplots(rows=len(panels), cols=1, subplot_titles=[p[0] for p in panels],
                        vertical_spacing=min(0.12, 0.3 / len(panels)))
    for i, (_, x_title, y_title, traces) in enumerate(panels, start=1):
        for trace in traces:
            fig.add_trace(trace, row=i, col=1)
        fig.update_xaxes(title_text=x_title, row=i, col=1, dtick=1 if x_title in INTEGER_AXES else None)
        fig.update_yaxes(title_text=y_title, row=i, col=1, range=[0, 1.05] if y_title in UNIT_AXES else None)
    return style(fig, "Acceptance", height=120 + 260 * len(panels), legend_right=True)
