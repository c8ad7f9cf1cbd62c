"""Shared pieces of the declab Streamlit app: model cache, generated parameter forms, background runs with live
streaming and Stop, the session's run history, figure panels, exports and escaped token rendering.

The app stays thin: decoding lives in declab/ and strategies/, figures in viz/. Everything per user lives in
`st.session_state` (never in module globals), so two browser sessions never see each other's runs; the only thing
shared between sessions is the loaded model (`st.cache_resource`), which holds no per-run state.

Model output (token text) is untrusted: it is rendered with st.code / st.text / st.dataframe, or passed through
`html.escape` before it goes into any HTML.
"""

from __future__ import annotations

import difflib
import html
import io
import json
import math
import os
import sys
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:          # `streamlit run app/Home.py` puts app/ on sys.path, not the repository root
    sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import streamlit as st  # noqa: E402
from streamlit.runtime.scriptrunner_utils.exceptions import StopException  # noqa: E402

import strategies  # noqa: E402,F401  (registers every strategy)
from declab.core import trace as tr  # noqa: E402
from declab.core.errors import UserError  # noqa: E402
from declab.core.metrics import summarize  # noqa: E402
from declab.models.registry import DEFAULT_PATH, ENV_PATH, ModelSpec, Registry, load_registry  # noqa: E402
from declab.run import Run, RunRequest, validate  # noqa: E402
from declab.core import MAX_NEW_TOKENS, STRATEGIES, Strategy, get_strategy  # noqa: E402

DEFAULT_PROMPT = "Explain in two sentences why the sky is blue."
DEFAULT_MAX_NEW_TOKENS = 48
MAX_HISTORY = 50                      # runs kept per browser session (oldest dropped first)
POLL_S = 0.12                         # how often the page refreshes a streaming run
JS_INT = 2**53 - 1                    # the largest integer a browser number widget holds exactly

# session_state keys (all app state of one browser session lives under these)
K_RUNS = "declab_runs"                # list[RunRecord], oldest first
K_BATCH = "declab_batch"              # the Batch decoding right now (or finished, not yet collected)
K_LAST = "declab_last"                # {"run": run_id, "compare": [run_ids], "teach": run_id}
K_NOTICE = "declab_notice"            # messages to show once after a batch is collected
K_COUNTER = "declab_counter"


# ---------------------------------------------------------------------------------------------- registry, models
def registry_path() -> str:
    return str(os.environ.get(ENV_PATH) or DEFAULT_PATH)


def get_registry() -> Registry:
    """The model registry; a broken models.yaml stops the page with its one-line message."""
    try:
        return load_registry(registry_path())
    except UserError as e:
        st.error(f"Model registry: {e}")
        st.stop()


@st.cache_resource(show_spinner=False, max_entries=3)
def _load_model(key: str, path: str):
    """One LM per (model key, registry file) for the whole server process, shared by every session.
    The LM holds weights and tokenizer only; runs keep their state on their own `Run` objects."""
    from declab.models.loading import load_lm
    return load_lm(load_registry(path).get(key))


def load_model(key: str):
    """(lm, info) for a registry key, with a spinner; raises UserError (not cached) when it cannot load."""
    with st.spinner(f"Loading model {key} (the first load of the embedded model converts it once, ~20 s)..."):
        return _load_model(key, registry_path())


def resolved_device(spec: ModelSpec) -> str:
    from declab.models.loading import resolve_device
    try:
        return resolve_device(spec)
    except UserError as e:
        return f"unavailable ({e})"


def model_caption(spec: ModelSpec) -> str:
    chat = "chat template on" if spec.chat else "raw prompts"
    return (f"{spec.description} · source: {spec.source_text} · quantization: {spec.quantization} · dtype: "
            f"{spec.dtype} · device: {spec.device} -> {resolved_device(spec)} · context {spec.context_length} · {chat}")


# ---------------------------------------------------------------------------------------------- forms
def strategy_names() -> list[str]:
    return list(STRATEGIES)


def strategy_label(name: str) -> str:
    s = STRATEGIES.get(name)
    return f"{name} — {s.title}" if s else name


def _param_help(p: dict) -> str:
    text = p.get("help") or ""
    return f"{text} Range: {p['range']}. Default: {p['default']!r}.".strip()


def param_widget(p: dict, key: str):
    """One widget for one parameter spec from `Strategy.params()`; returns the value (typed, or text for tuples)."""
    name, default, help_ = p["name"], p["default"], _param_help(p)
    choices = p.get("choices")
    if choices:
        options = list(choices)
        return st.selectbox(name, options, index=options.index(default) if default in options else 0, key=key,
                            help=help_)
    if isinstance(default, bool):
        return st.checkbox(name, value=default, key=key, help=help_)
    if isinstance(default, int):
        lo, hi = p.get("lo"), p.get("hi")
        return st.number_input(name, value=int(default), step=1, key=key, help=help_,
                               min_value=None if lo is None else max(-JS_INT, int(math.floor(lo))),
                               max_value=None if hi is None else min(JS_INT, int(math.ceil(hi))))
    if isinstance(default, float):
        lo, hi = p.get("lo"), p.get("hi")
        span = (hi - lo) if lo is not None and hi is not None else None
        step = 0.01 if span is not None and span <= 2 else 0.1
        return st.number_input(name, value=float(default), step=step, format="%g", key=key, help=help_,
                               min_value=None if lo is None else float(lo),
                               max_value=None if hi is None else float(hi))
    if isinstance(default, tuple):
        return st.text_input(name, value=", ".join(str(x) for x in default), key=key, help=help_)
    return st.text_input(name, value="" if default is None else str(default), key=key, help=help_)


def param_form(strategy: Strategy, prefix: str, columns: int = 3) -> dict:
    """Widgets generated from `strategy.params()` (so new strategies need no app change); returns name -> value.
    Values are validated later by `strategy.make_config` (via runner.validate), whose message names the range."""
    specs = strategy.params()
    if not specs:
        st.caption(f"{strategy.name} has no parameters.")
        return {}
    values = {}
    cols = st.columns(min(columns, len(specs)))
    for i, p in enumerate(specs):
        with cols[i % len(cols)]:
            values[p["name"]] = param_widget(p, key=f"{prefix}:{strategy.name}:{p['name']}")
    return values


def strategy_needs(strategy: Strategy) -> set[str]:
    """Extra inputs a strategy takes beyond its parameters: `needs` on the class if it declares it (a set of
    'grammar', 'second_model', 'lame_prompt'), else what the strategy name implies."""
    declared = getattr(strategy, "needs", None)
    if declared is not None:
        return set(declared)
    implied = {"gcd": {"grammar"}, "asap": {"grammar"}, "speculative": {"second_model"},
               "contrastive": {"second_model"}, "uscd": {"lame_prompt"}}
    return implied.get(strategy.name, set())


def extras_form(strategy: Strategy, spec: ModelSpec, registry: Registry, prefix: str) -> dict:
    """Inputs passed to the strategy through `RunRequest.extras` (grammar text, second model, lame prompt)."""
    needs = strategy_needs(strategy)
    extras: dict = {}
    if "grammar" in needs:
        examples = getattr(strategy, "grammar_examples", None) or {}
        if examples:
            pick = st.selectbox("Built-in grammar", ["(custom)"] + list(examples), key=f"{prefix}:grammar_pick")
        else:
            pick = "(custom)"
        default = examples.get(pick, "") if pick != "(custom)" else ""
        text = st.text_area("Grammar (EBNF/GBNF)", value=default, key=f"{prefix}:grammar:{pick}", height=140)
        if text.strip():
            extras["grammar"] = text
    if "second_model" in needs:
        if spec.pairs:
            second = st.selectbox("Second model (draft / small / amateur)", list(spec.pairs), key=f"{prefix}:second",
                                  help="Same-tokenizer smaller models listed under `pairs` in models.yaml.")
            extras["second_model"] = second
        else:
            st.info(f"Model '{spec.key}' lists no same-tokenizer smaller model under `pairs` in models.yaml, so "
                    f"{strategy.name} has no second model to use here.")
    if "lame_prompt" in needs:
        lame = st.text_area("Lame prompt (leave empty to derive it from the prompt)", key=f"{prefix}:lame", height=100)
        if lame.strip():
            extras["lame_prompt"] = lame
    return extras


@dataclass
class Setup:
    """What the shared part of a run form produced."""

    model: str
    prompt: str
    prompt_format: str
    max_new_tokens: int
    seed: int


def model_select(registry: Registry, key: str) -> ModelSpec:
    keys = list(registry.models)
    model = st.selectbox("Model", keys, index=keys.index(registry.default), key=key,
                         help="Models come from models.yaml; the default is the embedded SmolLM2-135M-Instruct.")
    spec = registry.get(model)
    st.caption(model_caption(spec))
    return spec


def prompt_inputs(spec: ModelSpec, prefix: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> tuple[str, str, int, int]:
    prompt = st.text_area("Prompt", value=DEFAULT_PROMPT, key=f"{prefix}:prompt", height=100)
    c1, c2, c3 = st.columns(3)
    with c1:
        fmts = ["chat", "raw"]
        fmt = st.radio("Prompt format", fmts, index=0 if spec.chat else 1, horizontal=True,
                       key=f"{prefix}:format:{spec.key}",
                       help="chat: one user turn in the model's chat template; raw: the text verbatim.")
    with c2:
        n = st.number_input("Max new tokens", min_value=1, max_value=MAX_NEW_TOKENS, value=max_new_tokens, step=1,
                            key=f"{prefix}:max_new_tokens", help=f"1 to {MAX_NEW_TOKENS}.")
    with c3:
        seed = st.number_input("Seed", min_value=0, max_value=JS_INT, value=0, step=1, key=f"{prefix}:seed",
                               help="Every random draw of a run uses its own generator seeded with this.")
    return prompt, fmt, int(n), int(seed)


def strategy_select(key: str, default: str = "greedy") -> Strategy:
    names = strategy_names()
    name = st.selectbox("Strategy", names, index=names.index(default) if default in names else 0,
                        format_func=strategy_label, key=key)
    return get_strategy(name)


# ---------------------------------------------------------------------------------------------- run history
@dataclass
class RunRecord:
    """One finished (ok / stopped / failed) run of this session, or a trace loaded in the explorer."""

    meta: dict
    frame: pd.DataFrame
    label: str

    @property
    def run_id(self) -> str:
        return str(self.meta.get("run_id", ""))

    @property
    def status(self) -> str:
        return str(self.meta.get("status", "ok"))

    @property
    def error(self):
        return self.meta.get("error")

    @property
    def text(self) -> str:
        seqs = self.meta.get("sequences") or []
        return seqs[0].get("text", "") if seqs else ""


def runs() -> list[RunRecord]:
    return st.session_state.setdefault(K_RUNS, [])


def last() -> dict:
    return st.session_state.setdefault(K_LAST, {})


def find_run(run_id: str) -> RunRecord | None:
    return next((r for r in runs() if r.run_id == run_id), None)


def next_number() -> int:
    st.session_state[K_COUNTER] = st.session_state.get(K_COUNTER, 0) + 1
    return st.session_state[K_COUNTER]


def add_run(meta: dict, frame: pd.DataFrame, origin: str = "") -> RunRecord:
    n = next_number()
    status = meta.get("status", "ok")
    suffix = "" if status == "ok" else f" [{status}]"
    label = f"#{n} {meta.get('strategy', '?')} · {meta.get('model', '?')}{origin}{suffix}"
    rec = RunRecord(meta=meta, frame=frame, label=label)
    history = runs()
    history.append(rec)
    del history[:-MAX_HISTORY]
    return rec


def run_picker(label: str, key: str, prefer: str | None = None) -> RunRecord | None:
    """Select one run of this session (newest first)."""
    history = runs()
    if not history:
        return None
    ids = [r.run_id for r in reversed(history)]
    if prefer in ids and st.session_state.get(f"{key}:prefer") != prefer:
        st.session_state[key] = prefer                 # jump to a newly finished run once
        st.session_state[f"{key}:prefer"] = prefer
    if st.session_state.get(key) not in ids:
        st.session_state.pop(key, None)
    labels = {r.run_id: r.label for r in history}
    chosen = st.selectbox(label, ids, format_func=lambda i: labels.get(i, i), key=key)
    return find_run(chosen)


# ---------------------------------------------------------------------------------------------- background runs
@dataclass
class Job:
    label: str
    run: Run


@dataclass
class Batch:
    """Runs decoded one after another in a background thread (fair timings, one model forward at a time per
    session). The page polls it, so a Stop click, a widget change or leaving the page never loses a run."""

    kind: str                                    # run | compare | teach
    jobs: list[Job]
    lm: object
    stop_all: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    current: int = 0
    errors: dict = field(default_factory=dict)   # job index -> one-line message (UserError raised mid-run)
    unsaved: dict = field(default_factory=dict)  # job index -> why its run is not in the run library
    collected: bool = False

    def start(self) -> None:
        threading.Thread(target=self._work, daemon=True, name=f"declab-{self.kind}").start()

    def _work(self) -> None:
        try:
            for i, job in enumerate(self.jobs):
                self.current = i
                if self.stop_all.is_set():
                    job.run.stop.set()
                try:
                    for _ in job.run.events():
                        pass
                except UserError as e:
                    self.errors[i] = str(e)
                except Exception as e:  # the runner records failures itself; this is a last resort
                    self.errors[i] = f"{type(e).__name__}: {e}"
                if job.run.result is not None:   # kept in the run library as soon as it ends (ok, stopped, failed)
                    problem = library_save(job.run.result)
                    if problem:
                        self.unsaved[i] = problem
        finally:
            self.done.set()

    def stop(self) -> None:
        self.stop_all.set()
        for job in self.jobs:
            job.run.stop.set()


def library_save(result) -> str | None:
    """Keep a finished run (ok, stopped or failed) in the run library (declab/store.py; shared by every session
    and the CLI). Returns None, or why it could not be saved (the run stays in this session either way)."""
    from declab.run.store import open_store
    try:
        open_store().save(result, source="app")
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def active_batch() -> Batch | None:
    return st.session_state.get(K_BATCH)


def start_batch(kind: str, model: str, requests: list[tuple[str, RunRequest]]) -> Batch | None:
    """Validate every request (no model needed), load the model, build the runs, start decoding. Shows st.error and
    returns None on bad input; nothing is started then and no earlier run is touched."""
    busy = active_batch()
    if busy is not None and not busy.done.is_set():
        st.warning("A run is still in progress in this session; stop it or wait for it to finish.")
        return None
    registry = load_registry(registry_path())
    try:
        for label, req in requests:
            try:
                validate(req, registry)
            except UserError as e:
                raise UserError(f"{label}: {e}" if len(requests) > 1 else str(e)) from None
        lm, _info = load_model(model)
        jobs = []
        for label, req in requests:
            extras = dict(req.extras)
            if extras.get("second_model"):
                extras["second_lm"] = load_model(extras["second_model"])[0]
                req.extras = extras
            try:
                jobs.append(Job(label=label, run=Run(lm, req, registry)))
            except UserError as e:
                raise UserError(f"{label}: {e}" if len(requests) > 1 else str(e)) from None
    except UserError as e:
        st.error(str(e))
        return None
    except Exception as e:  # e.g. out of memory while loading: a message, never a traceback, nothing lost
        st.error(f"Could not start the run: {type(e).__name__}: {e}")
        return None
    batch = Batch(kind=kind, jobs=jobs, lm=lm)
    st.session_state[K_BATCH] = batch
    batch.start()
    return batch


def _stop_clicked() -> None:
    batch = active_batch()
    if batch is not None:
        batch.stop()


def collect() -> list[RunRecord]:
    """Move a finished batch's results into the session history (exactly once) and remember them for the pages."""
    batch = active_batch()
    if batch is None or not batch.done.is_set() or batch.collected:
        return []
    batch.collected = True
    st.session_state.pop(K_BATCH, None)
    records, notices = [], []
    for i, job in enumerate(batch.jobs):
        if i in batch.errors:
            notices.append(("error", f"{job.label}: {batch.errors[i]}" if len(batch.jobs) > 1 else batch.errors[i]))
            continue
        result = job.run.result
        if result is None:
            continue
        origin = f" ({job.label})" if batch.kind == "compare" else ""
        rec = add_run(result.meta, result.frame, origin)
        if i in batch.unsaved:
            notices.append(("warning", f"{rec.label} is not in the run library: {batch.unsaved[i]}"))
        records.append(rec)
        if result.status == "failed":
            notices.append(("error", f"{rec.label} failed: {result.error}. Earlier runs are kept."))
        elif result.status == "stopped":
            notices.append(("warning", f"{rec.label} was stopped after {len(result.sequences[0].token_ids)} tokens."))
    if records:
        if batch.kind == "compare":
            last()["compare"] = [r.run_id for r in records]
        else:
            last()[batch.kind] = records[-1].run_id
    st.session_state.setdefault(K_NOTICE, {}).setdefault(batch.kind, []).extend(notices)
    return records


def show_notices(kind: str) -> None:
    for level, msg in st.session_state.get(K_NOTICE, {}).pop(kind, []):
        (st.error if level == "error" else st.warning)(msg)


def follow(batch: Batch) -> None:
    """Stream a batch: a progress bar and the text so far for every job, and a Stop button; then collect it.
    The live view is cleared once the batch is collected (the page then shows the finished runs)."""
    live = st.empty()
    with live.container():
        st.button("Stop", on_click=_stop_clicked, key=f"stop:{batch.kind}", icon=":material/stop_circle:")
        slots = []
        cols = st.columns(len(batch.jobs)) if len(batch.jobs) > 1 else [st.container()]
        for col, job in zip(cols, batch.jobs):
            with col:
                if len(batch.jobs) > 1:
                    st.caption(job.label)
                slots.append((st.empty(), st.empty()))
    try:
        while True:
            finished = batch.done.is_set()
            for i, (job, (bar, text)) in enumerate(zip(batch.jobs, slots)):
                ids = list(job.run.latest)
                total = job.run.request.max_new_tokens
                state = "done" if job.run.result is not None or finished else (
                    "decoding" if i == batch.current else "waiting")
                bar.progress(min(len(ids) / total, 1.0), text=f"{len(ids)} / {total} tokens · {state}")
                text.code(batch.lm.decode(ids) if ids else " ", language=None, wrap_lines=True)
            if finished:
                break
            time.sleep(POLL_S)
    except StopException:
        # Streamlit's own toolbar "Stop" ends the script: end the decoding too (a rerun, from a widget or our Stop
        # button, lets it go on and is followed again on the next run of the page)
        batch.stop()
        raise
    collect()
    live.empty()


def run_section(kind: str) -> None:
    """Follow this page's batch if one is decoding (also after a rerun), else collect a finished one."""
    batch = active_batch()
    if batch is not None and batch.kind == kind and not batch.collected:
        follow(batch)
    else:
        collect()


def sidebar_status(slot) -> None:
    """In the sidebar: a batch decoding while another page is shown (with a Stop button), and the run count."""
    batch = active_batch()
    n = len(runs())
    with slot.container():
        if batch is not None and not batch.done.is_set():
            st.info(f"Decoding ({batch.kind}): run {batch.current + 1} of {len(batch.jobs)}. Open its page to "
                    "watch it; it keeps going meanwhile.")
            st.button("Stop", on_click=_stop_clicked, key="stop:sidebar", icon=":material/stop_circle:")
        st.caption(f"{n} run{'s' if n != 1 else ''} in this session (this browser tab; at most {MAX_HISTORY}). "
                   "Every run is also kept in the Library.")


# ---------------------------------------------------------------------------------------------- rendering
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


def metrics_row(meta: dict, frame: pd.DataFrame) -> None:
    m = dict(meta.get("metrics") or summarize(frame))
    items = [("New tokens", m.get("new_tokens")), ("Tokens/s", m.get("tokens_per_s")),
             ("Mean entropy (bits)", m.get("mean_entropy_bits")), ("Perplexity", m.get("perplexity")),
             ("Median step (ms)", m.get("median_step_ms")), ("Wall (s)", meta.get("wall_s"))]
    items = [(k, v) for k, v in items if v is not None]
    if "acceptance_rate" in m:
        items.append(("Acceptance rate", m["acceptance_rate"]))
    cols = st.columns(len(items) or 1)
    for col, (k, v) in zip(cols, items):
        col.metric(k, f"{v:.4g}" if isinstance(v, float) else v)


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


def figures(frame: pd.DataFrame, meta: dict) -> dict:
    import viz
    return viz.figures_for(frame, meta)


@st.fragment
def figure_panel(frame: pd.DataFrame, meta: dict, key: str) -> None:
    """The strategy's figures, with toggles that re-run only this fragment (never the decoding)."""
    if frame.empty:
        st.info("This run has no trace rows to plot.")
        return
    try:
        figs = figures(frame, meta)
    except Exception as e:  # a figure bug must not take the page (or the run) down
        st.error(f"Could not draw the figures: {type(e).__name__}: {e}")
        return
    if not figs:
        st.info("No figures for this trace.")
        return
    names = list(figs)
    chosen = st.pills("Figures", names, selection_mode="multi", default=names[: min(3, len(names))],
                      key=f"{key}:figs")
    for name in chosen or []:
        st.plotly_chart(figs[name], key=f"{key}:fig:{name}", width="stretch")
    view = st.toggle("Show tokens shaded by probability", key=f"{key}:chips")
    if view:
        html_block(token_chips(frame, branch=_main_branch(frame)))


def _main_branch(frame: pd.DataFrame) -> int | None:
    tok = frame[frame["kind"] == "token"]
    if tok.empty or tok["branch_id"].isna().all():
        return None
    return int(tok["branch_id"].dropna().iloc[0]) if tok["branch_id"].nunique() > 1 else None


def sequences_view(meta: dict) -> None:
    seqs = meta.get("sequences") or []
    if not seqs:
        st.caption("(no sequence)")
        return
    for i, s in enumerate(seqs[:8]):
        if len(seqs) > 1:
            st.caption(f"Sequence {i + 1} · score {s.get('score', 0):.4g} · {len(s.get('token_ids', []))} tokens")
        st.code(s.get("text", "") or " ", language=None, wrap_lines=True)
    if len(seqs) > 8:
        st.caption(f"... and {len(seqs) - 8} more sequences (all in the JSON export).")


def show_run(rec: RunRecord, key: str, export: bool = True) -> None:
    """Text, metrics, figures, trace table and export buttons of one run."""
    meta, frame = rec.meta, rec.frame
    if rec.status == "failed":
        st.error(f"This run failed: {rec.error}")
    elif rec.status == "stopped":
        st.warning("This run was stopped before it finished; what it produced is shown.")
    st.text(f"{meta.get('strategy')} on {meta.get('model')} ({meta.get('device', '?')}, {meta.get('dtype', '?')}, "
            f"quantization {meta.get('quantization', '?')}) · seed {meta.get('seed')} · "
            f"{meta.get('prompt_format', '?')} prompt · params {json.dumps(meta.get('params', {}), default=str)}")
    sequences_view(meta)
    metrics_row(meta, frame)
    figure_panel(frame, meta, key=key)
    with st.expander("Trace rows"):
        kinds = sorted(frame["kind"].dropna().unique().tolist()) if not frame.empty else []
        pick = st.multiselect("Kinds", kinds, default=[k for k in kinds if k == "token"] or kinds, key=f"{key}:kinds")
        st.dataframe(frame[frame["kind"].isin(pick)], hide_index=True, width="stretch")
    with st.expander("Run metadata"):
        st.json(meta, expanded=False)
    if export:
        export_buttons(rec, key=key)


# ---------------------------------------------------------------------------------------------- export
def csv_bytes(frame: pd.DataFrame) -> bytes:
    buf = io.StringIO()
    tr.write_csv(frame, buf)
    return buf.getvalue().encode("utf-8")


def parquet_bytes(frame: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    tr.write_parquet(frame, buf)
    return buf.getvalue()


def json_bytes(meta: dict) -> bytes:
    return json.dumps(meta, indent=2, ensure_ascii=False, default=str).encode("utf-8")


def report_bytes(meta: dict, frame: pd.DataFrame) -> bytes:
    try:
        from viz.report import html_report
    except ImportError:                     # older layout: the report builder in viz/__init__.py
        from viz import html_report
    return html_report(meta, frame).encode("utf-8")


def file_stem(meta: dict) -> str:
    return f"declab-{meta.get('strategy', 'run')}-{meta.get('run_id', 'trace')}"


def export_buttons(rec: RunRecord, key: str) -> None:
    """CSV (spreadsheet-safe, exact through declab.trace.read_trace), Parquet, JSON metadata, HTML report.
    Data is produced only when a button is clicked (deferred), so a page with many runs stays light."""
    meta, frame = rec.meta, rec.frame
    stem = file_stem(meta)
    st.caption("Export this run")
    c1, c2, c3, c4 = st.columns(4)
    c1.download_button("CSV trace", lambda: csv_bytes(frame), f"{stem}.csv", "text/csv", key=f"{key}:csv",
                       on_click="ignore", icon=":material/download:")
    c2.download_button("Parquet trace", lambda: parquet_bytes(frame), f"{stem}.parquet",
                       "application/vnd.apache.parquet", key=f"{key}:parquet", on_click="ignore",
                       icon=":material/download:")
    c3.download_button("JSON metadata", lambda: json_bytes(meta), f"{stem}.json", "application/json",
                       key=f"{key}:json", on_click="ignore", icon=":material/download:")
    c4.download_button("HTML report", lambda: report_bytes(meta, frame), f"{stem}.html", "text/html",
                       key=f"{key}:html", on_click="ignore", icon=":material/download:")


def zip_bytes(records: list[RunRecord]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for rec in records:
            stem = file_stem(rec.meta)
            z.writestr(f"{stem}.csv", csv_bytes(rec.frame))
            z.writestr(f"{stem}.json", json_bytes(rec.meta))
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- loading traces
def read_uploaded_trace(name: str, data: bytes, meta: dict | None) -> pd.DataFrame:
    """A CSV (exported by declab: typed with meta['columns']) or Parquet trace from uploaded bytes."""
    import tempfile
    suffix = ".parquet" if name.lower().endswith(".parquet") else ".csv"
    with tempfile.TemporaryDirectory(prefix="declab-upload-") as d:
        path = Path(d) / f"trace{suffix}"
        path.write_bytes(data)
        frame = tr.read_trace(path, (meta or {}).get("columns"))
    missing = [c for c in ("kind", "step", "token_text", "logprob") if c not in frame.columns]
    if missing:
        raise UserError(f"{name} is not a declab trace: missing column(s) {', '.join(missing)}")
    return frame


def read_upload(trace_file, meta_file) -> tuple[dict | None, pd.DataFrame]:
    """(metadata or None, trace frame) from a Streamlit trace upload and an optional JSON metadata upload; bad
    input raises UserError with a one-line message."""
    meta = None
    if meta_file is not None:
        try:
            meta = json.loads(meta_file.getvalue().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{meta_file.name} is not valid JSON metadata: {e}") from None
        if not isinstance(meta, dict):
            raise UserError(f"{meta_file.name} is not declab run metadata (expected a JSON object)")
    return meta, read_uploaded_trace(trace_file.name, trace_file.getvalue(), meta)


def meta_for(frame: pd.DataFrame, meta: dict | None) -> dict:
    """Metadata for a loaded trace; without a JSON file, what the frame itself tells."""
    if meta:
        return meta
    first = frame.iloc[0] if not frame.empty else {}
    return {"run_id": str(first.get("run_id", "uploaded")), "strategy": str(first.get("strategy", "?")),
            "model": str(first.get("model", "?")), "status": "ok", "params": {}, "sequences": [],
            "metrics": summarize(frame)}


# ---------------------------------------------------------------------------------------------- text diffs
def token_texts(rec: RunRecord) -> list[str]:
    """The best sequence as token texts (from the trace's token_id -> token_text map), or its text as one piece."""
    seqs = rec.meta.get("sequences") or []
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
