"""Trained drafting heads (issue 18; strategies/head_drafters.py, strategies/kangaroo.py): how often each head's
top-1 token is the target's, by offset, on held-out prompts, read from the heads files' metadata (the numbers the
build measured, tools/heads_build.py).

`head_accuracy_figure({kind: info})`: one line per kind, x = offset d (the d-th drafted token after the root:
Medusa head d; Hydra head d, EAGLE step d and Kangaroo step d given the tokens before it were right, i.e. the
conditional acceptance of a chain), y = held-out top-1 accuracy; Medusa's top-5 dashed. Hover: positions scored.
`fig.layout.meta` = {kind: top1_by_offset}. None when no info has numbers.
"""

from __future__ import annotations

import plotly.graph_objects as go

from viz.common import PALETTE, esc, style


def head_accuracy_figure(infos: dict[str, dict]) -> go.Figure | None:
    fig = go.Figure()
    drawn = {}
    for i, (kind, info) in enumerate(infos.items()):
        held = (info or {}).get("held_out") or {}
        acc = held.get("top1_by_offset")
        if not acc:
            continue
        colour = PALETTE[i % len(PALETTE)]
        offsets = list(range(1, len(acc) + 1))
        fig.add_trace(go.Scatter(x=offsets, y=acc, mode="lines+markers", name=esc(kind), line={"color": colour},
                                 hovertemplate=f"{esc(kind)} offset %{{x}}: top-1 %{{y:.3f}}<br>"
                                               f"{held.get('positions', '?')} held-out positions<extra></extra>"))
        if held.get("top5_by_offset") and kind == "medusa":
            fig.add_trace(go.Scatter(x=offsets, y=held["top5_by_offset"], mode="lines", name=f"{esc(kind)} top-5",
                                     line={"color": colour, "dash": "dash"}))
        drawn[kind] = acc
    if not drawn:
        return None
    style(fig, "Held-out top-1 accuracy of the trained drafters, by offset", "offset d (drafted token d after the root)",
          "top-1 accuracy", height=380)
    fig.update_yaxes(range=[0, 1])
    fig.update_xaxes(dtick=1)
    fig.update_layout(meta=drawn)
    return fig
