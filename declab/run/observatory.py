"""The drafter observatory (issue 17 item 6): several drafters against one verifier, same prompt and seed.

    requests = drafter_requests("fake", " the cat", ["model", "aded"], max_new_tokens=32, seed=0,
                                params={"tree_budget": 8}, prompt_format="raw")   # [(drafter, RunRequest)]
    ... run them one after another (declab.run.service.RunService: the CLI's `declab drafters`, the app's page)
    frame = summary_frame([(drafter, result) for ...])                               # one row per drafter
    write_summary_csv(frame, "drafters.csv")             # spreadsheet-safe; read_summary_csv reads it back exactly

Every request is `spec_tree` with `drafter=X` and the same shared parameters, so the runs differ only in who
proposes the tree; the target verifies every tree the same way. `drafter_requests` validates all of them before
any runs (a bad one is a one-line UserError naming the drafter). The legal drafters are read from the strategy's
own `drafter` parameter (its `choices`), never from `strategies/` (the engine does not import strategies).

The summary's columns (SUMMARY_COLUMNS) come from each run's metadata: `status`, `wall_s`, and the metrics
`new_tokens`, `tokens_per_s` and spec_tree's TreeMetrics (rounds, target_forwards, acceptance_rate,
mean_accepted_length, tree_nodes_mean, speedup, spec_ms, target_only_ms; see declab/core/metrics.py). `drafter` is
the drafter asked for (the model drafter's metrics name the draft model instead). A drafter whose run did not
produce a result (an error before its first step) has its status and empty cells.
"""

from __future__ import annotations

import io
from typing import Iterable

import pandas as pd

from declab.core import UserError, get_strategy
from declab.core import trace as tr
from declab.models.heads import HEAD_KINDS, has_heads
from declab.models.registry import Registry
from declab.run.plan import RunRequest, validate

STRATEGY = "spec_tree"
SUMMARY_COLUMNS = ("drafter", "status", "new_tokens", "rounds", "target_forwards", "acceptance_rate",
                   "mean_accepted_length", "tree_nodes_mean", "speedup", "spec_ms", "target_only_ms", "wall_s",
                   "tokens_per_s", "run_id")
INT_COLUMNS = ("new_tokens", "rounds", "target_forwards")
FLOAT_COLUMNS = ("acceptance_rate", "mean_accepted_length", "tree_nodes_mean", "speedup", "spec_ms",
                 "target_only_ms", "wall_s", "tokens_per_s")
TEXT_COLUMNS = ("drafter", "status", "run_id")
SUMMARY_DTYPES = {**dict.fromkeys(TEXT_COLUMNS, "string"), **dict.fromkeys(INT_COLUMNS, "Int64"),
                  **dict.fromkeys(FLOAT_COLUMNS, "float64")}


def legal_drafters() -> tuple[str, ...]:
    """The drafters spec_tree knows, from its `drafter` parameter's choices (in the strategy's order)."""
    for p in get_strategy(STRATEGY).params():
        if p["name"] == "drafter":
            return tuple(p["choices"] or ())
    raise UserError(f"strategy '{STRATEGY}' has no drafter parameter")


def usable_drafters(spec) -> tuple[str, ...]:
    """The legal drafters that can run on the models.yaml entry `spec`: the trained-head drafters (medusa, hydra,
    eagle, kangaroo) only where the entry has their weights (declab/models/heads.py). The default selection."""
    return tuple(d for d in legal_drafters() if d not in HEAD_KINDS or has_heads(spec, d))


def parse_drafters(text: str | Iterable[str]) -> list[str]:
    """'model, aded' (or a list) -> ['model', 'aded']; unknown, repeated or no drafters: a one-line UserError."""
    items = text.split(",") if isinstance(text, str) else list(text)
    names = [str(d).strip() for d in items if str(d).strip()]
    legal = legal_drafters()
    if not names:
        raise UserError(f"no drafters given; the drafters are: {', '.join(legal)}")
    seen: set[str] = set()
    for name in names:
        if name not in legal:
            raise UserError(f"unknown drafter '{name}'; the drafters are: {', '.join(legal)}")
        if name in seen:
            raise UserError(f"drafter '{name}' is listed twice")
        seen.add(name)
    return names


def drafter_requests(model: str, prompt: str, drafters: str | Iterable[str], max_new_tokens: int = 64,
                     seed: int = 0, params: dict | None = None, prompt_format: str | None = None,
                     second_model: str | None = None,
                     registry: Registry | None = None) -> list[tuple[str, RunRequest]]:
    """One spec_tree request per drafter (label = the drafter), all with the same model, prompt, seed, limit and
    shared parameters; every one validated before this returns (UserError 'drafter X: ...' otherwise). `params`
    must not set `drafter` (the observatory sets it)."""
    names = parse_drafters(drafters)
    shared = dict(params or {})
    if "drafter" in shared:
        raise UserError("the drafter is chosen per run (--drafters / the drafters picker); do not set it as a "
                        "shared parameter")
    out = []
    for name in names:
        req = RunRequest(model=model, strategy=STRATEGY, prompt=prompt, params={**shared, "drafter": name},
                         prompt_format=prompt_format, max_new_tokens=max_new_tokens, seed=seed,
                         second_model=second_model)
        try:
            validate(req, registry)
        except UserError as e:
            raise UserError(f"drafter {name}: {e}") from None
        out.append((name, req))
    return out


def _meta(result) -> dict | None:
    """A RunResult, a RunRecord-like object with `.meta`, or a metadata dict -> the metadata dict (or None)."""
    if result is None:
        return None
    if isinstance(result, dict):
        return result
    return getattr(result, "meta", None)


def summary_row(drafter: str, result, status: str | None = None) -> dict:
    """One summary row from one run's result (RunResult, record with `.meta`, or metadata dict; None: no run)."""
    meta = _meta(result)
    row: dict = dict.fromkeys(SUMMARY_COLUMNS)
    row["drafter"] = drafter
    if meta is None:
        row["status"] = status or "not run"
        return row
    m = meta.get("metrics") or {}
    row.update({k: m.get(k) for k in INT_COLUMNS + FLOAT_COLUMNS if k != "wall_s"})
    row.update(status=status or meta.get("status"), wall_s=meta.get("wall_s"), run_id=meta.get("run_id"))
    return row


def summary_frame(results: Iterable) -> pd.DataFrame:
    """One row per drafter, columns SUMMARY_COLUMNS (typed: counts Int64, measures float64, text string).
    `results`: (drafter, result) or (drafter, result, status) items; a status given overrides the run's own
    (e.g. 'error' for a run that raised before producing anything)."""
    rows = [summary_row(*item) for item in results]
    frame = pd.DataFrame.from_records(rows, columns=list(SUMMARY_COLUMNS))
    for col, dtype in SUMMARY_DTYPES.items():
        frame[col] = frame[col].astype("string") if dtype == "string" else \
            pd.to_numeric(frame[col], errors="coerce").astype(dtype)
    return frame


def write_summary_csv(frame: pd.DataFrame, path) -> None:
    """The summary as CSV, spreadsheet-safe and exact: the trace CSV writer (declab.core.trace.write_csv), which
    quotes text and gives formula-like text one leading apostrophe that `read_trace` strips."""
    tr.write_csv(frame, path)


def read_summary_csv(path) -> pd.DataFrame:
    """A summary CSV written by write_summary_csv, read back exactly (typed as SUMMARY_DTYPES)."""
    return tr.read_trace(path, SUMMARY_DTYPES)


def summary_csv_bytes(frame: pd.DataFrame) -> bytes:
    buf = io.StringIO()
    write_summary_csv(frame, buf)
    return buf.getvalue().encode("utf-8")


def format_table(frame: pd.DataFrame) -> str:
    """The summary as a plain-text table for a terminal (empty cells as '-')."""
    shown = frame.astype(object).where(frame.notna(), "-")
    return shown.to_string(index=False)
