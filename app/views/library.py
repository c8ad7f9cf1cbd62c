"""Library: every stored run (this app's sessions and the CLI, across restarts) from the run store
(declab/run/store.py): filter and search, open one in the Trace explorer (no model needed), send two to four to Compare,
tag, delete, and export a selection as CSV / Parquet (zip) or one HTML report."""

import pandas as pd
import streamlit as st

import common
import exports
from declab.core import UserError
from declab.run.store import open_store

MAX_LISTED = 500                      # newest matching runs shown (filters narrow the rest down)
K_SEL = "lib:sel"
K_NOTICE = "lib:notice"

st.title("Run library")
st.caption("Every run from the app and from `declab run` is kept here, also after a restart: ok, stopped and failed "
           "runs with what they produced. Select runs below to open, compare, tag, delete or export them.")


def notice(level: str, text: str) -> None:
    st.session_state[K_NOTICE] = (level, common.plain(text))


def selected() -> list[str]:
    return list(st.session_state.get(K_SEL) or [])


def to_session(store, run_ids: list[str]) -> list:
    """Stored runs as runs of this session (so the Trace explorer, Compare, Teach and Export pages show them)."""
    records = []
    for run_id in run_ids:
        rec = common.find_run(run_id)
        if rec is None:
            meta, frame = store.get(run_id)
            rec = common.add_run(meta, frame, origin=" (library)")
        records.append(rec)
    return records


def tag_clicked(store, remove: bool) -> None:
    text = st.session_state.get("lib:tagtext", "")
    try:
        store.tag(selected(), remove=[text] if remove else [], add=[] if remove else [text])
    except UserError as e:
        notice("error", str(e))
        return
    n = len(selected())
    notice("success", f"Tag '{' '.join(text.split())}' {'removed from' if remove else 'added to'} {n} "
                      f"run{'s' if n != 1 else ''}.")


def delete_clicked(store) -> None:
    try:
        n = store.delete(selected())
    except UserError as e:
        notice("error", str(e))
        return
    st.session_state[K_SEL] = []
    st.session_state["lib:confirm"] = False
    notice("success", f"Deleted {n} run{'s' if n != 1 else ''} from the library (runs of this session stay in it).")


def label_of(row: dict) -> str:
    text = row["text"][:48].replace("\n", "↵").replace("\t", "⇥").strip() or "∅"
    return f"{row['run_id']} · {row['started_at']} · {row['strategy']} · {row['model']} · {row['status']} · {text}"


def filters(store) -> dict:
    facets = store.facets()
    c1, c2, c3, c4 = st.columns(4)
    f = {"model": c1.multiselect("Model", facets["model"], key="lib:model"),
         "strategy": c2.multiselect("Strategy", facets["strategy"], key="lib:strategy"),
         "status": c3.multiselect("Status", facets["status"], key="lib:status"),
         "tag": c4.multiselect("Tag", facets["tag"], key="lib:tag", help="Runs with any of these tags.")}
    c1, c2, c3 = st.columns([1, 1, 2])
    f["since"] = c1.date_input("From", value=None, key="lib:since")
    f["until"] = c2.date_input("To", value=None, key="lib:until")
    f["search"] = c3.text_input("Search prompt and text", key="lib:search", help="Case-insensitive substring.")
    return f


def listing(rows: list[dict]) -> None:
    table = pd.DataFrame([{
        "run id": r["run_id"], "started": r["started_at"], "status": r["status"], "strategy": r["strategy"],
        "model": r["model"], "tokens": r["new_tokens"], "tags": ", ".join(r["tags"]), "source": r["source"],
        "prompt": r["prompt"][:80], "text": r["text"][:160],
        "params": ", ".join(f"{k}={v}" for k, v in (r["params"] or {}).items())} for r in rows])
    st.dataframe(table, hide_index=True, width="stretch", key="lib:table")     # plain text cells (escaped)
    exports.table_download(table, "declab-library.csv", key="lib:table:csv")


def actions(store, rows: list[dict]) -> None:
    ids = selected()
    n = len(ids)
    st.subheader(f"Selected: {n} run{'s' if n != 1 else ''}")
    by_id = {r["run_id"]: r for r in rows}
    for run_id in ids[:4]:
        r = by_id[run_id]
        st.caption(common.plain(f"{run_id} · {r['strategy']} on {r['model']} · {r['status']} · seed {r['seed']}"))
        st.code(r["text"] or " ", language=None, wrap_lines=True)
    if n > 4:
        st.caption(f"... and {n - 4} more.")

    c1, c2 = st.columns(2)
    if c1.button("Open in Trace explorer", key="lib:open", disabled=n != 1, icon=":material/query_stats:",
                 help="Select exactly one run. No model is loaded: everything is drawn from the stored trace."):
        try:
            rec = to_session(store, ids)[0]
        except UserError as e:                                # a damaged stored run: one line, nothing else lost
            st.error(common.plain(str(e)))
        else:
            common.last()["explorer"] = rec.run_id
            st.session_state.pop("tx:pick:prefer", None)      # jump to it even if it was opened before
            st.session_state["tx:source"] = "A run of this session"
            st.switch_page("views/trace_explorer.py")
    if c2.button("Compare", key="lib:compare", disabled=not 2 <= n <= 4, icon=":material/compare_arrows:",
                 help="Select two to four runs: texts side by side, metrics, per-token figures."):
        try:
            common.last()["compare"] = [r.run_id for r in to_session(store, ids)]
        except UserError as e:
            st.error(common.plain(str(e)))
        else:
            st.switch_page("views/compare.py")

    c1, c2, c3 = st.columns([2, 1, 1], vertical_alignment="bottom")
    c1.text_input("Tag", key="lib:tagtext", max_chars=64, placeholder="e.g. lecture-3")
    c2.button("Add tag", key="lib:tagadd", on_click=tag_clicked, args=(store, False), icon=":material/sell:")
    c3.button("Remove tag", key="lib:tagremove", on_click=tag_clicked, args=(store, True))

    c1, c2 = st.columns([2, 2], vertical_alignment="bottom")
    confirm = c1.checkbox(f"Yes, delete {n} run{'s' if n != 1 else ''} from the library", key="lib:confirm")
    c2.button("Delete", key="lib:delete", disabled=not confirm, on_click=delete_clicked, args=(store,),
              icon=":material/delete:", type="secondary")

    c1, c2 = st.columns([2, 2], vertical_alignment="bottom")
    fmt = c1.radio("Export as", ["csv", "parquet", "html"], horizontal=True, key="lib:fmt",
                   format_func={"csv": "CSV + JSON (zip)", "parquet": "Parquet + JSON (zip)",
                                "html": "one HTML report"}.get)
    name = "declab-report.html" if fmt == "html" else f"declab-runs-{fmt}.zip"
    c2.download_button("Export selection", lambda: export_selection(store, ids, fmt), name,
                       "text/html" if fmt == "html" else "application/zip", key="lib:export", on_click="ignore",
                       icon=":material/download:")


def export_selection(store, ids: list[str], fmt: str) -> bytes:
    """The selection's download; a damaged stored run gives a small text file saying so instead of a traceback."""
    try:
        return store.export_bytes(ids, fmt)
    except UserError as e:
        return f"declab: {e}\n".encode("utf-8")


def import_section(store) -> None:
    """Upload a run exported elsewhere (CSV/Parquet trace + its JSON metadata) into the library."""
    with st.expander("Import a run (CSV or Parquet trace + JSON metadata)"):
        c1, c2 = st.columns(2)
        trace_file = c1.file_uploader("Trace", type=["csv", "parquet"], key="lib:imp:trace")
        meta_file = c2.file_uploader("Metadata (JSON)", type=["json"], key="lib:imp:meta",
                                     help="The .meta.json (or .json) exported with the trace; without it the "
                                          "settings are unknown and column types are inferred.")
        if st.button("Import", key="lib:imp:go", disabled=trace_file is None, icon=":material/upload:"):
            try:
                run_id = store.save(exports.read_upload(trace_file, meta_file), source="import")
            except UserError as e:
                st.error(common.plain(str(e)))
            except Exception as e:  # a malformed file: a message, never a traceback
                st.error(common.plain(f"Could not import {trace_file.name}: {type(e).__name__}: {e}"))
            else:
                st.success(common.plain(f"Imported run {run_id}."))


try:
    store = open_store()
except UserError as e:
    store = None
    st.error(common.plain(f"Run library: {e}"))

if store is not None:
    pending = st.session_state.pop(K_NOTICE, None)
    if pending:
        {"error": st.error, "success": st.success}.get(pending[0], st.info)(pending[1])   # plain() in notice()
    import_section(store)
    f = filters(store)
    try:
        rows = store.list(limit=MAX_LISTED + 1, **f)
    except UserError as e:
        st.error(common.plain(str(e)))
        rows = []
    total = store.count()
    shown = rows[:MAX_LISTED]
    st.caption(f"{len(shown)} of {total} stored run{'s' if total != 1 else ''} shown"
               + (f" (the newest {MAX_LISTED}; filter to see others)" if len(rows) > MAX_LISTED else "")
               + f" · store: {store.path}")
    if not total:
        st.info("The library is empty: runs from the Run, Compare and Teach pages and from `declab run` appear "
                "here when they finish.")
    elif not shown:
        st.info("No stored run matches these filters.")
    else:
        listing(shown)
        ids = [r["run_id"] for r in shown]
        st.session_state[K_SEL] = [i for i in selected() if i in ids]   # drop runs filtered out or deleted
        labels = {r["run_id"]: label_of(r) for r in shown}
        st.multiselect("Select runs", ids, format_func=lambda i: labels.get(i, i), key=K_SEL,
                       placeholder="Choose runs to open, compare, tag, delete or export")
        if selected():
            actions(store, shown)
