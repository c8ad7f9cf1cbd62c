"""Downloads and uploads. One export layout, the run library's: a zip holds `<stem>.csv` + `<stem>.meta.json` per
run (declab.run.store.bundle_bytes; each importable with `declab runs import` or the Library page), and uploads are
read by the run library's reader (declab.run.store.read_export), so the app, the CLI and the library agree."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import pandas as pd
import streamlit as st

from common import RunRecord
from declab.core import UserError
from declab.core import trace as tr
from declab.run.store import bundle_bytes, read_export
from viz.report import html_report


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
    return html_report(meta, frame).encode("utf-8")


def zip_bytes(records: list[RunRecord]) -> bytes:
    """Every run as `<stem>.csv` + `<stem>.meta.json` in one zip (the run library's layout)."""
    return bundle_bytes([(rec.meta, rec.frame) for rec in records], "csv")


def export_buttons(rec: RunRecord, key: str) -> None:
    """CSV (spreadsheet-safe, exact through declab.core.trace.read_trace), Parquet, JSON metadata, HTML report.
    Data is produced only when a button is clicked (deferred), so a page with many runs stays light."""
    meta, frame, stem = rec.meta, rec.frame, rec.info.stem
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


def _upload_name(name: str, fallback: str) -> str:
    """The uploaded file's own name, without any folder part (the browser's text is untrusted)."""
    base = Path(str(name).replace("\\", "/")).name
    return base if base not in ("", ".", "..") else fallback


def read_upload(trace_file, meta_file=None) -> tuple[dict, pd.DataFrame]:
    """(metadata, trace frame) from an uploaded trace (CSV or Parquet) and optional JSON metadata (Streamlit
    uploads, or anything with `.name` and `.getvalue()`), read by the run library's reader: the CSV typed with the
    metadata's columns; without metadata, what the trace tells (`meta_from_frame`). Bad input raises UserError
    with a one-line message naming the uploaded file."""
    with tempfile.TemporaryDirectory(prefix="declab-upload-") as d:
        folder = Path(d)
        trace_path = folder / _upload_name(trace_file.name, "trace.csv")
        trace_path.write_bytes(trace_file.getvalue())
        meta_path = None
        if meta_file is not None:
            meta_path = folder / _upload_name(meta_file.name, "meta.json")
            if meta_path == trace_path:
                meta_path = folder / "meta.json"
            meta_path.write_bytes(meta_file.getvalue())
        try:
            return read_export(trace_path, meta_path)
        except UserError as e:           # name the uploaded files, not the temporary folder
            raise UserError(str(e).replace(f"{folder}{os.sep}", "")) from None


def table_csv_bytes(frame: pd.DataFrame) -> bytes:
    """A table shown in the app as CSV, spreadsheet-safe like the trace CSV (declab.core.trace.write_csv): every
    text cell (text, object and categorical columns) and every header name that a spreadsheet would run as a formula
    (= + - @, a tab, a carriage return or a line break first) gets one leading apostrophe."""
    return csv_bytes(frame.reset_index(drop=True))


def table_download(frame: pd.DataFrame, file_name: str, key: str, label: str = "Download table (CSV)") -> None:
    """The declab download for a table (Streamlit's own table download is off: app/.streamlit/config.toml)."""
    st.download_button(label, lambda: table_csv_bytes(frame), file_name, "text/csv", key=key, on_click="ignore",
                       icon=":material/download:")
