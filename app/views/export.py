"""Export: every run of this session as CSV, Parquet, JSON metadata and a standalone HTML report."""

import streamlit as st

import common
import exports

st.title("Export")
st.caption("CSV traces are spreadsheet-safe (formula-like cells are neutralised) and read back exactly by "
           "`declab.core.trace.read_trace` with the JSON metadata's column types; Parquet is exact and typed; the "
           "HTML report is one standalone file with the run's figures. The zip has `<name>.csv` + `<name>.meta.json` "
           "per run, the run library's layout (the Library page or `declab runs import` read it back).")

history = common.runs()
if not history:
    st.info("No runs in this session yet: run one on the Run or Compare page.")
else:
    st.download_button("All runs (CSV + JSON, zip)", lambda: exports.zip_bytes(list(history)), "declab-runs.zip",
                       "application/zip", key="exp:zip", on_click="ignore", icon=":material/folder_zip:")
    for rec in reversed(history):
        with st.container(border=True):
            st.text(rec.label)
            seqs = rec.info.sequences
            ids = seqs[0].get("token_ids") if seqs else None
            st.text(f"{rec.info.started_at}  status {rec.status}  {len(ids) if isinstance(ids, list) else 0} tokens")
            st.code((rec.text or " ")[:400], language=None, wrap_lines=True)
            exports.export_buttons(rec, key=f"exp:{rec.run_id}")
