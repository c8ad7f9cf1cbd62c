"""One sweep run, wherever it executes (the driver, a local worker process, a Ray actor): the engine's run, then
the requested metrics, as one plain-data Outcome sent back to the driver (which stores it).

    outcome = execute(settings, run, load=get_lm)     # never raises for a failing run: status 'failed' + message
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import time
import traceback
from dataclasses import dataclass, field

import pandas as pd

from declab.core import UserError
from declab.core import trace as tr
from declab.run import Run, get_lm, validate
from declab.sweep import metrics as M
from declab.sweep.spec import Sweep, SweepRun

# the strategy's own metrics that the summary already has as base columns
BASE_METRICS = ("new_tokens", "tokens_per_s")


@dataclass(frozen=True)
class Settings:
    """What every run of a sweep shares (sent to the workers once per run: small)."""

    name: str
    sweep_id: str
    model: str
    prompt_format: str | None
    max_new_tokens: int
    metrics: tuple[str, ...]
    ngram: int

    @classmethod
    def of(cls, sweep: Sweep, sweep_id: str) -> "Settings":
        return cls(sweep.name, sweep_id, sweep.model, sweep.prompt_format, sweep.max_new_tokens, sweep.metrics,
                   sweep.ngram)


@dataclass
class Outcome:
    row: dict                                   # one summary row (rows.jsonl line)
    meta: dict                                  # the run's metadata (run library)
    frame: pd.DataFrame = field(repr=False)     # the run's trace


def sweep_run_id(sweep_id: str, key: str) -> str:
    """The run library id of a sweep's run: the same on a rerun after --resume, so saving it again replaces it."""
    return hashlib.sha1(f"{sweep_id}:{key}".encode()).hexdigest()[:12]


def peak_rss_mb() -> float:
    """This process's peak resident memory (ru_maxrss: KiB on Linux)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def _clean(value):
    """A metric value as plain JSON data (NaN / inf -> None, numpy scalars -> Python)."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return json.dumps(value, default=str)


def execute(settings: Settings, run: SweepRun, load=None) -> Outcome:
    """Run one (strategy, params, prompt, seed) and measure it. A run that fails (a UserError only a model can
    find, such as a prompt longer than the context, or an exception during decoding) is an Outcome with status
    'failed' and its message; the sweep goes on."""
    load = load or get_lm
    run_id = sweep_run_id(settings.sweep_id, run.key)
    tag = {"name": settings.name, "id": settings.sweep_id, "key": run.key, "prompt_id": run.prompt.id}
    row = {"sweep": settings.name, "strategy": run.strategy, "params": json.dumps(run.params, sort_keys=True,
           default=str), "prompt_id": run.prompt.id, "seed": run.seed, "status": "failed", "error": None,
           "new_tokens": 0, "wall_s": None, "tokens_per_s": None, "text": "", "run_id": run_id, "key": run.key}
    request = run.request(settings)
    t0 = time.perf_counter()
    try:
        plan = validate(request)
        lm = load(settings.model)
        result = Run(lm, plan, load=load).run_to_end()
    except Exception as e:  # UserError at run time, or a load failure: recorded, the sweep goes on
        msg = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        row.update(error=msg, wall_s=round(time.perf_counter() - t0, 4))
        meta = {"run_id": run_id, "status": "failed", "error": msg, "model": settings.model, "strategy": run.strategy,
                "params": run.params, "seed": run.seed, "prompt": run.prompt.text,
                "max_new_tokens": settings.max_new_tokens, "sweep": tag,
                "note": "the run failed before decoding: " + traceback.format_exception_only(type(e), e)[-1].strip()}
        return Outcome(row={**row, "strategy_metrics": {}, "metrics": {}, "worker": _worker()}, meta=meta,
                       frame=tr.to_frame([]))
    meta = dict(result.meta)
    meta["run_id"] = run_id
    meta["sweep"] = tag
    frame = result.frame.copy()
    frame["run_id"] = pd.array([run_id] * len(frame), dtype="string")
    seq = result.sequences[0] if result.sequences else None
    ids = list(seq.token_ids) if seq else []
    text = seq.text if seq else ""
    own = meta.get("metrics") or {}
    row.update(status=result.status, error=result.error, new_tokens=int(own.get("new_tokens", len(ids))),
               wall_s=meta.get("wall_s"), tokens_per_s=own.get("tokens_per_s"), text=text)
    requested = {}
    for name in settings.metrics:
        try:
            requested[name] = _clean(M.compute(name, lm, run.prompt, meta.get("prompt_ids") or [], ids, text,
                                               settings.ngram))
        except Exception as e:  # a metric that cannot be computed is empty, and says why in the error column
            requested[name] = None
            row["error"] = (row["error"] + "; " if row["error"] else "") + f"metric {name}: {type(e).__name__}: {e}"
    row["strategy_metrics"] = {k: _clean(v) for k, v in own.items() if k not in BASE_METRICS}
    row["metrics"] = requested
    row["worker"] = _worker()
    return Outcome(row=row, meta=meta, frame=frame)


def _worker() -> dict:
    return {"pid": os.getpid(), "peak_rss_mb": peak_rss_mb()}
