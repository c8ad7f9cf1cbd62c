"""Sweep figures: pure functions of a sweep summary frame (declab/sweep/driver.py: one row per run) -> plotly figures.

    with_params(df)                                 the `params` JSON as columns `param.<name>`
    param_names(df), metric_names(df)               what can go on the axes
    metric_vs_param(df, metric, param)              one line per strategy (mean over prompts, then over seeds), the
                                                    seeds' range as a band, every run a faint point; a strategy
                                                    without the parameter is a dotted reference line
    grid_heatmap(df, metric, strategy, x, y)        a 2-D grid: the mean of the metric over prompts and seeds per cell
    pareto(df, mx, my, max_x, max_y)                one point per setting (strategy + parameters, mean over prompts and
                                                    seeds), the Pareto frontier of the two metrics drawn through them

Every point that is one run, or stands for a setting, carries that run's id (the setting's first run) in
`customdata`, so a page can open it. Text from the summary (strategy names, parameter values, prompt ids) goes into
hover labels escaped.
"""

from __future__ import annotations

import html
import json

import pandas as pd
import plotly.graph_objects as go

from viz.common import PALETTE

BASE = ("sweep", "strategy", "params", "prompt_id", "seed", "status", "error", "new_tokens", "wall_s",
        "tokens_per_s", "text", "run_id")
PREFIX = "param."


def _esc(value) -> str:
    return html.escape(str(value))


def with_params(df: pd.DataFrame) -> pd.DataFrame:
    """The summary with each run's parameters as columns `param.<name>` (NA where a strategy lacks one) and a
    `setting` label (strategy and parameters)."""
    out = df.copy()
    parsed = [json.loads(p) if isinstance(p, str) and p else {} for p in out["params"].astype(object).fillna("")]
    names: dict[str, None] = {}
    for p in parsed:
        for k in p:
            names.setdefault(k)
    for k in names:
        out[PREFIX + k] = pd.Series([p.get(k) for p in parsed], index=out.index, dtype=object)   # values as given
    out["setting"] = [f"{s} " + " ".join(f"{k}={v}" for k, v in p.items()) if p else str(s)
                      for s, p in zip(out["strategy"], parsed)]
    return out


def param_names(df: pd.DataFrame) -> list[str]:
    """Parameters with numeric values in at least two settings (what can be an axis)."""
    wide = with_params(df)
    out = []
    for col in wide.columns:
        if col.startswith(PREFIX):
            vals = pd.to_numeric(wide[col], errors="coerce").dropna()
            if vals.nunique() >= 2:
                out.append(col[len(PREFIX):])
    return out


def metric_names(df: pd.DataFrame) -> list[str]:
    """Numeric columns that are metrics (besides seed), in the summary's order."""
    return [c for c in df.columns if c not in BASE and pd.api.types.is_numeric_dtype(df[c])
            and not pd.api.types.is_bool_dtype(df[c])] + ["new_tokens", "wall_s", "tokens_per_s"]


def _ok(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    d = df[df["status"] == "ok"].copy()
    d[metric] = pd.to_numeric(d[metric], errors="coerce")
    return d[d[metric].notna()]


def metric_vs_param(df: pd.DataFrame, metric: str, param: str) -> go.Figure:
    wide = _ok(with_params(df), metric)
    col = PREFIX + param
    fig = go.Figure()
    strategies = list(dict.fromkeys(wide["strategy"]))
    for i, strategy in enumerate(strategies):
        color = PALETTE[i % len(PALETTE)]
        d = wide[wide["strategy"] == strategy].copy()
        has = col in d and pd.to_numeric(d[col], errors="coerce").notna().any()
        if not has:                                          # no such parameter: the strategy's mean as reference
            per_seed = d.groupby("seed")[metric].mean()
            if len(per_seed):
                fig.add_hline(y=float(per_seed.mean()), line_dash="dot", line_color=color,
                              annotation_text=_esc(strategy), annotation_font_color=color,
                              annotation_position=("top left", "bottom left", "top right", "bottom right")[i % 4])
            continue
        d["x"] = pd.to_numeric(d[col], errors="coerce")
        d = d[d["x"].notna()]
        per_seed = d.groupby(["x", "seed"])[metric].mean().reset_index()       # mean over prompts
        agg = per_seed.groupby("x")[metric].agg(["mean", "min", "max"]).reset_index().sort_values("x")
        xs = list(agg["x"])
        fig.add_trace(go.Scatter(x=xs + xs[::-1], y=list(agg["max"]) + list(agg["min"])[::-1], fill="toself",
                                 fillcolor=color, opacity=0.18, line=dict(width=0), hoverinfo="skip",
                                 showlegend=False, name=f"{_esc(strategy)} seeds"))
        fig.add_trace(go.Scatter(x=xs, y=agg["mean"], mode="lines+markers", name=_esc(strategy),
                                 line=dict(color=color, width=2), hovertemplate=f"{_esc(strategy)}<br>{_esc(param)}="
                                 "%{x}<br>" + _esc(metric) + "=%{y:.4g}<extra>mean over prompts and seeds</extra>"))
        fig.add_trace(go.Scatter(x=d["x"], y=d[metric], mode="markers", name=f"{_esc(strategy)} runs",
                                 marker=dict(color=color, size=5, opacity=0.35), showlegend=False,
                                 customdata=d[["run_id"]].astype(str).values,
                                 text=[_esc(f"prompt {p}, seed {s}") for p, s in zip(d["prompt_id"], d["seed"])],
                                 hovertemplate="%{text}<br>" + _esc(metric) + "=%{y:.4g}<extra>run %{customdata[0]}"
                                               "</extra>"))
    fig.update_layout(title=f"{_esc(metric)} against {_esc(param)} (line: mean; band: range over seeds)",
                      xaxis_title=_esc(param), yaxis_title=_esc(metric), height=420, margin=dict(t=50, b=40))
    return fig


def grid_heatmap(df: pd.DataFrame, metric: str, strategy: str, x: str, y: str) -> go.Figure:
    wide = _ok(with_params(df), metric)
    d = wide[wide["strategy"] == strategy]
    fig = go.Figure()
    if PREFIX + x not in d or PREFIX + y not in d or d.empty:
        fig.update_layout(title=f"{_esc(strategy)} has no grid over {_esc(x)} and {_esc(y)}", height=300)
        return fig
    d = d.assign(_x=d[PREFIX + x].astype(str), _y=d[PREFIX + y].astype(str))
    cells = d.groupby(["_y", "_x"])[metric].mean().unstack("_x")
    first = d.groupby(["_y", "_x"])["run_id"].first().unstack("_x").reindex_like(cells)

    def order(values):
        return sorted(values, key=lambda v: (pd.to_numeric(v, errors="coerce"), v))
    cols, rows = order(cells.columns), order(cells.index)
    cells, first = cells.loc[rows, cols], first.loc[rows, cols]
    fig.add_trace(go.Heatmap(z=cells.values, x=[_esc(c) for c in cols], y=[_esc(r) for r in rows],
                             colorscale="Viridis", colorbar=dict(title=_esc(metric)),
                             customdata=first.astype(str).values[..., None],
                             text=[[f"{v:.4g}" if v == v else "" for v in row] for row in cells.values],
                             texttemplate="%{text}",
                             hovertemplate=_esc(x) + "=%{x}<br>" + _esc(y) + "=%{y}<br>" + _esc(metric)
                                           + "=%{z:.4g}<extra>mean over prompts and seeds</extra>"))
    fig.update_layout(title=f"{_esc(strategy)}: {_esc(metric)} over {_esc(x)} x {_esc(y)}", xaxis_title=_esc(x),
                      yaxis_title=_esc(y), height=420, margin=dict(t=50, b=40))
    return fig


def frontier(points: pd.DataFrame, mx: str, my: str, max_x: bool, max_y: bool) -> pd.DataFrame:
    """The Pareto-optimal rows: no other row is at least as good on both metrics and better on one (better =
    larger where max_*, else smaller). Sorted by mx."""
    sx, sy = (1 if max_x else -1), (1 if max_y else -1)
    vals = list(zip(points[mx] * sx, points[my] * sy))
    keep = [i for i, (a, b) in enumerate(vals)
            if not any((c >= a and d >= b) and (c > a or d > b) for c, d in vals)]
    return points.iloc[keep].sort_values(mx)


def pareto(df: pd.DataFrame, mx: str, my: str, max_x: bool = True, max_y: bool = False) -> go.Figure:
    wide = _ok(_ok(with_params(df), mx), my)
    points = (wide.groupby(["strategy", "setting"], sort=False)
              .agg(x=(mx, "mean"), y=(my, "mean"), run_id=("run_id", "first"), n=("run_id", "size")).reset_index())
    fig = go.Figure()
    if points.empty:
        fig.update_layout(title="no ok runs with both metrics", height=300)
        return fig
    for i, strategy in enumerate(dict.fromkeys(points["strategy"])):
        d = points[points["strategy"] == strategy]
        fig.add_trace(go.Scatter(x=d["x"], y=d["y"], mode="markers", name=_esc(strategy),
                                 marker=dict(size=10, color=PALETTE[i % len(PALETTE)]),
                                 customdata=d[["run_id"]].astype(str).values, text=[_esc(s) for s in d["setting"]],
                                 hovertemplate="%{text}<br>" + _esc(mx) + "=%{x:.4g}<br>" + _esc(my)
                                               + "=%{y:.4g}<extra>mean over the setting's runs</extra>"))
    front = frontier(points, "x", "y", max_x, max_y)
    fig.add_trace(go.Scatter(x=front["x"], y=front["y"], mode="lines+markers", name="Pareto frontier",
                             line=dict(color="#444", dash="dash"), marker=dict(size=4, color="#444"),
                             hoverinfo="skip"))
    better = f"better: {'higher' if max_x else 'lower'} {_esc(mx)}, {'higher' if max_y else 'lower'} {_esc(my)}"
    fig.update_layout(title=f"Pareto frontier: {_esc(my)} against {_esc(mx)} ({better}; one point per setting)",
                      xaxis_title=_esc(mx), yaxis_title=_esc(my), height=420, margin=dict(t=50, b=40))
    return fig
