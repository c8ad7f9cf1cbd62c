"""Mechanism views: what a strategy's own state did, one figure per strategy, chosen by the columns present.

MECHANISMS maps a strategy name to (columns the token rows need, builder). A strategy that records those columns
gets its view whatever its name; add an entry here when a strategy lands (see "Trace and metrics" in docs/strategies.md).
- mirostat (mu, surprise; optional mu_after, surprise_mean, k; tau from the params): mu before/after each step,
  the observed surprise and its running mean against the target tau, all in bits; k (tokens kept) on the right
  axis.
- diverse_beam (group, penalty with 2+ groups; optional collisions): the diversity penalty paid per step by each
  group, and the
  per-step collisions (chosen tokens also chosen by an earlier group at the same step; computed from token_id
  when there is no collisions column).
- gcd / asap (p_gcd + masked_mass / p_asap + efg_after): viz.grammar; KL to the target against samples, the
  distributions, EFG~(root) and the prefix trie (the gcd view steps aside for asap runs).
- spec_tree (origin, round, depth on the token rows): viz.spec_tree; the draft tree of each round (slider),
  acceptance by depth, tokens per round against time.
- sampler_chain (n_stages on the token rows, `stage` rows): viz.funnel; per step the candidates and the model mass
  left after each stage of the llama.cpp chain (log axis).
- cautious / adadec (intervened + num_trials / greedy_token): viz.uncertainty; the entropy timeline with the steps
  where the gate fired and its threshold, and the trials / lookahead candidates compared there.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from viz.common import PALETTE, chosen_path, fmt, has, meta_params, num, rows_of, style
from viz.timeline import threshold_lines
from viz.contrastive_search import contrastive_search_figure
from viz.momentum import momentum_figure
from viz.grammar import asap_figure, gcd_figure
from viz.two_model import ead_figure, speculative_figure
from viz.spec_tree import spec_tree_figure
from viz.uscd import contrastive_figure, uscd_figure
from viz.superposed import superposed_figure
from viz.funnel import funnel_figure
from viz.uncertainty import adadec_figure, cautious_figure


def mirostat_figure(frame: pd.DataFrame, meta: dict | None = None) -> go.Figure | None:
    """mu (bits) before and after each update, observed surprise S_t (bits) and its running mean, tau line."""
    path = chosen_path(frame)
    if not has(path, "mu"):
        return None
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    x = num(path["step"])
    fig.add_trace(go.Scatter(x=x, y=num(path["mu"]), mode="lines", name="μ before step", line={"color": PALETTE[0]}))
    if has(path, "mu_after"):
        fig.add_trace(go.Scatter(x=x, y=num(path["mu_after"]), mode="lines", name="μ after update",
                                 line={"color": PALETTE[0], "dash": "dot"}))
    if has(path, "surprise"):
        s = num(path["surprise"])
        running = (num(path["surprise_mean"]) if has(path, "surprise_mean")      # the strategy's own running mean
                   else pd.Series(s).expanding().mean().to_numpy())
        fig.add_trace(go.Scatter(x=x, y=s, mode="markers", name="observed surprise S_t",
                                 marker={"color": PALETTE[1], "size": 6}))
        fig.add_trace(go.Scatter(x=x, y=running, mode="lines", name="running mean of S_t",
                                 line={"color": PALETTE[1], "width": 3}))
    if has(path, "k"):
        fig.add_trace(go.Scatter(x=x, y=num(path["k"]), mode="lines", name="k (tokens kept)",
                                 line={"color": "#999999", "shape": "hv"}), secondary_y=True)
        fig.update_yaxes(title_text="k (tokens kept)", type="log", secondary_y=True, showgrid=False)
    for label, value in threshold_lines("mirostat", meta_params(meta)).items():
        fig.add_hline(y=value, line_dash="dash", line_color=PALETTE[3], annotation_text=f"{label} = {value:g}")
    fig.update_yaxes(title_text="bits", secondary_y=False)
    return style(fig, "Mirostat: μ and observed surprise against τ", "step", None, height=400)


def collisions_per_step(tokens: pd.DataFrame) -> pd.Series:
    """Per step: how many token rows chose a token_id that an earlier group (lower `group`) chose at the same
    step (counted once per row). Uses the `collisions` column instead when the strategy recorded it."""
    if has(tokens, "collisions"):
        return tokens.groupby("step")["collisions"].sum()
    counts = {}
    for step, rows in tokens.groupby("step"):
        seen: set = set()
        n = 0
        for _, group_rows in rows.groupby("group", sort=True):
            ids = set(group_rows["token_id"].dropna().tolist())
            n += int(group_rows["token_id"].isin(seen).sum())
            seen |= ids
        counts[step] = n
    return pd.Series(counts, dtype="float64")


def diverse_beam_figure(frame: pd.DataFrame, meta: dict | None = None) -> go.Figure | None:
    """Top: penalty paid per step by each group (sum over the group's token rows). Bottom: collisions per step."""
    tokens = rows_of(frame, "token")
    if not has(tokens, "group", "penalty", "step") or tokens["group"].nunique() < 2:    # plain beam: nothing to show
        return None
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.12,
                        subplot_titles=["Diversity penalty paid per group", "Collisions with earlier groups"])
    paid = tokens.groupby(["step", "group"])["penalty"].sum(min_count=1).unstack("group")
    for i, group in enumerate(paid.columns):
        fig.add_trace(go.Scatter(x=num(paid.index.to_series()), y=num(paid[group]), mode="lines+markers",
                                 name=f"group {fmt(group)}", line={"color": PALETTE[i % len(PALETTE)]}),
                      row=1, col=1)
    collisions = collisions_per_step(tokens) if has(tokens, "token_id") or has(tokens, "collisions") else None
    if collisions is not None:
        fig.add_trace(go.Bar(x=num(collisions.index.to_series()), y=collisions.to_numpy(), name="collisions",
                             marker_color="#7f7f7f", showlegend=False), row=2, col=1)
    fig.update_yaxes(title_text="penalty (λ·count)", row=1, col=1)
    fig.update_yaxes(title_text="collisions", row=2, col=1)
    fig.update_xaxes(title_text="step", row=2, col=1)
    return style(fig, "Diverse beam search: penalty paid and collisions", height=520, legend_right=True)


# strategy name -> (columns needed on the token rows, builder(frame, meta) -> Figure | None)
MECHANISMS = {
    "mirostat": (("mu",), mirostat_figure),
    "diverse_beam": (("group", "penalty"), diverse_beam_figure),
    "momentum": (("repeat_len", "resistance"), momentum_figure),
    "contrastive_search": (("degeneration_penalty",), contrastive_search_figure),
    "gcd": (("p_gcd", "masked_mass"), gcd_figure),
    "asap": (("p_asap", "efg_after"), asap_figure),
    "uscd": (("sum_sq", "contrast"), uscd_figure),
    "contrastive": (("head_size", "flip"), contrastive_figure),
    "superposed": (("weight", "weight_entropy"), superposed_figure),
    "speculative": (("origin", "round"), speculative_figure),
    "ead": (("rolling_entropy",), ead_figure),
    "spec_tree": (("origin", "round", "depth"), spec_tree_figure),
    "sampler_chain": (("n_stages",), funnel_figure),
    "cautious": (("intervened", "num_trials"), cautious_figure),
    "adadec": (("intervened", "greedy_token"), adadec_figure),
}


def applicable(frame: pd.DataFrame) -> list[tuple[str, object]]:
    """(strategy name, builder) of every mechanism view whose columns the token rows carry, in MECHANISMS order."""
    tokens = rows_of(frame, "token")
    return [(name, build) for name, (columns, build) in MECHANISMS.items() if has(tokens, *columns)]


def mechanism_figures(frame: pd.DataFrame, meta: dict | None = None) -> dict[str, go.Figure]:
    """Every mechanism view that applies, keyed by strategy name."""
    out = {}
    for name, build in applicable(frame):
        fig = build(frame, meta)
        if fig is not None:
            out[name] = fig
    return out
