"""The sweep driver: resume bookkeeping, the backend, the run library, the summary files, the progress bar.

    result = run_sweep(load_sweep("sweep.yaml"), "out/", backend="local", workers=2)

The output folder:
    DIR/sweep.json        the sweep's id, name and file (written first; `--resume` reads the id back)
    DIR/rows.jsonl        one JSON line per finished run (ok, stopped or failed), appended and fsync'ed as each run
                          ends: the record `--resume` reads
    DIR/summary.parquet   one row per run (SUMMARY_COLUMNS, then the strategy's own metrics, then the requested
    DIR/summary.csv       metrics), rewritten from rows.jsonl every few seconds and at the end; the CSV is
                          spreadsheet-safe (declab.core.trace.write_csv)

Nothing is lost: each run's trace is saved in the run library (source 'sweep', tag `sweep:<name>`, metadata key
`sweep` = {name, id, key, prompt_id}) before its line is appended, under an id derived from the sweep id and the
run's key, so a run finished again after a kill between the two replaces its first copy. A sweep killed at any
point and started again with `--resume` reads rows.jsonl (a torn last line is dropped), runs only the runs without
a line, and ends with exactly one row per run. A failing run is a row with status 'failed' and its message; the
sweep goes on.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from declab.core import UserError
from declab.core import trace as tr
from declab.run.store import open_store
from declab.sweep import backends as B
from declab.sweep.spec import Sweep
from declab.sweep.work import Outcome, Settings

SUMMARY_COLUMNS = ("sweep", "strategy", "params", "prompt_id", "seed", "status", "error", "new_tokens", "wall_s",
                   "tokens_per_s", "text", "run_id")
SUMMARY_EVERY_S = 5.0
SOURCE = "sweep"


def tag_of(name: str) -> str:
    """The run library tag of a sweep's runs."""
    return f"sweep:{name}"


@dataclass
class SweepResult:
    out: Path
    total: int
    ran: int                                       # runs executed by this call
    failed: int                                    # failed rows in the summary
    missing: int                                   # runs without a row (interrupted)
    wall_s: float
    unsaved: list[str] = field(default_factory=list)   # run library problems (one line each)
    summary: pd.DataFrame | None = None


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def read_rows(path: Path) -> list[dict]:
    """The rows of rows.jsonl (a torn or unreadable line, such as the last one of a killed writer, is skipped)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("key"), str):
            out.append(row)
    return out


def summary_frame(rows: list[dict], order: list[str] | None = None, metrics: tuple[str, ...] = ()) -> pd.DataFrame:
    """One row per run key (the last line of a key wins), in `order` (the sweep's run order), with SUMMARY_COLUMNS,
    then the strategies' own metrics (first-seen order; one that a requested metric names is left to it), then the
    requested metrics."""
    by_key = {}
    for r in rows:
        by_key[r["key"]] = r
    keys = [k for k in order if k in by_key] if order is not None else list(by_key)
    own: dict[str, None] = {}
    for k in keys:
        for name in by_key[k].get("strategy_metrics") or {}:
            if name not in metrics and name not in SUMMARY_COLUMNS:
                own.setdefault(name)
    records = []
    for k in keys:
        r = by_key[k]
        rec = {c: r.get(c) for c in SUMMARY_COLUMNS}
        sm, rm = r.get("strategy_metrics") or {}, r.get("metrics") or {}
        rec.update({name: sm.get(name) for name in own})
        rec.update({name: rm.get(name) for name in metrics})
        records.append(rec)
    df = pd.DataFrame.from_records(records, columns=list(SUMMARY_COLUMNS) + list(own) + list(metrics))
    for col in ("sweep", "strategy", "params", "prompt_id", "status", "error", "text", "run_id"):
        df[col] = df[col].astype("string")
    for col in ("seed", "new_tokens"):
        df[col] = df[col].astype("Int64")
    for col in ("wall_s", "tokens_per_s") + tuple(metrics):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    for col in own:
        values = df[col].dropna()
        if len(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            df[col] = pd.to_numeric(df[col]).astype("float64")
        elif len(values) and all(isinstance(v, bool) for v in values):
            df[col] = df[col].astype("boolean")
        else:
            df[col] = df[col].map(lambda v: None if v is None else str(v)).astype("string")
    return df


def write_summary(df: pd.DataFrame, out: Path) -> None:
    _atomic_write(out / "summary.parquet", lambda p: tr.write_parquet(df, p))
    _atomic_write(out / "summary.csv", lambda p: tr.write_csv(df, p))


def read_summary(out) -> pd.DataFrame:
    """DIR/summary.parquet (what the app's Sweeps page reads)."""
    return pd.read_parquet(Path(out) / "summary.parquet")


class ProgressBar:
    """runs done / total with an ETA on stderr, redrawn in place; silent unless the stream is a terminal."""

    def __init__(self, name: str, total: int, done: int, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.name, self.total, self.done, self.failed = name, total, done, 0
        self.start_done, self.t0 = done, time.monotonic()
        self.draw()

    def text(self, width: int = 24) -> str:
        frac = self.done / self.total if self.total else 1.0
        bar = "#" * int(round(frac * width))
        ran, elapsed = self.done - self.start_done, time.monotonic() - self.t0
        eta = ""
        if 0 < ran and self.done < self.total:
            left = (self.total - self.done) * elapsed / ran
            eta = f"  ETA {int(left // 60)}m{int(left % 60):02d}s"
        fails = f" ({self.failed} failed)" if self.failed else ""
        return f"sweep {self.name} [{bar:<{width}}] {self.done}/{self.total} runs{fails}{eta}"

    def draw(self) -> None:
        if self.enabled:
            self.stream.write("\r" + self.text() + "\x1b[K")
            self.stream.flush()

    def update(self, status: str) -> None:
        self.done += 1
        self.failed += status == "failed"
        self.draw()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def prepare_out(sweep: Sweep, out: Path, resume: bool) -> str:
    """Check / create the output folder; the sweep id (new, or read back with `resume`)."""
    info = out / "sweep.json"
    if resume:
        if not info.is_file():
            raise UserError(f"--resume: {out} holds no sweep (no sweep.json); start it without --resume")
        try:
            old = json.loads(info.read_text(encoding="utf-8"))
            sweep_id, name = str(old["id"]), old["name"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"--resume: cannot read {info}: {type(e).__name__}: {e}") from None
        if name != sweep.name:
            raise UserError(f"--resume: {out} holds sweep '{name}', the file names '{sweep.name}'")
        return sweep_id
    if info.exists() or (out / "rows.jsonl").exists():
        raise UserError(f"{out} already holds a sweep; add --resume to finish it, or give another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {out}: {e.strerror or e}") from None
    sweep_id = uuid.uuid4().hex[:12]
    data = {"id": sweep_id, "name": sweep.name, "model": sweep.model, "prompt_set": sweep.prompt_set,
            "runs": len(sweep.runs), "metrics": list(sweep.metrics), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "file": sweep.text}
    _atomic_write(info, lambda p: p.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8"))
    return sweep_id


def run_sweep(sweep: Sweep, out, backend: str = "local", workers: int = 1, address: str | None = None,
              resume: bool = False, store_path: str | None = None, load=None, stream=None) -> SweepResult:
    """Run every run of the sweep that has no row yet; write the summary (also when interrupted).
    backend: local | ray | inline (the driver's process; `load` may give the model). store_path: None = the
    default run library, "" = keep no traces."""
    if backend not in B.BACKENDS + ("inline",):
        raise UserError(f"--backend must be one of {', '.join(B.BACKENDS)}, got {backend!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= 256:
        raise UserError(f"--workers must be an integer in [1, 256], got {workers!r}")
    out = Path(out)
    store = open_store(store_path) if store_path != "" else None      # a bad store path fails before any run
    sweep_id = prepare_out(sweep, out, resume)
    rows_path = out / "rows.jsonl"
    rows = read_rows(rows_path)
    _atomic_write(rows_path, lambda p: p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                                    encoding="utf-8"))           # drop a torn last line
    done = {r["key"] for r in rows}
    todo = [r for r in sweep.runs if r.key not in done]
    order = [r.key for r in sweep.runs]
    settings = Settings.of(sweep, sweep_id)
    bar = ProgressBar(sweep.name, len(sweep.runs), len(sweep.runs) - len(todo), stream)
    unsaved: list[str] = []
    ran, t0, last_summary = 0, time.perf_counter(), time.monotonic()
    if backend == "inline":
        outcomes = B.run_inline(settings, todo, load=load)
    elif backend == "local":
        outcomes = B.run_local(settings, todo, workers)
    else:
        outcomes = B.run_ray(settings, todo, workers, address)
    try:
        with open(rows_path, "a", encoding="utf-8") as f:
            for o in outcomes:
                o: Outcome
                if store is not None:
                    try:
                        store.save((o.meta, o.frame), source=SOURCE, tags=[tag_of(sweep.name)], replace=True)
                    except Exception as e:  # the row is still kept; the CLI reports it
                        unsaved.append(f"{o.row['run_id']}: {type(e).__name__}: {e}")
                f.write(json.dumps(o.row, ensure_ascii=False, default=str) + "\n")
                f.flush()
                os.fsync(f.fileno())
                rows.append(o.row)
                ran += 1
                bar.update(o.row["status"])
                if time.monotonic() - last_summary > SUMMARY_EVERY_S:
                    write_summary(summary_frame(rows, order, sweep.metrics), out)
                    last_summary = time.monotonic()
    finally:
        close = getattr(outcomes, "close", None)
        if close is not None:
            close()                                  # ends the workers (also on Ctrl-C)
        bar.close()
        df = summary_frame(rows, order, sweep.metrics)
        write_summary(df, out)
    return SweepResult(out=out, total=len(sweep.runs), ran=ran, failed=int((df["status"] == "failed").sum()),
                       missing=len(sweep.runs) - len(df), wall_s=round(time.perf_counter() - t0, 3),
                       unsaved=unsaved, summary=df)


def list_sweeps(root) -> list[Path]:
    """Sweep output folders under `root` (itself or any folder below holding a summary.parquet), newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p.parent for p in root.rglob("summary.parquet") if (p.parent / "sweep.json").is_file()]
    return sorted(found, key=lambda p: (p / "summary.parquet").stat().st_mtime, reverse=True)


def sweep_info(out) -> dict:
    try:
        return json.loads((Path(out) / "sweep.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
