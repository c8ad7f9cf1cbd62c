"""Plotly figures over trace frames: pure functions, trace DataFrame (+ run metadata dict) -> go.Figure.

No model, no Streamlit, nothing runs at import time. Every text that came from a model or a user is escaped.

    figures_for(frame, meta) -> {label: Figure}        viz.figures: everything that applies, in display order
    token_tree(frame, color_by="logprob")              viz.tree
    entropy_figure(frame, meta=None)                   viz.timeline
    latency_figure(frame)                              viz.timeline
    compare_figure({name: frame}, column)              viz.timeline
    acceptance_figure(frame) -> Figure | None          viz.acceptance
    mechanism_figures(frame, meta) -> {strategy: Figure}   viz.mechanism
    html_report(meta, frame) -> str                    viz.report

Which figure needs what (each is left out, never an error, when its rows or columns are missing):
- Token tree: `token` rows with step (+ branch_id/parent_id for beams and drafts); candidate/prune/reject rows as
  greyed alternatives; coloured by group, model or draft when present, else logprob.
- Entropy: entropy and/or logprob along the chosen sequence; threshold lines from params (mirostat tau, ead
  tau/threshold, any entropy_threshold); `switch` rows as markers.
- Latency: any *_ms columns (fwd_ms, sel_ms, mask_ms, draft_ms, verify_ms...), else dt_ms; wall time from t_ms.
- Acceptance: accept/reject rows (+ round, draft_pos), masked_mass, or token rows from 2+ models.
- Mechanism views (viz.mechanism.MECHANISMS): mirostat (mu, surprise...), diverse_beam (group, penalty, 2+ groups).
"""

from viz.acceptance import acceptance_figure
from viz.figures import figures_for, mechanism_label, tree_color
from viz.mechanism import mechanism_figures
from viz.report import html_report
from viz.timeline import compare_figure, entropy_figure, latency_figure
from viz.tree import token_tree

__all__ = ["figures_for", "token_tree", "entropy_figure", "latency_figure", "acceptance_figure", "compare_figure",
           "mechanism_figures", "html_report", "tree_color", "mechanism_label"]
