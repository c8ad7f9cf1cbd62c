"""Sweeps: strategies x parameter grids x prompts x seeds as one job, on this machine or a Ray cluster.

    spec.py      the sweep file (YAML) -> Sweep (every run validated by the engine before anything runs)
    prompts.py   prompt sets: a list, a JSONL file, built-in sets (open-ended, chat, humaneval, input-grounded, grammar)
    metrics.py   rep_n, distinct_n, perplexity under the model, pass@1, grammar validity (defined in docstrings)
    code.py      HumanEval prompt, code extraction, sandboxed execution (shared with bench/humaneval.py)
    work.py      one run wherever it executes -> Outcome (summary row, metadata, trace)
    backends.py  inline, local worker processes (spawn), Ray actors
    driver.py    resume bookkeeping, the run library, summary.parquet / summary.csv, the progress bar
    cli.py       `declab sweep` (wired into declab/cli.py)
"""
