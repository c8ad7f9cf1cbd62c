"""Sweep throughput: runs per minute and peak memory per worker, for 1 and 2 local workers and for Ray (issue 22).

    .venv/bin/python -m bench.sweep [--file sweeps/bench.yaml] [--configs local:1,local:2,ray:2]
                                    [--out bench/results/sweep.json]
    .venv/bin/python -m bench.sweep --report DIR [DIR ...]      # the same table for sweeps already run (their
                                                                # rows.jsonl), e.g. by `declab sweep`

Each config runs the whole sweep file into a fresh folder (runs not kept in the run library: --no-store's
behaviour) and reports: wall time of the sweep (driver start to summary written: worker start-up and model loads
included), runs per minute = runs / wall time, the scaling ratio against the first config (wall time of the first
/ wall time of this one), and per worker (process id, as recorded in each row) its peak resident memory
(ru_maxrss: model, torch, the strategies). Torch threads are split between the workers (total // workers).

Timings depend on what else the machine runs: on a shared machine run one config per locked job
(`flock /tmp/declab-heavy.lock .venv/bin/python -m bench.sweep --configs local:1`) and compare configs measured
under the same conditions only.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from declab.sweep.driver import read_rows, run_sweep, sweep_info
from declab.sweep.spec import load_sweep

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_FILE = Path(__file__).resolve().parent.parent / "sweeps" / "bench.yaml"


def report(out: Path, wall_s: float | None = None, label: str = "") -> dict:
    rows = read_rows(out / "rows.jsonl")
    workers: dict[int, float] = {}
    for r in rows:
        w = r.get("worker") or {}
        if "pid" in w:
            workers[w["pid"]] = max(workers.get(w["pid"], 0.0), float(w.get("peak_rss_mb") or 0.0))
    busy = sum(float(r.get("wall_s") or 0.0) for r in rows)
    out_row = {"config": label or out.name, "runs": len(rows), "failed": sum(r.get("status") == "failed" for r in rows),
               "workers": len(workers), "peak_rss_mb_per_worker": sorted(workers.values()),
               "sum_run_wall_s": round(busy, 2)}
    if wall_s:
        out_row.update(wall_s=round(wall_s, 2), runs_per_min=round(60.0 * len(rows) / wall_s, 2))
    return out_row


def print_table(rows: list[dict]) -> None:
    print(f"{'config':>10} {'runs':>5} {'wall s':>8} {'runs/min':>9} {'scaling':>8}  peak MB per worker")
    base = rows[0].get("wall_s") if rows else None
    for r in rows:
        scale = f"{base / r['wall_s']:.2f}" if base and r.get("wall_s") else "-"
        r["scaling_vs_first"] = None if scale == "-" else float(scale)
        print(f"{r['config']:>10} {r['runs']:>5} {r.get('wall_s', '-'):>8} {r.get('runs_per_min', '-'):>9} "
              f"{scale:>8}  {', '.join(f'{m:.0f}' for m in r['peak_rss_mb_per_worker'])}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--file", default=str(DEFAULT_FILE))
    ap.add_argument("--configs", default="local:1,local:2,ray:2", help="backend:workers, comma-separated")
    ap.add_argument("--out", default=str(RESULTS / "sweep.json"))
    ap.add_argument("--report", nargs="+", default=None, metavar="DIR",
                    help="report sweeps already run (wall time from sweep.json's creation to the summary's write)")
    args = ap.parse_args(argv)
    rows = []
    if args.report:
        for d in map(Path, args.report):
            created = time.mktime(time.strptime(sweep_info(d)["created"], "%Y-%m-%dT%H:%M:%S"))
            rows.append(report(d, (d / "summary.parquet").stat().st_mtime - created, d.name))
    else:
        sweep = load_sweep(args.file)
        for config in args.configs.split(","):
            backend, _, n = config.partition(":")
            with tempfile.TemporaryDirectory(prefix="declab-bench-sweep-") as tmp:
                t0 = time.perf_counter()
                res = run_sweep(sweep, Path(tmp) / "out", backend=backend, workers=int(n or 1), store_path="")
                wall = time.perf_counter() - t0
                rows.append(report(res.out, wall, config))
                print(f"{config}: {res.total} runs in {wall:.1f} s", flush=True)
    print_table(rows)
    result = {"file": args.file if not args.report else None, "torch_threads": torch.get_num_threads(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
