"""The run library: every run (from the app and the CLI) kept in one embedded SQLite database.

    store = open_store()                         # $DECLAB_STORE, else $XDG_DATA_HOME/declab/runs.sqlite,
                                                 # else ~/.local/share/declab/runs.sqlite
    run_id = store.save(result)                  # a RunResult, or (meta, frame); ok, stopped and failed runs alike
    rows = store.list(model="fake", strategy=["greedy", "sample"], tag="class", since="2026-01-01", search="cat")
    meta, frame = store.get(run_id)              # exactly what was saved (dtypes, token text, NA)
    store.tag([run_id], add=["class"]); store.delete([run_id])
    store.export(run_id, "out.csv")              # out.csv + out.meta.json (also .parquet, .json, .html)
    store.import_run("out.csv")                  # reads out.meta.json (or out.json) beside it

Why SQLite (standard library, no new dependency) and why the trace is one Parquet blob per run:
- How traces are used: a run's trace is always read whole (figures, Trace explorer, Compare, Teach, export all take
  the full frame of one run); nothing queries individual trace rows across runs. What is searched and filtered
  across runs is metadata (model, strategy, status, date, tags, prompt, generated text), which lives in indexed
  columns of the `runs` table. So the store is a metadata table plus the trace as one blob, not a row table.
- Parquet keeps the frame exact with no conversion code: nullable Int64/boolean/string dtypes, NA vs "", any token
  text (newlines, NUL, quotes, formula-like cells), and the strategy-specific columns that differ per strategy
  (which a row table would need as a sparse wide table or per-row JSON). It is compressed (zstd) and one INSERT.
- The blob lives in its own table (`traces`), so listing and filtering never read trace pages.
- DuckDB would be the choice for analytical queries over trace rows across runs; that is not how the lab reads
  traces, and SQLite's WAL mode gives what matters here: several processes (app sessions, CLI runs) writing at once.

Atomicity and concurrency:
- Every write is one transaction (`BEGIN IMMEDIATE` ... `COMMIT`): the metadata row, its tags and its trace blob
  appear together or not at all. A writer killed mid-write (SIGKILL, os._exit, power cut) leaves only an
  uncommitted WAL tail that SQLite ignores, so earlier runs are intact and the store stays readable.
- WAL journal mode: readers never block writers and writers never block readers; writers queue on the database
  lock, waiting up to `BUSY_TIMEOUT_S` (busy_timeout) instead of failing. The Parquet blob is built before the
  transaction starts, so the lock is held only for the inserts.
- One connection per operation (opened and closed), so a Store object is safe to share between threads
  (Streamlit sessions) and processes never share a connection.

Schema (PRAGMA user_version = SCHEMA_VERSION):
    runs(run_id PK, started_at, saved_at, status, error, model, strategy, quantization, dtype, device, seed,
         prompt_format, prompt, text, params, new_tokens, wall_s, n_rows, source, meta)
        `meta` is the run's full metadata as JSON, returned by get() as saved; `text` is every generated sequence's
        text (newline-joined) for search; `source` is cli / app / import.
    traces(run_id PK -> runs ON DELETE CASCADE, format 'parquet', data BLOB)
    tags(run_id -> runs ON DELETE CASCADE, tag, PK (run_id, tag))
"""

from __future__ import annotations

import html
import io
import json
import os
import re
import sqlite3
import time
import uuid
import zipfile
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from declab.core import trace as tr
from declab.core.errors import UserError
from declab.core.meta import RUN_ID_RE, RunMeta, validate_meta
from declab.core.metrics import summarize
from viz.report import CSS, html_report

ENV_STORE = "DECLAB_STORE"
SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 60.0
LOCK_NOTICE_S = 1.0                   # a store locked longer than this is said at once (WAIT_NOTICE), then waited on
WAIT_NOTICE = None                    # callable(message) the CLI sets: "the run store is locked ..., waiting"
MAX_TAG_CHARS = 64
REQUIRED_TRACE_COLUMNS = ("kind", "step", "token_text", "logprob")

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id        TEXT PRIMARY KEY,
    started_at    TEXT NOT NULL DEFAULT '',
    saved_at      REAL NOT NULL,
    status        TEXT NOT NULL DEFAULT 'ok',
    error         TEXT,
    model         TEXT NOT NULL DEFAULT '',
    strategy      TEXT NOT NULL DEFAULT '',
    quantization  TEXT,
    dtype         TEXT,
    device        TEXT,
    seed          INTEGER,
    prompt_format TEXT,
    prompt        TEXT NOT NULL DEFAULT '',
    text          TEXT NOT NULL DEFAULT '',
    params        TEXT NOT NULL DEFAULT '{}',
    new_tokens    INTEGER,
    wall_s        REAL,
    n_rows        INTEGER NOT NULL DEFAULT 0,
    source        TEXT NOT NULL DEFAULT '',
    meta          TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS traces (
    run_id  TEXT PRIMARY KEY REFERENCES runs(run_id) ON DELETE CASCADE,
    format  TEXT NOT NULL,
    data    BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS tags (
    run_id  TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    tag     TEXT NOT NULL,
    PRIMARY KEY (run_id, tag)
);
CREATE INDEX IF NOT EXISTS runs_by_date ON runs(started_at, saved_at);
CREATE INDEX IF NOT EXISTS runs_by_model ON runs(model, strategy);
CREATE INDEX IF NOT EXISTS tags_by_tag ON tags(tag);
"""

LIST_COLUMNS = ("run_id", "started_at", "status", "error", "model", "strategy", "quantization", "dtype", "device",
                "seed", "prompt_format", "prompt", "text", "params", "new_tokens", "wall_s", "n_rows", "source",
                "saved_at")


def default_path() -> Path:
    """$DECLAB_STORE, else $XDG_DATA_HOME/declab/runs.sqlite, else ~/.local/share/declab/runs.sqlite."""
    env = os.environ.get(ENV_STORE)
    if env:
        return Path(env).expanduser()
    data = os.environ.get("XDG_DATA_HOME")
    if data and Path(data).is_absolute():
        base = Path(data)
    else:
        try:
            base = Path.home() / ".local" / "share"
        except RuntimeError:                     # no home folder (a bare environment)
            raise UserError(f"no home folder for the run store: set {ENV_STORE} or use --store PATH") from None
    return base / "declab" / "runs.sqlite"


def open_store(path=None) -> "Store":
    """The store at `path` (default: `default_path()`), created with its folder if missing."""
    return Store(Path(path).expanduser() if path else default_path())


def _fold(value) -> str:
    return "" if value is None else str(value).casefold()


def _as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, (str, bytes)):
        return [value]
    return [v for v in value if v is not None]


def _json(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, default=str)


def trace_blob(frame: pd.DataFrame) -> bytes:
    """The trace as Parquet bytes. A column pyarrow cannot type (mixed Python objects) is stored as text rather than
    losing the run."""
    frame = frame if frame is not None else tr.to_frame([])
    buf = io.BytesIO()
    try:
        frame.to_parquet(buf, index=False, compression="zstd")
    except Exception:  # pyarrow.ArrowInvalid / ArrowTypeError / TypeError on an untypable object column
        safe = frame.copy()
        for col in safe.columns:
            if safe[col].dtype == object:
                safe[col] = safe[col].map(lambda v: v if v is None or (isinstance(v, float) and v != v)
                                          else str(v)).astype("string")
        buf = io.BytesIO()
        safe.to_parquet(buf, index=False, compression="zstd")
    return buf.getvalue()


def frame_from_blob(data: bytes) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(data))


def _unpack(run) -> tuple[dict, pd.DataFrame]:
    """A RunResult (its status/error win over the metadata's) or a (meta, frame) pair -> (meta copy, frame)."""
    if isinstance(run, tuple) and len(run) == 2:
        meta, frame = run
        meta = dict(meta or {})
    elif hasattr(run, "meta") and hasattr(run, "frame"):
        meta, frame = dict(run.meta or {}), run.frame
        if getattr(run, "status", None):
            meta["status"] = run.status
        if getattr(run, "error", None) is not None:
            meta["error"] = run.error
    else:
        raise TypeError(f"save() takes a RunResult or a (meta, frame) pair, not {type(run).__name__}")
    if frame is None:
        frame = tr.to_frame([])
    return meta, frame


def summary_text(meta: dict) -> str:
    """Every generated sequence's text, newline-joined (what the library searches besides the prompt)."""
    return "\n".join(str(s.get("text", "")) for s in (meta.get("sequences") or []) if isinstance(s, dict))


def _int_or_none(value):
    try:
        return None if value is None or isinstance(value, bool) else int(value)
    except (TypeError, ValueError):
        return None


def _float_or_none(value):
    try:
        return None if value is None or isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        return None


def _check_tag(tag) -> str:
    text = " ".join(str(tag).split())
    if not text:
        raise UserError("a tag cannot be empty")
    if len(text) > MAX_TAG_CHARS:
        raise UserError(f"a tag has at most {MAX_TAG_CHARS} characters, got {len(text)}")
    return text


def _day_bound(value, end: bool) -> str | None:
    """'2026-05-01' or an ISO time -> a started_at bound; a date alone covers the whole day."""
    if value is None or value == "":
        return None
    text = value.isoformat() if hasattr(value, "isoformat") else str(value).strip()
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}([T ]\d{2}(:\d{2}(:\d{2}(\.\d+)?)?)?)?", text):
        raise UserError(f"dates are YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS, got {text!r}")
    text = text.replace(" ", "T")
    if len(text) == 10:
        return text + ("T23:59:59.999" if end else "T00:00:00")
    return text + ("\uffff" if end else "")


class Store:
    """A run library in one SQLite file. Thread-safe and multi-process-safe (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the run store folder {self.path.parent}: {e.strerror or e}") from None
        self._init()

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    # ------------------------------------------------------------------------------------------ connections
    def _open(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                   check_same_thread=False)
        except sqlite3.Error as e:
            raise UserError(f"cannot open the run store {self.path}: {e}") from None
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = NORMAL")      # in WAL mode: durable across crashes, never corrupt
        conn.create_function("declab_fold", 1, _fold, deterministic=True)
        return conn

    @contextmanager
    def _conn(self):
        conn = self._open()
        try:
            yield conn
        except sqlite3.DatabaseError as e:
            raise UserError(f"run store {self.path}: {e}") from None
        finally:
            conn.close()

    def _locked(self, conn: sqlite3.Connection, statement: str):
        """Run `statement`, waiting on another process's lock: LOCK_NOTICE_S quietly, then saying so (WAIT_NOTICE)
        and waiting up to BUSY_TIMEOUT_S in all; a lock held longer is a one-line UserError."""
        conn.execute(f"PRAGMA busy_timeout = {int(LOCK_NOTICE_S * 1000)}")
        try:
            return conn.execute(statement)
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e):
                raise
        if WAIT_NOTICE is not None:
            WAIT_NOTICE(f"the run store {self.path} is locked by another process; waiting up to "
                        f"{BUSY_TIMEOUT_S:.0f} s")
        conn.execute(f"PRAGMA busy_timeout = {int((BUSY_TIMEOUT_S - LOCK_NOTICE_S) * 1000)}")
        try:
            return conn.execute(statement)
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e):
                raise
            raise UserError(f"the run store {self.path} is locked by another process (waited "
                            f"{BUSY_TIMEOUT_S:.0f} s); close it or try again") from None
        finally:
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")

    @contextmanager
    def _write(self):
        """One write transaction: everything inside commits together or not at all."""
        with self._conn() as conn:
            self._locked(conn, "BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _init(self) -> None:
        try:
            conn = self._open()
            try:
                version = self._locked(conn, "PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise UserError(f"run store {self.path} was written by a newer declab (schema {version}, "
                                    f"this version reads {SCHEMA_VERSION})")
                start = time.monotonic()
                said = False
                while True:                      # switching to WAL can report 'locked' without waiting: retry
                    try:
                        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                        break
                    except sqlite3.OperationalError as e:
                        if "locked" not in str(e):
                            raise
                        waited = time.monotonic() - start
                        if waited > BUSY_TIMEOUT_S:
                            raise UserError(f"the run store {self.path} is locked by another process (waited "
                                            f"{BUSY_TIMEOUT_S:.0f} s); close it or try again") from None
                        if waited > LOCK_NOTICE_S and not said and WAIT_NOTICE is not None:
                            WAIT_NOTICE(f"the run store {self.path} is locked by another process; waiting up to "
                                        f"{BUSY_TIMEOUT_S:.0f} s")
                            said = True
                        time.sleep(0.05)
                if str(mode).lower() != "wal":
                    raise UserError(f"run store {self.path}: cannot use WAL mode (journal mode {mode})")
                if version < SCHEMA_VERSION:
                    conn.execute("BEGIN IMMEDIATE")
                    try:
                        for statement in SCHEMA.split(";"):
                            if statement.strip():
                                conn.execute(statement)
                        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                    except BaseException:
                        conn.execute("ROLLBACK")
                        raise
                    conn.execute("COMMIT")
            finally:
                conn.close()
        except sqlite3.DatabaseError as e:
            raise UserError(f"{self.path} is not a usable declab run store: {e}") from None

    # ------------------------------------------------------------------------------------------ writes
    def save(self, run, source: str = "", tags=(), replace: bool = False) -> str:
        """Store one run (RunResult or (meta, frame)) with its whole trace in one transaction; returns its run_id.
        A run whose metadata has no run_id gets a new one. An existing run_id is an error unless `replace`."""
        meta, frame = _unpack(run)
        meta.setdefault("status", "ok")
        run_id = str(meta.get("run_id") or uuid.uuid4().hex[:12])
        meta["run_id"] = run_id
        meta["columns"] = tr.column_dtypes(frame)
        blob = trace_blob(frame)                      # built before the transaction: the lock is held briefly
        m = RunMeta.from_dict(meta)                   # typed reads; `meta` itself is stored as given
        row = {
            "run_id": run_id, "started_at": m.started_at or time.strftime("%Y-%m-%dT%H:%M:%S"),
            "saved_at": time.time(), "status": m.status or "ok", "error": m.error,
            "model": "" if m.model == "?" else m.model, "strategy": "" if m.strategy == "?" else m.strategy,
            "quantization": m.quantization or None, "dtype": m.dtype or None, "device": m.device or None,
            "seed": m.seed, "prompt_format": m.prompt_format or None, "prompt": m.prompt, "text": summary_text(meta),
            "params": _json(m.params), "new_tokens": _int_or_none(m.metrics.get("new_tokens")), "wall_s": m.wall_s,
            "n_rows": int(len(frame)), "source": str(source or ""), "meta": _json(meta),
        }
        for key in ("quantization", "dtype", "device", "prompt_format"):
            row[key] = None if row[key] is None else str(row[key])
        tag_list = sorted({_check_tag(t) for t in _as_list(tags)})
        with self._write() as c:
            _insert(c, row, blob, tag_list, replace)
        return run_id

    def delete(self, run_ids) -> int:
        """Delete runs (and their traces and tags); returns how many existed."""
        ids = [self.resolve(i) for i in _as_list(run_ids)]
        with self._write() as c:
            return sum(c.execute("DELETE FROM runs WHERE run_id = ?", (i,)).rowcount for i in ids)

    def tag(self, run_ids, add=(), remove=()) -> None:
        """Add and/or remove tags on runs (one transaction)."""
        ids = [self.resolve(i) for i in _as_list(run_ids)]
        add = [_check_tag(t) for t in _as_list(add)]
        remove = [" ".join(str(t).split()) for t in _as_list(remove)]
        with self._write() as c:
            for i in ids:
                c.executemany("INSERT OR IGNORE INTO tags (run_id, tag) VALUES (?, ?)", [(i, t) for t in add])
                c.executemany("DELETE FROM tags WHERE run_id = ? AND tag = ?", [(i, t) for t in remove])

    # ------------------------------------------------------------------------------------------ reads
    def resolve(self, ref) -> str:
        """A run_id, a unique prefix of one, or 'latest' -> the run_id. UserError when none or ambiguous."""
        ref = str(ref).strip()
        with self._conn() as c:
            if ref == "latest":
                row = c.execute("SELECT run_id FROM runs ORDER BY started_at DESC, saved_at DESC LIMIT 1").fetchone()
                if row is None:
                    raise UserError(f"the run store {self.path} is empty")
                return row[0]
            if c.execute("SELECT 1 FROM runs WHERE run_id = ?", (ref,)).fetchone():
                return ref
            like = ref.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            found = [r[0] for r in c.execute("SELECT run_id FROM runs WHERE run_id LIKE ? ESCAPE '\\' LIMIT 3",
                                             (like,))] if ref else []
        if not found:
            raise UserError(f"no run '{ref}' in the run store {self.path}")
        if len(found) > 1:
            raise UserError(f"'{ref}' matches several runs ({', '.join(found[:2])}, ...); give more of the run id")
        return found[0]

    def get(self, run_id) -> tuple[dict, pd.DataFrame]:
        """(meta, frame) of one run, exactly as saved."""
        run_id = self.resolve(run_id)
        with self._conn() as c:
            row = c.execute("SELECT r.meta, t.data FROM runs r LEFT JOIN traces t ON t.run_id = r.run_id "
                            "WHERE r.run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise UserError(f"no run '{run_id}' in the run store {self.path}")
        try:
            meta = json.loads(row[0])
            if not isinstance(meta, dict):
                raise ValueError("metadata is not an object")
            frame = frame_from_blob(row[1]) if row[1] is not None else tr.to_frame([])
        except Exception as e:  # damaged pages or blobs: one line, the rest of the library stays readable
            raise UserError(f"run {run_id} is damaged in the run store ({type(e).__name__}); the other runs are "
                            f"readable, `declab runs delete {run_id}` removes it") from None
        return meta, frame

    def info(self, run_id) -> dict:
        """The run's library row (see `list`), tags included."""
        run_id = self.resolve(run_id)
        rows = self._select("WHERE r.run_id = ?", [run_id], "", [])
        return rows[0]

    def list(self, model=None, strategy=None, status=None, tag=None, since=None, until=None, search=None,
             source=None, limit: int | None = None) -> list[dict]:
        """Library rows, newest first. Each filter takes one value or several (any of them matches); filters
        combine with AND. `since`/`until`: dates (YYYY-MM-DD, whole day) or ISO times on `started_at`;
        `search`: case-insensitive substring of the prompt or of any generated text."""
        where, args = [], []
        for column, value in (("model", model), ("strategy", strategy), ("status", status), ("source", source)):
            values = [str(v) for v in _as_list(value)]
            if values:
                where.append(f"r.{column} IN ({', '.join('?' * len(values))})")
                args += values
        tags = [str(t) for t in _as_list(tag)]
        if tags:
            where.append(f"r.run_id IN (SELECT run_id FROM tags WHERE tag IN ({', '.join('?' * len(tags))}))")
            args += tags
        lo, hi = _day_bound(since, end=False), _day_bound(until, end=True)
        if lo:
            where.append("r.started_at >= ?")
            args.append(lo)
        if hi:
            where.append("r.started_at <= ?")
            args.append(hi)
        if search is not None and str(search).strip():
            where.append("(instr(declab_fold(r.prompt), ?) > 0 OR instr(declab_fold(r.text), ?) > 0)")
            args += [_fold(search), _fold(search)]
        clause = ("WHERE " + " AND ".join(where)) if where else ""
        tail, tail_args = "", []
        if limit is not None:
            tail, tail_args = "LIMIT ?", [int(limit)]
        return self._select(clause, args, tail, tail_args)

    def _select(self, clause: str, args: list, tail: str, tail_args: list) -> list[dict]:
        cols = ", ".join(f"r.{c}" for c in LIST_COLUMNS)
        sql = (f"SELECT {cols}, (SELECT group_concat(tag, char(31)) FROM (SELECT tag FROM tags g WHERE "
               f"g.run_id = r.run_id ORDER BY tag)) FROM runs r {clause} ORDER BY r.started_at DESC, "
               f"r.saved_at DESC {tail}")
        with self._conn() as c:
            rows = c.execute(sql, args + tail_args).fetchall()
        out = []
        for row in rows:
            d = dict(zip(LIST_COLUMNS, row[:-1]))
            d["params"] = json.loads(d["params"] or "{}")
            d["tags"] = row[-1].split("\x1f") if row[-1] else []
            out.append(d)
        return out

    def count(self) -> int:
        with self._conn() as c:
            return c.execute("SELECT count(*) FROM runs").fetchone()[0]

    def facets(self) -> dict[str, list[str]]:
        """The distinct models, strategies, statuses, sources and tags in the store (for filter widgets)."""
        out = {}
        with self._conn() as c:
            for column in ("model", "strategy", "status", "source"):
                out[column] = [r[0] for r in c.execute(f"SELECT DISTINCT {column} FROM runs ORDER BY {column}")]
            out["tag"] = [r[0] for r in c.execute("SELECT DISTINCT tag FROM tags ORDER BY tag")]
        return out

    def check(self) -> str:
        """SQLite's integrity check ('ok' when the file is sound)."""
        with self._conn() as c:
            return "; ".join(r[0] for r in c.execute("PRAGMA integrity_check"))

    # ------------------------------------------------------------------------------------------ export / import
    def export(self, run_id, path, fmt: str | None = None) -> list[Path]:
        """Write one run: .csv or .parquet (trace, with `<name>.meta.json` beside it, as `declab run --csv` does),
        .json (metadata) or .html (standalone report). `fmt` overrides the suffix. Returns the files written."""
        meta, frame = self.get(run_id)
        path = Path(path)
        fmt = (fmt or path.suffix.lstrip(".")).lower()
        check_writable(path)
        if fmt not in ("csv", "parquet", "json", "html"):
            raise UserError(f"export format must be csv, parquet, json or html, got {fmt!r}")
        with writing(path):
            if fmt in ("csv", "parquet"):
                (tr.write_csv if fmt == "csv" else tr.write_parquet)(frame, path)
                meta_path = meta_path_for(path)
                tr.write_json(meta, meta_path)
                return [path, meta_path]
            if fmt == "json":
                tr.write_json(meta, path)
            else:
                path.write_text(report_html([(meta, frame)]), encoding="utf-8")
            return [path]

    def export_bytes(self, run_ids, fmt: str) -> bytes:
        """A selection as one download (see `bundle_bytes`)."""
        return bundle_bytes([self.get(i) for i in _as_list(run_ids)], fmt)

    def import_run(self, trace_path, meta_path=None, source: str = "import", replace: bool = False) -> str:
        """Import a run exported elsewhere: a CSV or Parquet trace plus its JSON metadata (`meta_path`, else
        `<name>.meta.json` or `<name>.json` beside the trace; without one, what the trace tells). Returns its id."""
        meta, frame = read_export(trace_path, meta_path)
        return self.save((meta, frame), source=source, replace=replace)


def _insert(c: sqlite3.Connection, row: dict, blob: bytes, tags: list[str], replace: bool) -> None:
    """The inserts of one save, inside its transaction."""
    if c.execute("SELECT 1 FROM runs WHERE run_id = ?", (row["run_id"],)).fetchone():
        if not replace:
            raise UserError(f"run {row['run_id']} is already in the run store")
        c.execute("DELETE FROM runs WHERE run_id = ?", (row["run_id"],))
    cols = list(row)
    c.execute(f"INSERT INTO runs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", [row[k] for k in cols])
    c.execute("INSERT INTO traces (run_id, format, data) VALUES (?, 'parquet', ?)", (row["run_id"], blob))
    c.executemany("INSERT INTO tags (run_id, tag) VALUES (?, ?)", [(row["run_id"], t) for t in tags])


def check_writable(path) -> None:
    """Before any work: an output path must not be a folder and its folder must exist (one-line UserError)."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"cannot write {p}: it is a folder; give a file name")
    if not p.resolve().parent.is_dir():
        raise UserError(f"cannot write {p}: folder does not exist")


@contextmanager
def writing(path, note: str = ""):
    """Writing an output file: an OS failure (read-only, a folder, a full disk) becomes one line naming the path."""
    try:
        yield
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}{note}") from None


def meta_path_for(trace_path) -> Path:
    """`x.csv` -> `x.meta.json` (the name `declab run --csv` and `export` use)."""
    p = Path(trace_path)
    return p.with_name(p.stem + ".meta.json")


def read_export(trace_path, meta_path=None) -> tuple[dict, pd.DataFrame]:
    """(meta, frame) from an exported trace file and its metadata (see Store.import_run)."""
    trace_path = Path(trace_path)
    if not trace_path.is_file():
        raise UserError(f"cannot read trace {trace_path}: no such file")
    if trace_path.suffix.lower() not in (".csv", ".parquet"):
        raise UserError(f"a trace is a .csv or .parquet file, got {trace_path.name}")
    if meta_path is None:
        for candidate in (meta_path_for(trace_path), trace_path.with_suffix(".json")):
            if candidate.is_file():
                meta_path = candidate
                break
    meta = {}
    if meta_path is not None:
        try:
            meta = tr.read_meta(meta_path)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{meta_path} is not valid JSON metadata: {e}") from None
        except OSError as e:
            raise UserError(f"cannot read metadata {meta_path}: {e.strerror or e}") from None
        if not isinstance(meta, dict):
            raise UserError(f"{meta_path} is not declab run metadata (expected a JSON object)")
        try:
            validate_meta(meta)
        except UserError as e:
            raise UserError(f"{meta_path.name}: {e}") from None
    columns = meta.get("columns") if isinstance(meta.get("columns"), dict) else None
    try:
        frame = tr.read_trace(trace_path, columns)
    except Exception as e:  # malformed file: one line, no traceback
        raise UserError(f"cannot read trace {trace_path}: {type(e).__name__}: {e}") from None
    missing = [c for c in REQUIRED_TRACE_COLUMNS if c not in frame.columns]
    if missing:
        raise UserError(f"{trace_path.name} is not a declab trace: missing column(s) {', '.join(missing)}")
    for col, dtype in tr.BASE_DTYPES.items():            # the documented columns are enough: the rest are NA
        if col not in frame.columns:
            frame[col] = pd.Series([None] * len(frame), index=frame.index, dtype=dtype)
    if not meta:
        meta = meta_from_frame(frame)
    return meta, frame


def meta_from_frame(frame: pd.DataFrame) -> dict:
    """Minimal metadata for a trace imported without its JSON: what the rows tell."""
    def first(col):
        if col in frame.columns and frame[col].notna().any():
            return str(frame[col].dropna().iloc[0])
        return None
    tok = frame[frame["kind"] == "token"] if "kind" in frame.columns else frame.iloc[:0]
    text = "".join("" if pd.isna(t) else str(t) for t in tok["token_text"]) if "token_text" in tok else ""
    ids = [int(i) for i in tok["token_id"].dropna()] if "token_id" in tok else []
    try:
        metrics = summarize(frame)
    except Exception:
        metrics = {}
    trace_id = first("run_id")
    run_id = trace_id if trace_id and RUN_ID_RE.fullmatch(trace_id) else uuid.uuid4().hex[:12]
    return {"run_id": run_id, "strategy": first("strategy") or "?",
            "model": first("model") or "?", "status": "ok", "error": None, "params": {}, "prompt": "",
            "sequences": [{"text": text, "token_ids": ids, "score": None}] if len(tok) else [], "metrics": metrics,
            "note": "imported without metadata: settings unknown, column types inferred"}


def bundle_bytes(items: list[tuple[dict, pd.DataFrame]], fmt: str) -> bytes:
    """(meta, frame) pairs as one download: 'csv' or 'parquet' -> a zip with `<stem>.<fmt>` + `<stem>.meta.json` per
    run (each importable with `import_run`); 'html' -> one standalone HTML report of every run."""
    if not items:
        raise UserError("no runs selected")
    if fmt == "html":
        return report_html(items).encode("utf-8")
    if fmt not in ("csv", "parquet"):
        raise UserError(f"export format must be csv, parquet or html, got {fmt!r}")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for meta, frame in items:
            stem = RunMeta.from_dict(meta).stem
            data = io.StringIO() if fmt == "csv" else io.BytesIO()
            (tr.write_csv if fmt == "csv" else tr.write_parquet)(frame, data)
            value = data.getvalue()
            z.writestr(f"{stem}.{fmt}", value.encode("utf-8") if isinstance(value, str) else value)
            z.writestr(f"{stem}.meta.json", json.dumps(meta, indent=2, ensure_ascii=False, default=str))
    return buf.getvalue()


def report_html(items: list[tuple[dict, pd.DataFrame]]) -> str:
    """One standalone HTML report: viz.report.html_report for one run; for several, a summary table then each
    run's report (plotly.js embedded once). Every model or user text is escaped by html_report or here."""
    if len(items) == 1:
        return html_report(*items[0])
    try:
        from plotly.offline import get_plotlyjs
        plotlyjs = get_plotlyjs()
    except Exception:
        plotlyjs = None
    rows, bodies = [], []
    for i, (meta, frame) in enumerate(items):
        rm = RunMeta.from_dict(meta)
        m = rm.metrics
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
            i + 1, rm.run_id, rm.strategy, rm.model, rm.status, rm.started_at, m.get("new_tokens", ""),
            m.get("mean_entropy_bits", ""), m.get("perplexity", ""), summary_text(meta)[:200])) + "</tr>")
        page = html_report(meta, frame)
        body = page.split("<body>", 1)[-1].rsplit("</body>", 1)[0]
        if i > 0 and plotlyjs:
            body = body.replace(plotlyjs, "")          # the library is already on the page (first report)
        bodies.append(f'<section id="run-{i + 1}" style="border-top: 3px solid #888; margin-top: 3em">{body}'
                      f'</section>')
    head = "".join(f"<th>{h}</th>" for h in ("#", "run", "strategy", "model", "status", "started", "new tokens",
                                             "mean entropy (bits)", "perplexity", "text"))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>declab: {len(items)} runs</title><style>{CSS}</style></head>
<body>
<h1>declab: {len(items)} runs</h1>
<table><tr>{head}</tr>{''.join(rows)}</table>
{''.join(bodies)}
</body></html>
"""
