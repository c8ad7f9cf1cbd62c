"""Beam and diverse beam search against greedy on the embedded model: time per decoding step, interleaved runs,
median of repetitions, reported as ratios to greedy measured in the same run.

    .venv/bin/python -m bench.beam [--tokens 32] [--reps 3]

A step is one batched forward over all beams plus the per-group selection and the full trace (every candidate).
Per run: wall time / steps executed (the prefill of B prompt rows is included, as in a real run), the same with
process CPU time (less sensitive to other processes on a shared machine; torch's threads are summed), the fastest
traced step (forward + selection, minimum over steps and repetitions: the least disturbed sample on a busy machine),
and the medians of the forward (`fwd_ms`) and selection (`sel_ms`) parts from the trace. Writes bench/results/beam.json with the
1-minute load average, so a run on a busy machine is recognisable.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from declab.run import Run, RunRequest, get_lm, versions

MODEL = "smollm2-135m-instruct"
PROMPT = "Once upon a time, in a small village,"
RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = [("greedy", "greedy", {}),
           ("beam 4", "beam", {"num_beams": 4}),
           ("diverse 4 (G=2)", "diverse_beam", {"num_beams": 4, "num_beam_groups": 2, "diversity_penalty": 0.5}),
           ("beam 8", "beam", {"num_beams": 8}),
           ("diverse 8 (G=4)", "diverse_beam", {"num_beams": 8, "num_beam_groups": 4, "diversity_penalty": 0.5})]


def one(lm, strategy: str, params: dict, tokens: int) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    res = Run(lm, RunRequest(model=MODEL, strategy=strategy, prompt=PROMPT, prompt_format="raw", params=params,
                             max_new_tokens=tokens)).run_to_end()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rows = res.frame[res.frame.kind == "token"]
    steps = int(rows.step.max()) + 1
    per_step = rows.groupby("step")[["fwd_ms", "sel_ms"]].sum().iloc[1:]          # after the prefill step
    traced = per_step.fwd_ms + per_step.sel_ms
    return {"step_ms": 1000 * wall / steps, "cpu_step_ms": 1000 * cpu / steps, "min_step_ms": float(traced.min()),
            "steps": steps, "fwd_ms": float(per_step.fwd_ms.median()), "sel_ms": float(per_step.sel_ms.median()),
            "min_sel_ms": float(per_step.sel_ms.min()), "rows_per_step": len(res.frame) / steps}


def forward_floor(lm, reps: int, rows=(1, 4, 8)) -> dict:
    """One decode forward of B rows at a fixed cache length (prompt + 16), interleaved over B, `reps` times each
    (the cache is cropped back after every call): min and median ms per B. On a busy machine the min is the
    least disturbed sample; add the selection cost (min_sel_ms) for a floor of the step time."""
    ids = lm.encode_prompt(PROMPT, "raw")
    caches = {}
    for b in rows:
        out = lm.prefill([ids] * b)
        for _ in range(16):
            out = lm.step(out.logits.argmax(-1, keepdim=True), out.cache)
        caches[b] = (out.cache, out.logits.argmax(-1, keepdim=True), out.cache.get_seq_length())
    times = {b: [] for b in rows}
    for _ in range(reps):
        for b in rows:
            cache, tok, length = caches[b]
            times[b].append(lm.step(tok, cache).fwd_ms)
            lm.crop(cache, length)
    return {b: {"min_ms": round(min(t), 3), "median_ms": round(statistics.median(t), 3)} for b, t in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--forward-reps", type=int, default=40)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    lm = get_lm(MODEL)
    for _, strategy, params in CONFIGS:                     # warm-up
        one(lm, strategy, params, 4)
    samples: dict[str, list[dict]] = {label: [] for label, _, _ in CONFIGS}
    for _ in range(args.reps):                              # interleaved
        for label, strategy, params in CONFIGS:
            samples[label].append(one(lm, strategy, params, args.tokens))
    table = {}
    for label, runs in samples.items():
        table[label] = {k: round((min if k.startswith("min_") else statistics.median)(r[k] for r in runs), 3)
                        for k in runs[0]}
    base, cpu_base = table["greedy"]["step_ms"], table["greedy"]["cpu_step_ms"]
    for label, row in table.items():
        row["vs_greedy"] = round(row["step_ms"] / base, 3)
        row["cpu_vs_greedy"] = round(row["cpu_step_ms"] / cpu_base, 3)
        row["min_vs_greedy"] = round(row["min_step_ms"] / table["greedy"]["min_step_ms"], 3)
    print(f"{'config':18} {'ms/step':>9} {'x greedy':>9} {'cpu ms/step':>12} {'x greedy':>9} {'min ms':>8} "
          f"{'x greedy':>9} {'fwd ms':>8} {'sel ms':>8} {'min sel':>8} {'steps':>6} {'rows/step':>10}")
    for label, row in table.items():
        print(f"{label:18} {row['step_ms']:9.1f} {row['vs_greedy']:9.2f} {row['cpu_step_ms']:12.1f} "
              f"{row['cpu_vs_greedy']:9.2f} {row['min_step_ms']:8.1f} {row['min_vs_greedy']:9.2f} {row['fwd_ms']:8.1f} "
              f"{row['sel_ms']:8.2f} {row['min_sel_ms']:8.2f} {row['steps']:6.0f} {row['rows_per_step']:10.1f}")
    floor = forward_floor(lm, args.forward_reps)
    print("\none decode forward of B rows (ms), interleaved, min / median of", args.forward_reps)
    for b, t in floor.items():
        sel = {1: table["greedy"]["min_sel_ms"], 4: table["beam 4"]["min_sel_ms"], 8: table["beam 8"]["min_sel_ms"]}[b]
        est = (t["min_ms"] + sel) / (floor[1]["min_ms"] + table["greedy"]["min_sel_ms"])
        t["floor_step_vs_greedy"] = round(est, 3)
        print(f"B={b:<3} {t['min_ms']:8.1f} / {t['median_ms']:8.1f}   floor step (min fwd + min sel) vs greedy: "
              f"{est:.2f}x")
    RESULTS.mkdir(exist_ok=True)
    out = {"model": MODEL, "prompt": PROMPT, "tokens": args.tokens, "reps": args.reps, "threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count(), "loadavg_1m": os.getloadavg()[0], "versions": versions(), "table": table,
           "forward_floor": floor}
    (RESULTS / "beam.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
