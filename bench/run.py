"""Engine benchmark on the embedded model: load times, and our greedy / sample loops against transformers'
`generate` on the same model, prompt and number of tokens, interleaved, median of several repetitions.

    .venv/bin/python -m bench.run [--tokens 128] [--reps 5] [--no-cold]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from declab.runner import Run, RunRequest, get_lm, versions

MODEL = "smollm2-135m-instruct"
PROMPT = "The history of the printing press begins"
RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def load_times() -> dict:
    """Cold: a fresh cache (GGUF de-quantized and converted); warm: the converted safetensors. In a subprocess each,
    so nothing is shared with this process; library imports (~2 s) are excluded from both."""
    code = ("import time, transformers; from declab.registry import load_registry; "
            "from declab.loading import load_lm; r=load_registry(); t=time.perf_counter(); load_lm(r.get(r.default)); "
            "print(time.perf_counter()-t)")
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        for label in ("cold", "warm"):
            env = dict(os.environ, DECLAB_CACHE=cache)
            env.pop("DECLAB_MODELS", None)
            proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
            out[f"load_{label}_s"] = round(float(proc.stdout.strip().splitlines()[-1]), 3)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-cold", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    lm = get_lm(MODEL)
    ids = lm.encode_prompt(PROMPT, "raw")

    def ours(strategy, **params):
        req = RunRequest(model=MODEL, strategy=strategy, prompt=PROMPT, prompt_format="raw", params=params,
                         max_new_tokens=args.tokens, seed=0)
        return Run(lm, req).run_to_end()

    n = len(ours("greedy").sequences[0].token_ids)            # warm-up, and the token count both sides produce

    def hf(do_sample=False):
        with torch.inference_mode():
            lm.model.generate(torch.tensor([ids]), do_sample=do_sample, max_new_tokens=n, min_new_tokens=n,
                              pad_token_id=lm.tokenizer.eos_token_id, top_k=0 if do_sample else None)

    rows = {"hf_greedy": [], "ours_greedy": [], "hf_sample": [], "ours_sample": []}
    for _ in range(args.reps):
        rows["hf_greedy"].append(timed(hf))
        rows["ours_greedy"].append(timed(lambda: ours("greedy")))
        rows["hf_sample"].append(timed(lambda: hf(True)))
        rows["ours_sample"].append(timed(lambda: ours("sample", temperature=1.0)))
    med = {k: statistics.median(v) for k, v in rows.items()}
    result = {
        "model": MODEL, "prompt": PROMPT, "new_tokens": n, "reps": args.reps, "threads": torch.get_num_threads(),
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "tokens_per_s": {k: round(n / v, 2) for k, v in med.items()},
        "ratio_ours_greedy_vs_generate": round(med["ours_greedy"] / med["hf_greedy"], 3),
        "ratio_ours_sample_vs_generate_sample": round(med["ours_sample"] / med["hf_sample"], 3),
        "versions": versions(),
    }
    if not args.no_cold:
        result.update(load_times())
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "engine.json").write_text(json.dumps(result, indent=2))
    print(f"{'what':32s} {'median s':>9s} {'tok/s':>8s}")
    for k in rows:
        print(f"{k:32s} {med[k]:9.3f} {n / med[k]:8.1f}")
    print(f"ours greedy / generate greedy: {result['ratio_ours_greedy_vs_generate']:.3f}  (target <= 1.10)")
    print(f"ours sample / generate sample: {result['ratio_ours_sample_vs_generate_sample']:.3f}  (target <= 1.15)")
    for k in ("load_cold_s", "load_warm_s"):
        if k in result:
            print(f"{k}: {result[k]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
