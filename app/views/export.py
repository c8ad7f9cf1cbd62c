"""Export: every run of this session as CSV, Parquet, JSON metadata and a standalone HTML report."""

import streamlit as st

import common

st.title("Export")
st.caption("CSV traces are spreadsheet-safe (formula-like cells are neutralised) and read back exactly by "
           "`declab.trace.read_trace` with the JSON metadata's column types; Parquet is exact and typed; the HTML "
           "report is one standalone file with the run's figures.")

history = common.runs()
if not history:
    st.info("No runs in this session yet: run one on the Run or Compare page.")
else:
    st.download_button("All runs (CSV + JSON, zip)", lambda: common.zip_bytes(list(history)), "declab-runs.zip",
                       "application/zip", key="exp:zip", on_click="ignore", icon=":material/folder_zip:")
    for rec in reversed(history):
        with st.container(border=True):
            st.text(rec.label)
            seqs = rec.meta.get("sequences") or []
            st.text(f"{rec.meta.get('started_at', '')}  status {rec.status}  "
                    f"{len(seqs[0].get('token_ids', [])) if seqs else 0} tokens")
            st.code((rec.text or " ")[:400], language=None, wrap_lines=True)
            common.export_buttons(rec, key=f"exp:{rec.run_id}")
