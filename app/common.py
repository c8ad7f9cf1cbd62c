"""Shared pieces of the declab Streamlit app: the model registry and the shared model cache, and the session's run
history. The other app modules build on this one:

    forms.py     parameter forms generated from the strategy, the inputs it declares, the RunRequest
    jobs.py      background runs through declab.run.service.RunService: streaming, Stop, collecting, notices
    render.py    one run's text, metrics, figures and trace; token chips and text diffs (escaped)
    exports.py   downloads (the run library's zip layout) and reading uploaded traces (the run library's reader)

The app stays thin: decoding lives in declab/ and strategies/, figures in viz/. Everything per user lives in
`st.session_state` (never in module globals), so two browser sessions never see each other's runs; the only thing
shared between sessions is the loaded models (`st.cache_resource`), which hold no per-run state.

Model output (token text) is untrusted: it is rendered with st.code / st.text / st.dataframe, or passed through
`html.escape` before it goes into any HTML.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:          # `streamlit run app/Home.py` puts app/ on sys.path, not the repository root
    sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import streamlit as st  # noqa: E402

from declab.core import UserError  # noqa: E402
from declab.core.meta import RunMeta  # noqa: E402
from declab.run import store as run_store  # noqa: E402
from declab.run import threads  # noqa: E402
from declab.models import loading  # noqa: E402
from declab.models.registry import DEFAULT_PATH, ENV_PATH, ModelSpec, Registry, load_registry  # noqa: E402

MAX_HISTORY = 50                      # runs kept per browser session (oldest dropped first)

# session_state keys (all app state of one browser session lives under these)
K_RUNS = "declab_runs"                # list[RunRecord], oldest first
K_SERVICE = "declab_service"          # the RunService decoding right now (or finished, not yet collected)
K_LAST = "declab_last"                # {"run": run_id, "compare": [run_ids], "teach": run_id, "explorer": run_id}
K_NOTICE = "declab_notice"            # messages to show once after a batch is collected
K_COUNTER = "declab_counter"
K_THREADS = "declab_threads"          # the sidebar's torch threads per run: 0 = auto (declab/run/threads.py)


# ---------------------------------------------------------------------------------------------- plain text
MARKDOWN_PUNCTUATION = set("\\`*_{}[]()<>#+-.!|~=:$&^%\"'/@,;?")


def plain(text) -> str:
    """Text for a Streamlit element that renders markdown (st.caption, st.error, st.metric, tab labels...): every
    ASCII punctuation character backslash-escaped, so what a run or a file says (bold, links, images, autolinks,
    HTML, LaTeX) shows as the characters it is and is never interpreted or fetched. Line breaks are kept."""
    out = []
    for ch in str(text if text is not None else ""):
        out.append("\\" + ch if ch in MARKDOWN_PUNCTUATION else ch)
    return "".join(out)


def _store_locked(message: str) -> None:
    """The run store is locked by another process (declab.run.store.WAIT_NOTICE): said at once, as a toast, on the
    page that is waiting (a run service's own thread has no page and stays quiet)."""
    from streamlit.runtime.scriptrunner import get_script_run_ctx
    if get_script_run_ctx(suppress_warning=True) is not None:
        st.toast(f"The run library is locked by another process; waiting for it (up to "
                 f"{run_store.BUSY_TIMEOUT_S:.0f} s).")


run_store.WAIT_NOTICE = _store_locked


# ---------------------------------------------------------------------------------------------- registry, models
def registry_path() -> str:
    return str(os.environ.get(ENV_PATH) or DEFAULT_PATH)


def get_registry() -> Registry:
    """The model registry; a broken models.yaml stops the page with its one-line message."""
    try:
        return load_registry(registry_path())
    except UserError as e:                            # the message names models.yaml, not where it is on the server
        st.error(plain(f"Model registry: {str(e).replace(registry_path(), 'models.yaml')}"))
        st.stop()


@st.cache_resource(show_spinner=False, max_entries=3)
def _cached_lm(key: str, path: str):
    """One LM per (model key, registry file) for the whole server process, shared by every session.
    The LM holds weights and tokenizer only; runs keep their state on their own `Run` objects. Loaded in a passing
    thread: this script thread lives on while the run decodes in the service's (declab/run/threads.py)."""
    return threads.in_passing_thread(lambda: loading.load_lm(load_registry(path).get(key))[0])


def load_model(key: str):
    """The LM of a registry key, through the shared cache, with a spinner; raises UserError (not cached) when it
    cannot load. This is also the loader the run resolver gets for second models (`Run(..., load=load_model)`), so
    only the models a plan names are ever loaded."""
    with st.spinner(f"Loading model {key} (the first load of the embedded model converts it once, ~20 s)..."):
        return _cached_lm(key, registry_path())


def resolved_device(spec: ModelSpec) -> str:
    try:
        return loading.resolve_device(spec)
    except UserError as e:
        return f"unavailable ({e})"


def model_caption(spec: ModelSpec) -> str:
    chat = "chat template on" if spec.chat else "raw prompts"
    return (f"{spec.description} · source: {spec.source_text} · quantization: {spec.quantization} · dtype: "
            f"{spec.dtype} · device: {spec.device} -> {resolved_device(spec)} · context {spec.context_length} · {chat}")


# ---------------------------------------------------------------------------------------------- run history
@dataclass
class RunRecord:
    """One finished (ok / stopped / failed) run of this session, or a trace loaded in the explorer.

    `meta` is the metadata dict exactly as written (what exports and the run library keep); `info` is the same
    metadata typed (`RunMeta.from_dict`, tolerant of foreign or hand-edited files), which is what the pages read."""

    meta: dict
    frame: pd.DataFrame
    label: str
    info: RunMeta = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.info is None:
            self.info = RunMeta.from_dict(self.meta)

    @property
    def run_id(self) -> str:
        return self.info.run_id

    @property
    def status(self) -> str:
        return self.info.status

    @property
    def error(self) -> str | None:
        return self.info.error

    @property
    def text(self) -> str:
        return self.info.text


def runs() -> list[RunRecord]:
    return st.session_state.setdefault(K_RUNS, [])


def last() -> dict:
    return st.session_state.setdefault(K_LAST, {})


def find_run(run_id: str) -> RunRecord | None:
    return next((r for r in runs() if r.run_id == run_id), None)


def next_number() -> int:
    st.session_state[K_COUNTER] = st.session_state.get(K_COUNTER, 0) + 1
    return st.session_state[K_COUNTER]


def add_run(meta: dict, frame: pd.DataFrame, origin: str = "", info: RunMeta | None = None) -> RunRecord:
    """Append a run to this session's history (at most MAX_HISTORY, oldest dropped) and return its record."""
    info = info if info is not None else RunMeta.from_dict(meta)
    suffix = "" if info.status == "ok" else f" [{info.status}]"
    rec = RunRecord(meta=meta, frame=frame, label=f"#{next_number()} {info.strategy} · {info.model}{origin}{suffix}",
                    info=info)
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


def thread_setting() -> int | None:
    """The torch threads a run started from this session takes: N, or None (the sidebar's 0, the default):
    $DECLAB_THREADS if set, else auto."""
    n = int(st.session_state.get(K_THREADS, 0) or 0)
    return n if n > 0 else None


def settings_sidebar() -> None:
    """The sidebar's settings: torch threads per run."""
    with st.sidebar.expander("Settings", icon=":material/settings:"):
        st.number_input("Torch threads per run", min_value=0, max_value=max(64, threads.cores()), step=1,
                        key=K_THREADS,
                        help=f"0 = DECLAB_THREADS if it is set, else auto: the {threads.cores()} cores this app may "
                             "use, minus those busy with other "
                             "work when the run starts (a second run or process then shares the cores instead of "
                             "fighting over them). A number: exactly that many threads.")
