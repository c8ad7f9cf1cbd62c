"""Per-step lines over the chosen sequence: entropy and surprise, latency, and a comparison of several runs.

x is the decoding step. Entropy and surprise in bits (surprise = -logprob / ln 2 of the chosen token), times in
milliseconds.
"""

from __future__ import annotations

import numbers

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from viz.common import (AXIS_TITLES, LN2, PALETTE, chosen_path, cells, esc, has, meta_params, num, rows_of, show_token,
                        strategy_of, style)

# Params drawn as horizontal lines on the entropy figure, per strategy: name -> legend label. Values in bits.
THRESHOLDS = {
    "mirostat": {"tau": "τ target surprise"},
    "ead": {"threshold": "τ entropy threshold"},
}
GENERIC_THRESHOLDS = {"entropy_threshold": "entropy threshold"}
TIME_COLUMNS_EXCLUDED = ("t_ms", "dt_ms")


def surprise_bits(rows: pd.DataFrame) -> np.ndarray:
    """-log2 p(chosen token) from the natural-log `logprob` column."""
    return -num(rows["logprob"]) / LN2


def column_values(rows: pd.DataFrame, column: str) -> np.ndarray | None:
    """A per-token column as floats; 'surprise' falls back to -logprob/ln 2. None when absent."""
    if has(rows, column):
        return num(rows[column])
    if column == "surprise" and has(rows, "logprob"):
        return surprise_bits(rows)
    return None


def threshold_lines(strategy: str, params: dict) -> dict[str, float]:
    """The strategy's thresholds (label -> value in bits) found among its params."""
    names = dict(GENERIC_THRESHOLDS, **THRESHOLDS.get(strategy, {}))
    return {label: float(params[name]) for name, label in names.items()
            if isinstance(params.get(name), numbers.Real) and not isinstance(params.get(name), bool)
            and np.isfinite(params[name])}


def entropy_figure(frame: pd.DataFrame, meta: dict | None = None) -> go.Figure | None:
    """Entropy (bits) of the next-token distribution and surprise (bits) of the chosen token per step, along the
    chosen sequence; dashed lines at the strategy's thresholds (mirostat tau, ead threshold) and triangles at
    `switch` rows. None without entropy or logprob."""
    path = chosen_path(frame)
    if not len(path) or not (has(path, "entropy") or has(path, "logprob")):
        return None
    fig = go.Figure()
    x = num(path["step"])
    tokens = [show_token(t) for t in cells(path, "token_text")]
    if has(path, "entropy"):
        fig.add_trace(go.Scatter(x=x, y=num(path["entropy"]), mode="lines+markers", name="entropy (bits)",
                                 customdata=tokens, line={"color": PALETTE[0]},
                                 hovertemplate="step %{x}: %{customdata}<br>entropy %{y:.3f} bits<extra></extra>"))
    if has(path, "logprob"):
        fig.add_trace(go.Scatter(x=x, y=surprise_bits(path), mode="lines+markers", name="surprise −log₂p (bits)",
                                 customdata=tokens, line={"color": PALETTE[1], "dash": "dot"},
                                 hovertemplate="step %{x}: %{customdata}<br>surprise %{y:.3f} bits<extra></extra>"))
    for i, (label, value) in enumerate(threshold_lines(strategy_of(frame, meta), meta_params(meta)).items()):
        fig.add_hline(y=value, line_dash="dash", line_color=PALETTE[3 + i], annotation_text=f"{esc(label)} = {value:g}",
                      annotation_position="top left")
    switches = rows_of(frame, "switch")
    if len(switches) and "step" in switches:
        level = dict(zip(x, num(path["entropy"]) if has(path, "entropy") else surprise_bits(path)))
        sx = num(switches["step"])
        sy = num(switches["entropy"]) if has(switches, "entropy") else np.array([level.get(s, 0.0) for s in sx])
        labels = [f"switch to {esc(m)}" for m in switches["model"]] if "model" in switches else ["switch"] * len(sx)
        fig.add_trace(go.Scatter(x=sx, y=sy, mode="markers", name="model switch", hovertext=labels,
                                 hoverinfo="text+x", marker={"symbol": "triangle-down", "size": 13,
                                                             "color": PALETTE[2]}))
    return style(fig, "Entropy and surprise per token", "step", "bits", height=380)


def latency_figure(frame: pd.DataFrame) -> go.Figure | None:
    """Time per step (ms) as stacked bars of the *_ms columns present (fwd_ms, sel_ms, mask_ms, draft_ms,
    verify_ms, ... summed over the step's rows; a strategy records a shared cost on one row only), plus
    'other' = the step's wall time from t_ms minus those parts; with no *_ms parts, dt_ms (or the wall time).
    A line on the right axis gives throughput so far: tokens emitted up to the step / elapsed seconds.
    The first step's wall time includes the prefill. None when the trace has no timing."""
    if frame is None or "step" not in frame.columns or not frame["step"].notna().any():
        return None
    rows = frame[frame["step"].notna()]
    parts = [c for c in rows.columns if c.endswith("_ms") and c not in TIME_COLUMNS_EXCLUDED and has(rows, c)]
    if not parts and has(rows, "dt_ms"):
        parts = ["dt_ms"]
    by_step = rows.groupby("step")
    steps = np.array(sorted(rows["step"].dropna().unique()), dtype=float)
    wall = None
    if has(rows, "t_ms"):
        last = by_step["t_ms"].max().reindex(steps).astype("float64").ffill()
        wall = last.diff().fillna(last).clip(lower=0).to_numpy()      # ms per step; step 0 from the run start
    if not parts and wall is None:
        return None
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    total = np.zeros(len(steps))
    for i, col in enumerate(parts):
        y = by_step[col].sum(min_count=1).reindex(steps).astype("float64").fillna(0.0).to_numpy()
        total += y
        fig.add_trace(go.Bar(x=steps, y=y, name=esc(col), marker_color=PALETTE[i % len(PALETTE)],
                             hovertemplate=f"step %{{x}}<br>{esc(col)} %{{y:.2f}} ms<extra></extra>"),
                      secondary_y=False)
    if wall is not None:
        other = np.clip(wall - total, 0, None)
        name = "other (wall − parts)" if parts else "step wall time"
        fig.add_trace(go.Bar(x=steps, y=other, name=name, marker_color="#c7c7c7",
                             hovertemplate="step %{x}<br>" + name + " %{y:.2f} ms<extra></extra>"), secondary_y=False)
        token_steps = np.isin(steps, num(rows_of(frame, "token")["step"]))
        emitted = np.cumsum(token_steps)
        elapsed_s = np.cumsum(wall) / 1000.0
        with np.errstate(divide="ignore", invalid="ignore"):
            tps = np.where(elapsed_s > 0, emitted / elapsed_s, np.nan)
        fig.add_trace(go.Scatter(x=steps, y=tps, mode="lines", name="tokens/s so far", line={"color": "#222222"},
                                 hovertemplate="step %{x}<br>%{y:.1f} tokens/s<extra></extra>"), secondary_y=True)
        fig.update_yaxes(title_text="tokens/s", secondary_y=True, rangemode="tozero", showgrid=False)
        total = total + other
    fig.update_layout(barmode="stack")
    fig.update_yaxes(title_text="time per step (ms)", secondary_y=False)
    _clip_first_step(fig, steps, total)
    return style(fig, "Latency per step", "step", None, height=380)


def _clip_first_step(fig: go.Figure, steps: np.ndarray, total: np.ndarray) -> None:
    """When step 0 (prefill, warm-up) dwarfs the others, cut the y axis above the others and write step 0's
    time on its bar, so the per-step pattern stays visible."""
    if len(total) < 4:
        return
    rest = float(np.max(total[1:]))
    if rest > 0 and total[0] > 2.0 * rest:
        fig.update_yaxes(range=[0, 1.25 * rest], secondary_y=False)
        fig.add_annotation(x=steps[0], y=1.2 * rest, text=f"{total[0]:.1f} ms (prefill) ↑", showarrow=False,
                           xanchor="left", yref="y")


def compare_figure(frames: dict[str, pd.DataFrame], column: str) -> go.Figure:
    """Per-token `column` (entropy, logprob, surprise, dt_ms, ...) along the chosen sequence of several runs on
    shared axes; the dict keys are the legend names (escaped). Runs without the column are left out and named
    in the title."""
    fig = go.Figure()
    missing = []
    for i, (name, frame) in enumerate(frames.items()):
        path = chosen_path(frame)
        y = column_values(path, column) if len(path) else None
        if y is None:
            missing.append(esc(name))
            continue
        tokens = [show_token(t) for t in cells(path, "token_text")]
        fig.add_trace(go.Scatter(x=num(path["step"]), y=y, mode="lines+markers", name=esc(name),
                                 customdata=tokens, line={"color": PALETTE[i % len(PALETTE)]},
                                 hovertemplate=f"{esc(name)}<br>step %{{x}}: %{{customdata}}<br>"
                                               f"{esc(column)} %{{y:.3f}}<extra></extra>"))
    title = f"{esc(column)} per token"
    if missing:
        title += f" (no {esc(column)} in: {', '.join(missing)})"
    return style(fig, title, "step", esc(AXIS_TITLES.get(column, column)), height=380)
