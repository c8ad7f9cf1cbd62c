"""Running strategies: a request validated once into a plan, models resolved by role, the runner, the background
run service and the run library.

    plan.py      RunRequest (keys and text only), RunPlan, validate
    resolve.py   resolve_models (the one resolver), get_lm (one load per process), check_same_tokenizer
    runner.py    Run, RunResult
    service.py   RunService, Job: background runs with streaming, stop and storing (the app and the CLI)
    store.py     the run library (SQLite)
"""

from declab.run.plan import MAX_PROMPT_CHARS, RunPlan, RunRequest, validate
from declab.run.resolve import MAIN, check_same_tokenizer, get_lm, resolve_models
from declab.run.runner import Run, RunResult, strip_eos, versions

__all__ = ["MAX_PROMPT_CHARS", "RunPlan", "RunRequest", "validate", "MAIN", "check_same_tokenizer", "get_lm",
           "resolve_models", "Run", "RunResult", "strip_eos", "versions"]
