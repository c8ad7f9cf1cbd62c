"""Uncertainty-guided decoding (cautious, adadec): where the entropy gate fired and what it compared there.

Top: the entropy timeline of viz.timeline (entropy and surprise along the chosen sequence), with the entropy the
gate read (`gate_entropy`, bits; for cautious that of the processed distribution, for adadec the model's own, the
same as `entropy`), the gate's threshold (`gate_threshold`, bits) as a dashed line, and a marker at every step
where the gate fired (`intervened`). Bottom: the alternatives compared at each of those steps (`trial` rows of
cautious: score = mean ln p of the trial; `lookahead` rows of adadec: the lookahead score), the kept one as a red
star, the others as grey circles; hover: the escaped text, score and the row's own columns. The alternatives are
also branches of the token tree (viz.tree). All model text goes through `esc`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from viz.common import HIGHLIGHT, MUTED, PALETTE, cells, chosen_path, fmt, has, num, rows_of, show_token, style
from viz.timeline import entropy_figure

ALTERNATIVE_HOVER = ("trial", "trial_len", "trial_ppl", "candidate", "rollout_len", "rollout_logprob", "logprob")


def _alt_hover(rows: pd.DataFrame) -> list[str]:
    out = [f"step {fmt(s)}: <b>{show_token(t, 80)}</b><br>score {fmt(v)}" + (" · kept" if bool(c) else "")
           for s, t, v, c in zip(rows["step"], cells(rows, "token_text"), rows["score"],
                                 cells(rows, "chosen").fillna(False))]
    for col in ALTERNATIVE_HOVER:
        if has(rows, col):
            for k, v in enumerate(rows[col].tolist()):
                if fmt(v):
                    out[k] += f"<br>{col}: {fmt(v)}"
    return out


def uncertainty_figure(frame: pd.DataFrame, meta: dict | None, kind: str, title: str, alt_title: str,
                       alt_axis: str) -> go.Figure | None:
    """The shared view; kind: the alternatives' row kind (trial / lookahead)."""
    path = chosen_path(frame)
    if not len(path) or not has(path, "intervened", "gate_entropy"):
        return None
    timeline = entropy_figure(frame, meta)
    decided = path[path["gate_entropy"].notna()]
    fired = decided[decided["intervened"].fillna(False).astype(bool)]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.6, 0.4], vertical_spacing=0.12,
                        subplot_titles=[f"Gate fired at {len(fired)} of {len(decided)} decisions",
                                        alt_title])
    for tr in (timeline.data if timeline is not None else ()):
        fig.add_trace(tr, row=1, col=1)
    x, h = num(decided["step"]), num(decided["gate_entropy"])
    if not np.allclose(h, num(decided["entropy"]), equal_nan=True):
        fig.add_trace(go.Scatter(x=x, y=h, mode="lines", name="entropy the gate read (bits)",
                                 line={"color": PALETTE[2], "width": 1.5}, hoverinfo="skip"), row=1, col=1)
    if len(fired):
        labels = [f"step {fmt(s)}: {show_token(t)}<br>gate entropy {fmt(e)} bits"
                  + (f"<br>{fmt(n)} trials" if pd.notna(n) else "")
                  + (" · flipped from greedy" if bool(f) else "")
                  for s, t, e, n, f in zip(fired["step"], cells(fired, "token_text"), fired["gate_entropy"],
                                           cells(fired, "num_trials"), cells(fired, "flip").fillna(False))]
        fig.add_trace(go.Scatter(x=num(fired["step"]), y=num(fired["gate_entropy"]), mode="markers",
                                 name="gate fired", hovertext=labels, hoverinfo="text",
                                 marker={"symbol": "diamond", "size": 11, "color": HIGHLIGHT}), row=1, col=1)
    thr = num(decided["gate_threshold"]) if has(decided, "gate_threshold") else np.array([])
    thr = thr[np.isfinite(thr)]
    if len(thr):
        fig.add_hline(y=float(thr[0]), line={"color": "#333333", "dash": "dash", "width": 1}, row=1, col=1,
                      annotation_text=f"gate threshold {fmt(float(thr[0]))} bits", annotation_position="top left")
    fig.update_yaxes(title_text="bits", row=1, col=1)
    alts = rows_of(frame, kind)
    if len(alts) and has(alts, "score"):
        kept = cells(alts, "chosen").fillna(False).astype(bool).to_numpy()
        hover = np.array(_alt_hover(alts), dtype=object)
        ax, ay = num(alts["step"]), num(alts["score"])
        for mask, name, marker in [(~kept, "compared, not kept", {"color": MUTED, "size": 8, "symbol": "circle-open"}),
                                   (kept, "kept", {"color": HIGHLIGHT, "size": 12, "symbol": "star"})]:
            if mask.any():
                fig.add_trace(go.Scatter(x=ax[mask], y=ay[mask], mode="markers", name=name, marker=marker,
                                         hovertext=hover[mask], hoverinfo="text"), row=2, col=1)
    fig.update_yaxes(title_text=alt_axis, row=2, col=1)
    fig.update_xaxes(title_text="step", row=2, col=1)
    return style(fig, title, height=600, legend_right=True)


def cautious_figure(frame: pd.DataFrame, meta: dict | None = None) -> go.Figure | None:
    return uncertainty_figure(frame, meta, "trial", "Cautious: trials where the model was unsure",
                              "Trials compared (kept: the lowest perplexity)", "mean ln p of the trial")


def adadec_figure(frame: pd.DataFrame, meta: dict | None = None) -> go.Figure | None:
    return uncertainty_figure(frame, meta, "lookahead", "AdaDec: pauses and lookahead rerank",
                              "Candidates compared (kept: the best lookahead score)", "lookahead score")
