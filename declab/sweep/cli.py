"""`declab sweep FILE --out DIR [--backend local|ray] [--workers N] [--address ADDR] [--resume] [--store PATH |
--no-store]` (wired into declab/cli.py; the sweep itself is declab.sweep.driver).

The file is validated whole before anything runs (exit status 2 and one line naming the field and the legal values).
Progress (runs done, failures, ETA) goes to stderr when it is a terminal; at the end one line on stdout says how many
runs are in the summary. Exit status: 0, 1 when a run failed, 130 when interrupted (Ctrl-C: the workers are ended,
the finished runs are kept and written to the summary; `--resume` runs the rest).
"""

from __future__ import annotations

import sys

from declab.core import UserError
from declab.models.registry import load_registry
from declab.sweep.backends import BACKENDS
from declab.sweep.driver import run_sweep
from declab.sweep.spec import load_sweep


def add_sweep_parser(sub):
    s = sub.add_parser("sweep", help="run a sweep file: strategies x parameter grids x prompts x seeds, one summary")
    s.add_argument("file", metavar="FILE", help="the sweep file (YAML; see README 'Sweeps')")
    s.add_argument("--out", required=True, metavar="DIR",
                   help="output folder: summary.parquet, summary.csv, rows.jsonl, sweep.json")
    s.add_argument("--backend", default="local", choices=BACKENDS,
                   help="local: worker processes on this machine (default); ray: Ray tasks on a cluster")
    s.add_argument("--workers", type=int, default=1, metavar="N",
                   help="worker processes (local) or actors (ray); torch threads are split between them")
    s.add_argument("--address", default=None, metavar="ADDR",
                   help="ray: address of a running cluster (default: a local Ray started for the sweep)")
    s.add_argument("--resume", action="store_true", help="finish the sweep in DIR: run only the runs without a row")
    s.add_argument("--no-store", action="store_true", help="do not keep the runs' traces in the run library")
    return s


def cmd_sweep(args) -> int:
    registry = load_registry()
    sweep = load_sweep(args.file, registry)                  # every run validated before any model loads
    if args.address and args.backend != "ray":
        raise UserError("--address is for --backend ray")
    if not 1 <= args.workers <= 256:
        raise UserError(f"--workers must be an integer in [1, 256], got {args.workers}")
    try:
        res = run_sweep(sweep, args.out, backend=args.backend, workers=args.workers, address=args.address,
                        resume=args.resume, store_path="" if args.no_store else args.store)
    except KeyboardInterrupt:
        print(f"declab: interrupted; the finished runs are in {args.out}/summary.parquet; --resume runs the rest",
              file=sys.stderr)
        return 130
    for line in res.unsaved[:5]:
        print(f"declab: warning: run not stored in the run library: {line}", file=sys.stderr)
    print(f"sweep {sweep.name}: {res.total - res.missing}/{res.total} runs ({res.failed} failed; {res.ran} run now "
          f"in {res.wall_s:.1f} s) -> {res.out}/summary.parquet, summary.csv")
    return 1 if res.failed else 0
