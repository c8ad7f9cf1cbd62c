"""Background runs of one browser session through `declab.run.service.RunService`: start a batch (validated once,
models loaded through the shared cache), follow it live (the page polls it; a Stop button), collect its results
once into the session history, and show what went wrong.

One service per session at a time (one forward at a time keeps timings fair). The service runs in its own thread
and keeps every finished run in the run library itself; nothing a page does (a rerun, a widget, leaving the page)
touches it, so only Stop ends a run: ours (a button) or the toolbar's. The two are told apart from a rerun because
app/.streamlit/config.toml turns Streamlit's `runner.fastReruns` off: a rerun then restarts the script with
RerunException at its next Streamlit call, and StopException means the toolbar's Stop (or the session closing).
"""

from __future__ import annotations

import time

import streamlit as st
from streamlit.runtime.scriptrunner_utils.exceptions import StopException

import common
from declab.core import UserError
from declab.core.corpus import confine_params
from declab.run import Run, RunRequest, validate
from declab.run.service import Job, RunService

POLL_S = 0.25                         # how often the page looks at a streaming run (it redraws only what changed:
                                      # the page and the browser share the cores with the decoding, issue 21)


def active() -> RunService | None:
    return st.session_state.get(common.K_SERVICE)


def start_batch(kind: str, model: str, requests: list[tuple[str, RunRequest]]) -> RunService | None:
    """Validate every request once (no model needed), load the model, build the runs (their second models are
    resolved from the plan and loaded only when it names them), start decoding. Shows st.error and returns None on
    bad input; nothing is started then and no earlier run is touched."""
    busy = active()
    if busy is not None and busy.running:
        st.warning("A run is still in progress in this session; stop it or wait for it to finish.")
        return None
    several = len(requests) > 1

    def labelled(label: str, e: UserError) -> UserError:
        return UserError(f"{label}: {e}" if several else str(e))

    registry = common.get_registry()
    try:
        plans = []
        for label, req in requests:
            try:
                req.params = confine_params(req.params)       # a path typed here stays in the corpus folder
                plans.append((label, validate(req, registry)))
            except UserError as e:
                raise labelled(label, e) from None
        lm = common.load_model(model)
        jobs = []
        for label, plan in plans:
            try:
                jobs.append(Job(label=label, run=Run(lm, plan, load=common.load_model)))
            except UserError as e:
                raise labelled(label, e) from None
    except UserError as e:
        st.error(str(e))               # about this user's own form input (validated here), not a stored run
        return None
    except Exception as e:  # e.g. out of memory while loading: a message, never a traceback, nothing lost
        st.error(common.plain(f"Could not start the run: {type(e).__name__}: {e}"))
        return None
    service = RunService(jobs=jobs, kind=kind, source="app", threads=common.thread_setting())
    st.session_state[common.K_SERVICE] = service
    return service.start()


def _stop_clicked() -> None:
    service = active()
    if service is not None:
        service.stop()


def collect() -> list[common.RunRecord]:
    """Move a finished batch's results into the session history (exactly once) and remember them for the pages."""
    service = active()
    if service is None or service.running or service.collected:
        return []
    service.collected = True
    st.session_state.pop(common.K_SERVICE, None)
    several = len(service.jobs) > 1
    records, notices = [], []
    for i, job in enumerate(service.jobs):
        if i in service.errors:
            notices.append(("error", f"{job.label}: {service.errors[i]}" if several else service.errors[i]))
            continue
        result = job.run.result
        if result is None:
            continue
        origin = f" ({job.label})" if service.kind in ("compare", "drafters") else ""
        rec = common.add_run(result.meta, result.frame, origin, info=result.run_meta)
        if i in service.unsaved:
            notices.append(("warning", f"{rec.label} is not in the run library: {service.unsaved[i]}"))
        records.append(rec)
        if rec.status == "failed":
            notices.append(("error", f"{rec.label} failed: {rec.error}. Earlier runs are kept."))
        elif rec.status == "stopped":
            n = len(result.sequences[0].token_ids) if result.sequences else 0
            notices.append(("warning", f"{rec.label} was stopped after {n} tokens."))
    if records:
        if service.kind == "compare":
            common.last()["compare"] = [r.run_id for r in records]
        else:
            common.last()[service.kind] = records[-1].run_id
    st.session_state.setdefault(common.K_NOTICE, {}).setdefault(service.kind, []).extend(notices)
    return records


def show_notices(kind: str) -> None:
    for level, msg in st.session_state.get(common.K_NOTICE, {}).pop(kind, []):
        (st.error if level == "error" else st.warning)(common.plain(msg))


def follow(service: RunService) -> None:
    """Stream a batch: a progress bar and the text so far for every job, and a Stop button; then collect it.
    The live view is cleared once the batch is collected (the page then shows the finished runs)."""
    live = st.empty()
    with live.container():
        st.button("Stop", on_click=_stop_clicked, key=f"stop:{service.kind}", icon=":material/stop_circle:")
        slots = []
        cols = st.columns(len(service.jobs)) if len(service.jobs) > 1 else [st.container()]
        for col, job in zip(cols, service.jobs):
            with col:
                if len(service.jobs) > 1:
                    st.caption(common.plain(job.label))
                slots.append((st.empty(), st.empty()))
    shown: dict[int, tuple] = {}                      # job index -> what its slots show now
    try:
        while True:
            finished = service.done.is_set()
            for i, (job, (bar, text)) in enumerate(zip(service.jobs, slots)):
                ids = list(job.run.latest)
                total = job.run.request.max_new_tokens
                state = "done" if job.run.result is not None or finished else (
                    "decoding" if i == service.current else "waiting")
                if shown.get(i) == (len(ids), state):
                    continue
                shown[i] = (len(ids), state)
                bar.progress(min(len(ids) / total, 1.0), text=f"{len(ids)} / {total} tokens · {state}")
                text.code(job.run.lm.decode(ids) if ids else " ", language=None, wrap_lines=True)
            if finished:
                break
            time.sleep(POLL_S)
    except StopException:
        # Streamlit's own toolbar "Stop" ends the script: end the decoding too (a rerun, from a widget or our Stop
        # button, lets it go on and is followed again on the next run of the page)
        service.stop()
        raise
    collect()
    live.empty()


def run_section(kind: str) -> None:
    """Follow this page's batch if one is decoding (also after a rerun), else collect a finished one."""
    service = active()
    if service is not None and service.kind == kind and not service.collected:
        follow(service)
    else:
        collect()


def sidebar_status(slot) -> None:
    """In the sidebar: a batch decoding while another page is shown (with a Stop button), and the run count."""
    service = active()
    n = len(common.runs())
    with slot.container():
        if service is not None and service.running:
            st.info(f"Decoding ({service.kind}): run {service.current + 1} of {len(service.jobs)}. Open its page to "
                    "watch it; it keeps going meanwhile (also across reruns and page switches; only Stop ends it).")
            st.button("Stop", on_click=_stop_clicked, key="stop:sidebar", icon=":material/stop_circle:")
        st.caption(f"{n} run{'s' if n != 1 else ''} in this session (this browser tab; at most {common.MAX_HISTORY}). "
                   "Every run is also kept in the Library.")
