"""Mirostat against the boredom and confusion traps, on the embedded model (Basu et al. 2021; docs/strategies.md#mirostat).

Same prompt and seed for every configuration: mirostat v1 and v2 at tau = 3 and 5 bits, and plain sampling with a
small and a large top-k and top-p. For each run: the mean observed surprise -log2 p under the FULL model distribution
over the generated tokens after a warm-up (the issue's measure: mirostat should sit within 10% of tau), the drift
(mean surprise of the last quarter minus the first quarter of the measured window), the share of tokens closing a
repeated 3-gram, the median selection time per token, and for mirostat the share of measured steps where its
truncation cut less than 0.1% of the mass (saturated: tau at or above what sampling everything gives here). Writes bench/results/mirostat.json and the figure
bench/results/mirostat_traps.html (viz.mirostat.traps_figure: rolling surprise and repetition per run, tau lines);
the traces go to bench/results/mirostat_traces/*.parquet, and --replot redraws the figure from them without the model.

    .venv/bin/python -m bench.mirostat [--tokens 256] [--warmup 32] [--seed 0] [--prompt TEXT] [--quick] [--replot]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import pandas as pd

from declab.run import Run, RunRequest, get_lm, versions
from viz.mirostat import repeated_ngram_share, traps_figure

MODEL = "smollm2-135m-instruct"
PROMPT = "Forum thread: What is the strangest thing you have ever found in a used book?\n\nReply #1:"   # as the test
RESULTS = Path(__file__).resolve().parent / "results"
TRACES = RESULTS / "mirostat_traces"

CONFIGS = [  # (label, strategy, params)
    ("mirostat v1 τ=3", "mirostat", {"version": 1, "tau": 3.0}),
    ("mirostat v1 τ=5", "mirostat", {"version": 1, "tau": 5.0}),
    ("mirostat v2 τ=3", "mirostat", {"version": 2, "tau": 3.0}),
    ("mirostat v2 τ=5", "mirostat", {"version": 2, "tau": 5.0}),
    ("top-k k=3", "sample", {"top_k": 3}),
    ("top-k k=2000", "sample", {"top_k": 2000}),
    ("top-p p=0.5", "sample", {"top_p": 0.5}),
    ("top-p p=1.0 (pure sampling)", "sample", {"top_p": 1.0}),
]


def measure(frame, warmup: int) -> dict:
    tokens = frame[frame["kind"] == "token"]
    s = -tokens["logprob"].to_numpy(dtype=float) / math.log(2)
    window = s[warmup:]
    q = max(1, len(window) // 4)
    rep = repeated_ngram_share(tokens["token_id"].tolist(), 3)
    out = {"tokens": int(len(s)), "measured_tokens": int(len(window)),
           "mean_surprise_bits": round(float(window.mean()), 4) if len(window) else None,
           "drift_bits": round(float(window[-q:].mean() - window[:q].mean()), 4) if len(window) >= 4 else None,
           "repeated_3gram_share": round(float(rep[-1]), 4) if len(rep) else None,
           "median_sel_ms": round(float(tokens["sel_ms"].median()), 3),
           "median_fwd_ms": round(float(tokens["fwd_ms"].median()), 3)}
    if "mu" in tokens:
        out["mu_start"] = round(float(tokens["mu"].iloc[min(warmup, len(tokens) - 1)]), 3)
        out["mu_end"] = round(float(tokens["mu_after"].iloc[-1]), 3)
        out["median_k"] = float(tokens["k"].median())
        cut = tokens["cut_mass"].to_numpy(dtype=float)[warmup:]
        out["saturated_share"] = round(float((cut < 1e-3).mean()), 4) if len(cut) else None   # nothing cut
    return out


def trace_path(label: str) -> Path:
    return TRACES / (re.sub(r"[^a-z0-9.]+", "_", label.lower()).strip("_") + ".parquet")


def write_figure(frames: dict, configs) -> None:
    fig = traps_figure(frames, tau=sorted({p["tau"] for _, s, p in configs if s == "mirostat"}), window=32)
    (RESULTS / "mirostat_traps.html").write_text(fig.to_html(include_plotlyjs=True, config={"displaylogo": False}))
    print(f"wrote {RESULTS / 'mirostat_traps.html'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=256, help="measured tokens after the warm-up")
    ap.add_argument("--warmup", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--quick", action="store_true", help="mirostat configurations only")
    ap.add_argument("--replot", action="store_true", help="redraw the figure from the saved traces, no model")
    args = ap.parse_args(argv)
    configs = [c for c in CONFIGS if c[1] == "mirostat"] if args.quick else CONFIGS
    if args.replot:
        frames = {label: pd.read_parquet(trace_path(label)) for label, _, _ in configs if trace_path(label).exists()}
        write_figure(frames, configs)
        return 0
    lm = get_lm(MODEL)
    rows, frames = [], {}
    for label, strategy, params in configs:
        t0 = time.perf_counter()
        res = Run(lm, RunRequest(model=MODEL, strategy=strategy, prompt=args.prompt, prompt_format="raw",
                                 params=params, max_new_tokens=args.warmup + args.tokens, seed=args.seed)).run_to_end()
        row = {"label": label, "strategy": strategy, "params": params, **measure(res.frame, args.warmup),
               "wall_s": round(time.perf_counter() - t0, 2), "text": res.sequences[0].text}
        if strategy == "mirostat":
            tau = params["tau"]
            row["within_10pct_of_tau"] = abs(row["mean_surprise_bits"] - tau) <= 0.1 * tau
        rows.append(row)
        frames[label] = res.frame
        print(f"{label:30s} mean S {row['mean_surprise_bits']:6.3f} bits  drift {row['drift_bits']:+6.3f}  "
              f"repeated 3-grams {row['repeated_3gram_share']:5.2f}  tokens {row['tokens']:4d}  "
              f"sel {row['median_sel_ms']:6.2f} ms  fwd {row['median_fwd_ms']:6.1f} ms"
              + (f"  mu {row['mu_start']:.1f} -> {row['mu_end']:.1f}  saturated {row['saturated_share']:.2f}"
                 if "mu_end" in row else ""), flush=True)
    TRACES.mkdir(parents=True, exist_ok=True)
    for label, _, _ in configs:
        frames[label].to_parquet(trace_path(label), index=False)
    result = {"model": MODEL, "prompt": args.prompt, "prompt_format": "raw", "seed": args.seed, "warmup": args.warmup,
              "measured_tokens": args.tokens, "runs": rows, "versions": versions()}
    (RESULTS / "mirostat.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    write_figure(frames, configs)
    print(f"wrote {RESULTS / 'mirostat.json'} and the traces under {TRACES}")
    ok = all(r.get("within_10pct_of_tau", True) for r in rows)
    print("mirostat mean surprise within 10% of tau for every (version, tau):", "yes" if ok else "NO")
    return 0


if __name__ == "__main__":
    sys.exit(main())
