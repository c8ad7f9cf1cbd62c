"""Showing runs: one run's settings, text, metrics, figures and trace; token chips shaded by probability; text
diffs between runs. Every piece of model or user text is shown as text (st.code / st.text / st.dataframe) or goes
through `esc` before it is put into HTML."""

from __future__ import annotations

import difflib
import html
import json
import math

import pandas as pd
import streamlit as st

import exports
import viz
from common import RunRecord, plain
from declab.core.meta import RunMeta
from declab.core.metrics import summarize

MAX_SEQUENCES_SHOWN = 8


def esc(text: str) -> str:
    """Escape model output for HTML."""
    return html.escape(str(text), quote=True)


def visible(token: str) -> str:
    """A token with its whitespace made visible, for tables (still plain text: escape before HTML)."""
    return str(token).replace("\n", "↵").replace("\t", "⇥").replace(" ", "␣") if token else "∅"


def html_block(inner: str) -> None:
    """Show an HTML snippet whose every piece of model text went through `esc` already."""
    st.html(f'<div class="declab-tokens" style="white-space: pre-wrap; font-family: ui-monospace, monospace; '
            f'line-height: 1.7">{inner}</div>')


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def metrics_row(info: RunMeta, frame: pd.DataFrame) -> None:
    m = info.metrics or summarize(frame)
    items = [("New tokens", m.get("new_tokens")), ("Tokens/s", m.get("tokens_per_s")),
             ("Mean entropy (bits)", m.get("mean_entropy_bits")), ("Perplexity", m.get("perplexity")),
             ("Median step (ms)", m.get("median_step_ms")), ("Wall (s)", info.wall_s)]
    items = [(k, v) for k, v in items if v is not None]
    if "acceptance_rate" in m:
        items.append(("Acceptance rate", m["acceptance_rate"]))
    cols = st.columns(len(items) or 1)
    for col, (k, v) in zip(cols, items):
        col.metric(k, v if isinstance(v, int) and not isinstance(v, bool) else plain(_number(v)))  # values: text


def token_chips(frame: pd.DataFrame, branch: int | None = None, highlight_step: int | None = None) -> str:
    """The chosen tokens as escaped spans shaded by probability (hover shows p). Returns HTML."""
    tok = frame[frame["kind"] == "token"]
    if branch is not None and "branch_id" in tok:
        tok = tok[tok["branch_id"] == branch]
    parts = []
    for step, text, lp in zip(tok["step"], tok["token_text"], tok["logprob"]):
        p = math.exp(lp) if pd.notna(lp) else None
        alpha = 0.08 + 0.5 * (1 - p) if p is not None else 0
        border = "outline: 2px solid #d62728;" if highlight_step is not None and step == highlight_step else ""
        title = f"step {step}: p={p:.3f}" if p is not None else f"step {step}"
        parts.append(f'<span title="{esc(title)}" style="background: rgba(255,140,0,{alpha:.2f}); {border} '
                     f'border-radius: 3px">{esc("" if pd.isna(text) else text)}</span>')
    return "".join(parts)


@st.fragment
def figure_panel(frame: pd.DataFrame, info: RunMeta, key: str) -> None:
    """The strategy's figures, with toggles that re-run only this fragment (never the decoding)."""
    if frame.empty:
        st.info("This run has no trace rows to plot.")
        return
    try:
        figs = viz.figures_for(frame, info.to_dict())
    except Exception as e:  # a figure bug must not take the page (or the run) down
        st.error(plain(f"Could not draw the figures: {type(e).__name__}: {e}"))
        return
    if not figs:
        st.info("No figures for this trace.")
        return
    names = list(figs)
    chosen = st.pills("Figures", names, selection_mode="multi", default=names[: min(3, len(names))],
                      key=f"{key}:figs")
    for name in chosen or []:
        st.plotly_chart(figs[name], key=f"{key}:fig:{name}", width="stretch")
    if st.toggle("Show tokens shaded by probability", key=f"{key}:chips"):
        html_block(token_chips(frame, branch=_main_branch(frame)))


def _main_branch(frame: pd.DataFrame) -> int | None:
    tok = frame[frame["kind"] == "token"]
    if tok.empty or tok["branch_id"].isna().all():
        return None
    return int(tok["branch_id"].dropna().iloc[0]) if tok["branch_id"].nunique() > 1 else None


def sequences_view(info: RunMeta) -> None:
    seqs = info.sequences
    if not seqs:
        st.caption("(no sequence)")
        return
    for i, s in enumerate(seqs[:MAX_SEQUENCES_SHOWN]):
        if len(seqs) > 1:
            score = s.get("score")
            ids = s.get("token_ids")
            st.caption(plain(f"Sequence {i + 1} · score {_number(score) if score is not None else 'n/a'} · "
                             f"{len(ids) if isinstance(ids, list) else 0} tokens"))
        st.code(str(s.get("text") or "") or " ", language=None, wrap_lines=True)
    if len(seqs) > MAX_SEQUENCES_SHOWN:
        st.caption(f"... and {len(seqs) - MAX_SEQUENCES_SHOWN} more sequences (all in the JSON export).")


def settings_text(info: RunMeta) -> str:
    """One line: strategy, model, device, dtype, quantization, seed, prompt format, parameters (shown as text)."""
    return (f"{info.strategy} on {info.model} ({info.device or '?'}, {info.dtype or '?'}, quantization "
            f"{info.quantization or '?'}) · seed {info.seed} · {info.prompt_format or '?'} prompt · params "
            f"{json.dumps(info.params, default=str)}")


def params_text(info: RunMeta) -> str:
    return ", ".join(f"{k}={v}" for k, v in info.params.items())


def show_run(rec: RunRecord, key: str, export: bool = True) -> None:
    """Text, metrics, figures, trace table and export buttons of one run."""
    info, frame = rec.info, rec.frame
    if rec.status == "failed":
        st.error(plain(f"This run failed: {rec.error}"))
    elif rec.status == "stopped":
        st.warning("This run was stopped before it finished; what it produced is shown.")
    st.text(settings_text(info))
    sequences_view(info)
    metrics_row(info, frame)
    figure_panel(frame, info, key=key)
    with st.expander("Trace rows"):
        kinds = sorted(frame["kind"].dropna().unique().tolist()) if not frame.empty else []
        pick = st.multiselect("Kinds", kinds, default=[k for k in kinds if k == "token"] or kinds, key=f"{key}:kinds")
        st.dataframe(frame[frame["kind"].isin(pick)], hide_index=True, width="stretch")
    with st.expander("Run metadata"):
        st.json(rec.meta, expanded=False)
    if export:
        exports.export_buttons(rec, key=key)


# ---------------------------------------------------------------------------------------------- text diffs
def token_texts(rec: RunRecord) -> list[str]:
    """The best sequence as token texts (from the trace's token_id -> token_text map), or its text as one piece."""
    seqs = rec.info.sequences
    if not seqs:
        return []
    ids = seqs[0].get("token_ids") or []
    f = rec.frame
    mapping = dict(zip(f["token_id"].dropna().astype(int), f.loc[f["token_id"].notna(), "token_text"]))
    if ids and all(i in mapping for i in ids):
        return ["" if pd.isna(mapping[i]) else str(mapping[i]) for i in ids]
    return [rec.text] if rec.text else []


def diff_html(tokens: list[str], against: list[str]) -> str:
    """`tokens` as escaped HTML, tokens not matched in `against` (difflib on token lists) marked."""
    sm = difflib.SequenceMatcher(None, against, tokens, autojunk=False)
    out = []
    for op, _a0, _a1, b0, b1 in sm.get_opcodes():
        piece = esc("".join(tokens[b0:b1]))
        if not piece:
            continue
        out.append(piece if op == "equal" else
                   f'<mark style="background: #ffe08a; border-radius: 3px">{piece}</mark>')
    return "".join(out) or "<em>(empty)</em>"


def similarity(a: list[str], b: list[str]) -> float:
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio() if (a or b) else 1.0
