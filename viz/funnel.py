"""The sampler-chain funnel (docs/strategies.md#sampler_chain): how many tokens, and how much of the model's
probability, each stage of a llama.cpp sampler chain let through at every step.

`funnel_figure(frame, meta)` reads the `stage` rows (stage, stage_pos, n_kept, mass_kept per step) and draws, per
stage in chain order, along the steps: top, the candidates left after it (log axis); bottom, the model's
probability mass they hold (the model's own softmax of the raw logits, before bias or penalties). Stages that only
reweight (penalties, DRY, logit bias, temperature) leave the count flat; the lines never cross, so the gaps between
them are what each stage cut. `stage_table(frame, step)` is one step's chain as a table (the Teach page): each
stage with the candidates before and after it and the model's top tokens it removed, with their probabilities.
Pure functions: trace DataFrame -> go.Figure / DataFrame; token text is escaped for the figure (plotly renders
HTML) and made visible, never interpreted, in the table.
"""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from viz.common import PALETTE, esc, has, num, rows_of, style


def stage_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The `stage` rows sorted by step and chain position (empty when there are none)."""
    st = rows_of(frame, "stage")
    if not has(st, "stage", "stage_pos", "n_kept"):
        return st.iloc[0:0]
    return st.sort_values(["step", "stage_pos"], kind="stable")


def funnel_figure(frame: pd.DataFrame, meta: dict | None = None) -> go.Figure | None:
    """Per step: candidates kept (log axis) and model mass kept after each stage, one line per stage."""
    st = stage_rows(frame)
    if st.empty:
        return None
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1, row_heights=[0.6, 0.4],
                        subplot_titles=["candidates left after each stage (log)",
                                        "model probability mass they hold"])
    order = st.drop_duplicates("stage_pos").sort_values("stage_pos")
    for i, (pos, name) in enumerate(zip(order["stage_pos"], order["stage"])):
        rows = st[st["stage_pos"] == pos]
        label = f"{int(pos)}. {esc(name)}"
        color = PALETTE[i % len(PALETTE)]
        x, n = num(rows["step"]), num(rows["n_kept"])
        mass = num(rows["mass_kept"]) if "mass_kept" in rows else n * float("nan")
        hover = [f"step {int(s)} · {label}<br>kept {int(k)} tokens · mass {m:.4g}" for s, k, m in zip(x, n, mass)]
        fig.add_trace(go.Scatter(x=x, y=n, mode="lines+markers", name=label, legendgroup=label, hovertext=hover,
                                 hoverinfo="text", line={"color": color, "shape": "hv"}, marker={"size": 4}),
                      row=1, col=1)
        fig.add_trace(go.Scatter(x=x, y=mass, mode="lines", name=label, legendgroup=label, showlegend=False,
                                 hovertext=hover, hoverinfo="text", line={"color": color, "shape": "hv"}),
                      row=2, col=1)
    fig.update_yaxes(type="log", title_text="tokens kept", row=1, col=1)
    fig.update_yaxes(title_text="mass kept", range=[0, 1.02], row=2, col=1)
    fig.update_xaxes(title_text="step", row=2, col=1)
    return style(fig, "Sampler chain funnel: what each stage let through", height=560, legend_right=True)


def stage_table(frame: pd.DataFrame, step: int) -> pd.DataFrame:
    """One step through the chain: per stage its position, name, candidates before and after, the model mass
    kept, and the model's top tokens it removed as 'token (p model, p at this stage)' (visible text, not HTML)."""
    st = stage_rows(frame)
    st = st[st["step"] == step]
    if st.empty:
        return pd.DataFrame(columns=["pos", "stage", "before", "after", "mass kept", "removed (top tokens)"])
    cands = rows_of(frame, "candidate")
    cands = cands[cands["step"] == step] if "removed_at" in cands else cands.iloc[0:0]
    before = None
    out = []
    for _, r in st.iterrows():
        pos = int(r["stage_pos"])
        gone = cands[cands["removed_at"] == pos].sort_values("rank") if not cands.empty else cands
        removed = ", ".join(
            f"{_visible(t)} ({math.exp(lp):.3g}, {ps:.3g})"
            for t, lp, ps in zip(gone["token_text"], gone["logprob"], gone["p_stage"]))
        after = int(r["n_kept"])
        out.append({"pos": pos, "stage": str(r["stage"]), "before": before if before is not None else pd.NA,
                    "after": after, "mass kept": float(r["mass_kept"]), "removed (top tokens)": removed})
        before = after
    return pd.DataFrame(out)


def _visible(text) -> str:
    """A token as visible plain text: whitespace drawn (↵ ⇥ ␣), quoted; no HTML escaping (tables show text)."""
    if text is None or (not isinstance(text, str) and pd.isna(text)):
        return "''"
    s = str(text).replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍")
    return repr(s.replace(" ", "␣") if s and not s.strip(" ") else s)


__all__ = ["funnel_figure", "stage_table", "stage_rows"]
