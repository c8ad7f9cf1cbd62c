"""Shared pieces of the figures: escaping, column access, the chosen path through the token tree, layout.

Conventions every figure follows:
- x is the decoding `step` (0-based, one per generated token of the chosen sequence) unless said otherwise.
- Entropy and surprise are in bits; `logprob` is a natural log, so surprise = -logprob / ln 2.
- Model text (token_text, prompt, generated text, labels given by the caller) goes through `esc` before it
  reaches a figure: plotly renders a subset of HTML (<b>, <br>, <a href>, entities) in text and hover labels.
- A figure builder returns None when the frame lacks what it shows; it never raises on missing columns.
"""

from __future__ import annotations

import bisect
import functools
import html
import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go

LN2 = math.log(2.0)
_AXIS = {"gridcolor": "#ebf0f8", "linecolor": "#ebf0f8", "zerolinecolor": "#ebf0f8", "automargin": True}
HIGHLIGHT = "#d62728"        # the chosen path
MUTED = "#b0b0b0"            # pruned alternatives
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f",
           "#aec7e8", "#ffbb78", "#98df8a")
# plotly_white's look in a few keys (the named template costs ~70 ms per figure to copy; a built one ~4 ms)
TEMPLATE = {"layout": {"paper_bgcolor": "white", "plot_bgcolor": "white", "colorway": list(PALETTE),
                       "font": {"color": "#2a3f5f"}, "xaxis": _AXIS, "yaxis": _AXIS, "hoverlabel": {"align": "left"}}}
AXIS_TITLES = {"entropy": "entropy (bits)", "logprob": "logprob (ln p)", "surprise": "surprise (bits)",
               "dt_ms": "step time (ms)", "score": "score", "penalty": "penalty", "mu": "μ (bits)"}
_CONTROL = {"\n": "↵", "\r": "␍", "\t": "⇥"}


def esc(text) -> str:
    """Text -> safe for plotly labels and HTML: html.escape, with '"' as the numeric entity &#34; (plotly.js
    decodes numeric entities but not &quot;). None/NA -> ''."""
    if text is None or (not isinstance(text, str) and pd.isna(text)):
        return ""
    return html.escape(str(text)).replace("&quot;", "&#34;")


def show_token(text, limit: int | None = None) -> str:
    """A token as a visible, escaped label: newline/tab/CR drawn as ↵ ⇥ ␍, other control characters as \\xNN,
    an all-space token as ␣; cut to `limit` characters with an ellipsis."""
    if text is None or (not isinstance(text, str) and pd.isna(text)):
        return ""
    s = "".join(_CONTROL.get(c, f"\\x{ord(c):02x}" if ord(c) < 32 or ord(c) == 127 else c) for c in str(text))
    if s and not s.strip(" "):
        s = "␣" * len(s)
    if limit is not None and len(s) > limit:
        s = s[: limit - 1] + "…"
    return esc(s)


def has(frame: pd.DataFrame | None, *columns: str) -> bool:
    """True when every column exists and has at least one value."""
    return frame is not None and all(c in frame.columns and frame[c].notna().any() for c in columns)


def cells(frame: pd.DataFrame, name: str) -> pd.Series:
    """frame[name], or an all-missing column when the frame lacks it."""
    return frame[name] if name in frame.columns else pd.Series(pd.NA, index=frame.index, dtype="object")


def num(series: pd.Series) -> np.ndarray:
    """A column as float64 numpy with NaN for missing (works for Int64/boolean/Float64/object)."""
    return pd.to_numeric(series, errors="coerce").astype("float64").to_numpy()


def fmt(value, digits: int = 3) -> str:
    """A cell for hover text: numbers rounded, text escaped, missing -> ''."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.{digits}g}" if abs(value) < 1e4 else f"{float(value):.0f}"
    return esc(value)


def rows_of(frame: pd.DataFrame, *kinds: str) -> pd.DataFrame:
    if frame is None or "kind" not in frame.columns:
        return pd.DataFrame(columns=[] if frame is None else frame.columns)
    return frame[frame["kind"].isin(kinds)]


# ------------------------------------------------------------------------------------------------ token tree
def parent_finder(tokens: pd.DataFrame):
    """(parent_id, step) -> position in `tokens` of the latest row of branch `parent_id` at an earlier step
    (normally step-1; the last one when a step has several), or -1 for the prompt. This is how the
    (branch_id, parent_id, step) columns make a tree. Missing branch ids are read as 0 (a single chain)."""
    n = len(tokens)
    steps = np.nan_to_num(num(tokens["step"]), nan=-1.0) if "step" in tokens else np.zeros(n)
    branch_ids = np.nan_to_num(num(tokens["branch_id"])) if "branch_id" in tokens else np.zeros(n)
    by_branch: dict[float, tuple[list[float], list[int]]] = {}
    for k in np.argsort(steps, kind="stable"):
        s_list, p_list = by_branch.setdefault(branch_ids[k], ([], []))
        s_list.append(steps[k])
        p_list.append(int(k))

    def find(parent_id, step) -> int:
        parent_id = 0.0 if pd.isna(parent_id) else float(parent_id)
        if parent_id not in by_branch:
            return -1
        s_list, p_list = by_branch[parent_id]
        i = bisect.bisect_left(s_list, -1.0 if pd.isna(step) else float(step))
        return p_list[i - 1] if i else -1
    return find


def link_parents(tokens: pd.DataFrame) -> list[int]:
    """Parent position (in `tokens`, -1 = prompt) of every token row; see `parent_finder`."""
    find = parent_finder(tokens)
    return [find(p, s) for p, s in zip(cells(tokens, "parent_id"), tokens["step"])]


def sorted_tokens(frame: pd.DataFrame) -> pd.DataFrame:
    """The `token` rows sorted by step (stable, so the strategy's order within a step is kept); none without a
    step column."""
    tokens = rows_of(frame, "token")
    if "step" not in tokens.columns:                      # no steps, no tree or timeline
        return tokens.iloc[0:0]
    return tokens.sort_values("step", kind="stable")


def chosen_leaf(tokens: pd.DataFrame, frame: pd.DataFrame) -> int:
    """Position in `tokens` (sorted by step) of the last token of the chosen sequence, -1 if none.
    With `finish` rows: the one with final_rank 0 (the strategy's own ranking) or else the best score, whose
    branch is followed back from its step. Otherwise the best-scored token row at the last step (the first such
    row when there are no scores)."""
    if not len(tokens):
        return -1
    steps = num(tokens["step"])
    branches = num(tokens["branch_id"]) if "branch_id" in tokens else np.zeros(len(tokens))
    finish = rows_of(frame, "finish")
    if has(finish, "final_rank", "branch_id"):
        finish = finish[finish["final_rank"] == finish["final_rank"].min()]
    if len(finish) and has(finish, "score", "branch_id"):
        best = finish.loc[pd.to_numeric(finish["score"], errors="coerce").astype("float64").idxmax()]
        at = [k for k in range(len(tokens)) if branches[k] == float(best["branch_id"])
              and (pd.isna(best.get("step")) or steps[k] <= float(best["step"]))]
        if at:
            return at[-1]
    last = np.flatnonzero(steps == np.nanmax(steps)) if not np.isnan(steps).all() else np.arange(len(tokens))
    scores = num(tokens["score"])[last] if "score" in tokens else np.full(len(last), np.nan)
    return int(last[int(np.nanargmax(scores))] if not np.isnan(scores).all() else last[0])


def path_positions(parents: list[int], leaf: int) -> list[int]:
    """Positions from the root's child down to `leaf`."""
    out = []
    while leaf >= 0:
        out.append(leaf)
        leaf = parents[leaf]
    return out[::-1]


def chosen_path(frame: pd.DataFrame) -> pd.DataFrame:
    """The `token` rows of the chosen sequence in order: for a single chain every token row; for beams / drafts
    the path from the prompt to the chosen leaf (see `chosen_leaf`)."""
    tokens = sorted_tokens(frame)
    if not len(tokens):
        return tokens
    return tokens.iloc[path_positions(link_parents(tokens), chosen_leaf(tokens, frame))]


# ------------------------------------------------------------------------------------------------ layout
@functools.cache
def _template() -> go.layout.Template:
    return go.layout.Template(TEMPLATE)


def style(fig: go.Figure, title: str, x_title: str | None = None, y_title: str | None = None,
          height: int | None = None, legend_right: bool = False) -> go.Figure:
    """Common look: white template, title, axis titles, legend above the plot (right of it for figures with
    subplot titles)."""
    legend = ({"orientation": "v", "yanchor": "top", "y": 1.0, "xanchor": "left", "x": 1.02} if legend_right else
              {"orientation": "h", "yanchor": "bottom", "y": 1.0, "xanchor": "left", "x": 0})
    fig.update_layout(template=_template(), height=height, legend=legend,
                      margin={"l": 60, "r": 30, "t": 70 if legend_right else 100, "b": 50},
                      title={"text": title, "y": 0.98, "yanchor": "top", "x": 0.01, "xanchor": "left"})
    if x_title is not None:
        fig.update_xaxes(title_text=x_title)
    if y_title is not None:
        fig.update_yaxes(title_text=y_title)
    return fig


def meta_params(meta: dict | None) -> dict:
    params = (meta or {}).get("params") or {}
    return params if isinstance(params, dict) else {}


def strategy_of(frame: pd.DataFrame | None, meta: dict | None) -> str:
    if meta and meta.get("strategy"):
        return str(meta["strategy"])
    if has(frame, "strategy"):
        return str(frame["strategy"].dropna().iloc[0])
    return ""
