"""The trace: one flat row per thing that happened in a run, plus run metadata.

Columns every export has (BASE_COLUMNS), then strategy-specific columns in the order they first appear.
`kind` says what a row is: token, candidate, select, prune, propose, accept, reject, switch, mask, finish...
Units: `logprob` natural log of the model's probability, `entropy` bits, `t_ms` milliseconds since the run
started, `dt_ms` milliseconds this event took. Token trees are the (branch_id, parent_id, step) edges.
Every `token` row of the per-token loop (declab/core/loop.py) also has `kept`: the number of tokens with nonzero
probability in the distribution the token was chosen from (1 for an argmax; after the whole warper chain for a
sampler), as do ead's, uscd's and contrastive's token rows.

Exports:
- CSV: spreadsheet-safe and still exact. Text cells are quoted; a text cell that a spreadsheet would run as a
  formula (starts with = + - @, a tab or a line break), that is empty, or that starts with an apostrophe gets one
  leading apostrophe. `read_trace` strips exactly that one apostrophe, so any token text round-trips (commas,
  quotes, newlines, lone carriage returns, NUL, unicode, special tokens). Numbers are never touched.
- Parquet: exact, typed.
- JSON: the run metadata, including the column dtypes so a CSV is read back with the right types.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pandas as pd

BASE_COLUMNS = ("run_id", "strategy", "step", "kind", "branch_id", "parent_id", "position", "token_id", "token_text",
                "logprob", "entropy", "score", "model", "accepted", "t_ms", "dt_ms")
BASE_DTYPES = {"run_id": "string", "strategy": "string", "step": "Int64", "kind": "string", "branch_id": "Int64",
               "parent_id": "Int64", "position": "Int64", "token_id": "Int64", "token_text": "string",
               "logprob": "float64", "entropy": "float64", "score": "float64", "model": "string",
               "accepted": "boolean", "t_ms": "float64", "dt_ms": "float64"}
FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n", "'")
TEXT_DTYPES = ("string", "str", "object")


class Trace:
    """Collects rows during a run. Strategies call `add(kind=..., step=..., ...)`; run_id, strategy and t_ms are
    filled in. Rows are plain dicts (cheap to append in the decoding loop); `frame()` builds the DataFrame."""

    def __init__(self, run_id: str, strategy: str, model: str):
        self.run_id, self.strategy, self.model = run_id, strategy, model
        self.rows: list[dict] = []
        self.t0 = time.perf_counter()

    def now_ms(self) -> float:
        return (time.perf_counter() - self.t0) * 1000.0

    def add(self, kind: str, step: int, **cols) -> dict:
        row = {"run_id": self.run_id, "strategy": self.strategy, "step": step, "kind": kind, "model": self.model,
               "t_ms": self.now_ms(), **cols}
        self.rows.append(row)
        return row

    def frame(self) -> pd.DataFrame:
        return to_frame(self.rows)


def to_frame(rows: list[dict]) -> pd.DataFrame:
    """Rows -> DataFrame with the base columns first (typed), then extras in first-seen order."""
    extras: dict[str, None] = {}
    for r in rows:
        for k in r:
            if k not in BASE_DTYPES:
                extras.setdefault(k)
    df = pd.DataFrame.from_records(rows, columns=list(BASE_COLUMNS) + list(extras))
    for col, dtype in BASE_DTYPES.items():
        df[col] = df[col].astype(dtype)
    for col in extras:
        if str(df[col].dtype) in TEXT_DTYPES:
            inferred = df[col].convert_dtypes()
            df[col] = inferred if str(inferred.dtype) in ("string", "boolean", "Int64", "Float64") else df[col]
    return df


def column_dtypes(df: pd.DataFrame) -> dict[str, str]:
    return {c: str(t) for c, t in df.dtypes.items()}


def _protect(value):
    """Spreadsheet-safe, reversible: prefix one apostrophe to formula-like, empty or apostrophe-led text."""
    if isinstance(value, str) and (value == "" or value.startswith(FORMULA_START)):
        return "'" + value
    return value


def _unprotect(value: str) -> str:
    return value[1:] if value.startswith("'") else value


def write_csv(df: pd.DataFrame, path) -> None:
    """Every text cell (string, object and categorical columns) and every header name protected (see above)."""
    out = df.copy()
    for col in out.columns:
        if str(out[col].dtype) in TEXT_DTYPES or isinstance(out[col].dtype, pd.CategoricalDtype):
            out[col] = out[col].astype(object).map(_protect)
    out.columns = [_protect(str(c)) for c in out.columns]
    out.to_csv(path, index=False, quoting=csv.QUOTE_NONNUMERIC, encoding="utf-8", lineterminator="\n")


def read_trace(path, dtypes: dict[str, str] | None = None) -> pd.DataFrame:
    """Read a trace written by write_csv (or a .parquet file). `dtypes` comes from the run's JSON metadata
    ('columns'); without it, the base columns are typed and extras are inferred."""
    path = Path(path)
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    raw = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[], encoding="utf-8")
    raw.columns = [_unprotect(str(c)) for c in raw.columns]            # header names are protected like cells
    dtypes = dict(BASE_DTYPES, **(dtypes or {}))
    out = {}
    for col in raw.columns:
        cells = raw[col]
        na = cells == ""                                   # a real empty string was written as "'"
        dtype = dtypes.get(col)
        if dtype in TEXT_DTYPES or dtype == "category" or (dtype is None and cells.str.startswith("'").any()):
            out[col] = cells.map(_unprotect).mask(na).astype("category" if dtype == "category" else "string")
        elif dtype == "boolean" or (dtype is None and set(cells[~na]) <= {"True", "False"} and (~na).any()):
            out[col] = cells.map({"True": True, "False": False}).mask(na).astype("boolean")
        else:
            nums = pd.to_numeric(cells.mask(na), errors="coerce")
            if dtype is None:
                try:
                    out[col] = nums.astype("Int64") if (nums.dropna() % 1 == 0).all() and "." not in "".join(
                        cells) else nums.astype("float64")
                except (TypeError, ValueError):
                    out[col] = cells.mask(na).astype("string")
            else:
                out[col] = nums.astype(dtype)
    return pd.DataFrame(out, columns=list(raw.columns))


def write_parquet(df: pd.DataFrame, path) -> None:
    df.to_parquet(path, index=False)


def write_json(obj: dict, path) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str), encoding="utf-8")


def read_meta(path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))
