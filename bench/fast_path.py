"""The exact fast CPU path's forward cost (issue 21): the embedded model on oneDNN-packed linears against transformers'
stock kernels, by the number of positions in one forward (1 = a decoding step, 2-16 = a speculative verification).

Both models are loaded in this process (`smollm2-135m-instruct`, kernels auto = packed on CPU, and
`smollm2-135m-instruct-stock`); after a prefill of the bench prompt, each repetition runs one forward of T random
positions on each, interleaved, and crops them off again. Median ms per forward and the ratio packed / stock.

    .venv/bin/python -m bench.fast_path [--reps 12] [--threads N]

Writes bench/results/fast_path.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from declab.run import get_lm, versions

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "The history of the printing press begins"
POSITIONS = (1, 2, 4, 8, 16)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fast_path", description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {"packed": get_lm("smollm2-135m-instruct"), "stock": get_lm("smollm2-135m-instruct-stock")}
    ids = models["stock"].encode_prompt(PROMPT, "raw")
    caches = {name: lm.prefill(ids).cache for name, lm in models.items()}
    gen = torch.Generator().manual_seed(0)
    times: dict = {}
    for t in POSITIONS:
        for _ in range(args.reps):
            new = torch.randint(100, 1000, (1, t), generator=gen).tolist()
            for name, lm in models.items():
                t0 = time.perf_counter()
                lm.step(new, caches[name], all_logits=True)
                times.setdefault((name, t), []).append(1000 * (time.perf_counter() - t0))
                lm.crop(caches[name], len(ids))
    rows = []
    for t in POSITIONS:
        p, s = statistics.median(times[("packed", t)]), statistics.median(times[("stock", t)])
        rows.append({"positions": t, "packed_ms": round(p, 2), "stock_ms": round(s, 2), "ratio": round(p / s, 3)})
    base = rows[0]["packed_ms"]
    result = {"threads": torch.get_num_threads(), "reps": args.reps, "rows": rows, "versions": versions()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fast_path.json").write_text(json.dumps(result, indent=2))
    print(f"forward ms, median of {args.reps} interleaved, {torch.get_num_threads()} threads")
    print(f"{'positions':>9s} {'packed':>8s} {'stock':>8s} {'ratio':>6s} {'packed/1-pos':>12s}")
    for r in rows:
        print(f"{r['positions']:9d} {r['packed_ms']:8.1f} {r['stock_ms']:8.1f} {r['ratio']:6.2f} "
              f"{r['packed_ms'] / base:12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
