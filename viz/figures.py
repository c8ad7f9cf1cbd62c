"""figures_for: every figure that applies to a run, in display order (the app, the Trace explorer and the
HTML report all use it)."""

from __future__ import annotations

import logging

import pandas as pd
import plotly.graph_objects as go

from viz.acceptance import acceptance_figure, predicted_acceptance_figure
from viz.common import has, rows_of
from viz.mechanism import applicable
from viz.timeline import entropy_figure, latency_figure
from viz.tree import token_tree

log = logging.getLogger(__name__)


def mechanism_label(strategy: str) -> str:
    """Display label (key of figures_for) of a strategy's mechanism view: 'diverse_beam' -> 'Diverse beam'."""
    return strategy.replace("_", " ").capitalize()


def tree_color(frame: pd.DataFrame) -> str:
    """The most telling colouring of the token tree: group (diverse beam), model (several models), draft
    (superposed drafts), else logprob."""
    tokens = rows_of(frame, "token")
    if has(tokens, "group"):
        return "group"
    if has(tokens, "model") and tokens["model"].nunique() > 1:
        return "model"
    if has(tokens, "draft"):
        return "draft"
    return "logprob"


def figures_for(frame: pd.DataFrame, meta: dict | None = None) -> dict[str, go.Figure]:
    """Every figure that applies to this run, titled, in display order: "Token tree", "Entropy", "Latency",
    "Acceptance" (when accept/reject, masked_mass or several models), "Predicted acceptance" (speculative with
    adaptive=specdec: the acceptance predictor against what the target accepted), then the mechanism views ("Mirostat",
    "Diverse beam", ...). A figure that does not apply is left out; a figure that fails to build is logged and
    left out, so a page never breaks on an odd trace."""
    meta = meta or {}
    if frame is None or not len(frame) or "kind" not in frame.columns:
        return {}
    builders = [("Token tree", lambda: token_tree(frame, tree_color(frame)) if has(rows_of(frame, "token"), "step")
                 else None),
                ("Entropy", lambda: entropy_figure(frame, meta)),
                ("Latency", lambda: latency_figure(frame)),
                ("Acceptance", lambda: acceptance_figure(frame)),
                ("Predicted acceptance", lambda: predicted_acceptance_figure(frame, meta)
                 if (meta.get("metrics") or {}).get("acceptance_predictor") else None)]
    out: dict[str, go.Figure] = {}
    for label, build in builders:
        fig = _safely(label, build)
        if fig is not None:
            out[label] = fig
    for name, build in applicable(frame):
        label = mechanism_label(name)
        fig = _safely(label, lambda: build(frame, meta))
        if fig is not None:
            out[label] = fig
    return out


def _safely(label: str, build):
    try:
        return build()
    except Exception:  # a figure is a view: never let one break the page; the log keeps the traceback
        log.exception("figure %s failed", label)
        return None
