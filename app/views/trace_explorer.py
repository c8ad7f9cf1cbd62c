"""Trace explorer: load an exported run (CSV or Parquet trace plus its JSON metadata) and re-render every figure,
without loading a model."""

import streamlit as st

import common
import exports
import render
from declab.core import UserError

st.title("Trace explorer")
st.caption("Open a run exported from declab (Run or Export page, the Library, or `declab run --csv/--parquet/--json`). "
           "No model is loaded: everything is drawn from the trace.")


def from_upload():
    """The uploaded run as a RunRecord, or None after showing why not."""
    c1, c2 = st.columns(2)
    trace_file = c1.file_uploader("Trace (CSV or Parquet)", type=["csv", "parquet"], key="tx:trace")
    meta_file = c2.file_uploader("Metadata (JSON)", type=["json"], key="tx:meta",
                                 help="The .meta.json (or .json) exported with the trace: the run's settings and the "
                                      "column types a CSV needs to be read back exactly. Without it the types are "
                                      "inferred.")
    if trace_file is None:
        st.info("Upload a trace file (and its JSON metadata) to explore it.")
        return None
    try:
        meta, frame = exports.read_upload(trace_file, meta_file)
    except UserError as e:
        st.error(common.plain(str(e)))
        return None
    except Exception as e:  # a malformed file: a message, never a traceback
        st.error(common.plain(f"Could not read {trace_file.name}: {type(e).__name__}: {e}"))
        return None
    if meta_file is None:
        st.warning("No metadata file: column types were inferred and the run's settings are unknown.")
    rec = common.RunRecord(meta=meta, frame=frame, label=f"uploaded {trace_file.name}")
    if common.find_run(rec.run_id) is None:
        if st.button("Add to this session's runs", key="tx:add",
                     help="So it can be stepped through in Teach and downloaded from Export."):
            common.add_run(meta, frame, origin=" (uploaded)", info=rec.info)
            st.success("Added to this session's runs.")
    return rec


source = st.radio("Source", ["Upload files", "A run of this session"], horizontal=True, key="tx:source")
if source == "Upload files":
    rec = from_upload()
else:
    rec = common.run_picker("Run", key="tx:pick", prefer=common.last().get("explorer"))   # set by the Library
    if rec is None:
        st.info("No runs in this session yet; run one on the Run page or upload files.")

if rec is not None:
    st.subheader("Run")     # strategy, model and params are shown by show_run as plain text (uploads are untrusted)
    if rec.info.prompt:
        st.caption("Prompt")
        st.code(rec.info.prompt, language=None, wrap_lines=True)
    render.show_run(rec, key=f"tx:{rec.run_id}", export=False)
