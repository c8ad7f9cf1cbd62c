"""Mirostat beside fixed truncation: the boredom and confusion traps (Basu et al. 2021, docs/strategies.md#mirostat).

`traps_figure({label: frame}, tau)` takes several runs on the same prompt (mirostat and top-k / top-p sampling,
say) and draws, per run, along its chosen sequence:
- top: the observed surprise on the FULL model distribution, -logprob / ln 2 in bits (whatever the strategy's
  own truncation), as a rolling mean over `window` steps (None: the running mean since step 0), with the tau line.
  A small k / p lets it sink (the boredom trap), a large one lets it climb (the confusion trap); mirostat holds it
  at tau;
- bottom: the share of tokens so far that close an n-gram already seen earlier in the sequence (n = 3): repetition,
  which the paper finds almost linear in cross-entropy.

This is a multi-run view (several frames), so it is not a per-run entry of viz.mechanism.MECHANISMS (whose
builders see one run); the per-run control loop is viz.mechanism.mirostat_figure. bench/mirostat.py produces
this figure on the embedded model; it takes the same {name: frame} dict as viz.timeline.compare_figure.
"""

from __future__ import annotations

import numbers

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from viz.common import LN2, PALETTE, chosen_path, esc, has, num, style


def rolling_surprise(path: pd.DataFrame, window: int | None = 32) -> np.ndarray:
    """-logprob / ln 2 (bits, full model distribution) per token row, as a rolling mean over `window` steps
    (fewer at the start), or the running mean since the first step when window is None."""
    s = pd.Series(-num(path["logprob"]) / LN2)
    return (s.expanding() if window is None else s.rolling(int(window), min_periods=1)).mean().to_numpy()


def repeated_ngram_share(token_ids, n: int = 3) -> np.ndarray:
    """At each position t: (number of positions <= t whose n-gram ending there already ended at an earlier
    position) / (t + 1). 0 until the first repeat; tends to 1 when the text loops."""
    ids = [int(x) if pd.notna(x) else -1 for x in token_ids]
    seen: set[tuple] = set()
    repeats, out = 0, np.zeros(len(ids))
    for t in range(len(ids)):
        if t + 1 >= n:
            gram = tuple(ids[t + 1 - n: t + 1])
            repeats += gram in seen
            seen.add(gram)
        out[t] = repeats / (t + 1)
    return out


def traps_figure(frames: dict[str, pd.DataFrame], tau=None, window: int | None = 32, n: int = 3) -> go.Figure:
    """Rolling surprise (bits, full model distribution) and repeated n-gram share of several runs; dashed line(s)
    at tau (a number or several). Labels are escaped; a run without logprob is left out."""
    title = "running mean" if window is None else f"mean of the last {int(window)} tokens"
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1, row_heights=[0.62, 0.38],
                        subplot_titles=[f"surprise −log₂p under the model ({title})",
                                        f"share of tokens closing a repeated {n}-gram"])
    kept = []
    for i, (label, frame) in enumerate(frames.items()):
        path = chosen_path(frame)
        if not len(path) or not has(path, "logprob"):
            continue
        dash = None if has(path, "mu") else "dot"        # mirostat (a feedback loop): solid; fixed cuts: dotted
        kept.append((i, esc(label), path, dash))
    for i, name, path, dash in kept:
        fig.add_trace(go.Scatter(x=num(path["step"]), y=rolling_surprise(path, window), mode="lines", name=name,
                                 legendgroup=name, line={"color": PALETTE[i % len(PALETTE)], "width": 2.5, "dash": dash},
                                 hovertemplate=f"{name}<br>step %{{x}}<br>%{{y:.2f}} bits<extra></extra>"),
                      row=1, col=1)
    for i, name, path, dash in kept:
        ids = path["token_id"] if "token_id" in path else pd.Series([np.nan] * len(path))
        fig.add_trace(go.Scatter(x=num(path["step"]), y=repeated_ngram_share(ids, n), mode="lines", name=name,
                                 legendgroup=name, showlegend=False,
                                 line={"color": PALETTE[i % len(PALETTE)], "dash": dash},
                                 hovertemplate=f"{name}<br>step %{{x}}<br>%{{y:.2f}}<extra></extra>"),
                      row=2, col=1)
    values = tau if isinstance(tau, (list, tuple, set)) else ([] if tau is None else [tau])
    for value in sorted({float(v) for v in values if isinstance(v, numbers.Real) and np.isfinite(v)}):
        fig.add_hline(y=value, line_dash="dash", line_color="#444444", annotation_text=f"τ = {value:g}",
                      annotation_position="bottom right", row=1, col=1)
    fig.update_yaxes(title_text="bits", row=1, col=1)
    fig.update_yaxes(title_text="repeated share", range=[0, 1], row=2, col=1)
    fig.update_xaxes(title_text="step", row=2, col=1)
    style(fig, "Boredom and confusion traps: fixed top-k / top-p drift, mirostat holds τ", height=620)
    fig.update_layout(legend={"orientation": "v", "yanchor": "top", "y": 1.0, "xanchor": "left", "x": 1.02},
                      margin={"r": 230})
    return fig
