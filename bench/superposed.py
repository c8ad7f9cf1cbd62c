"""Superposed decoding's headline on the embedded model: k=3 drafts of N tokens from one pass, against one greedy
run of N tokens and against three separate nucleus-sampling runs of N tokens; perplexity of every draft under the
model beside nucleus sampling's (and greedy's).

    .venv/bin/python -m bench.superposed [--tokens 64] [--reps 3] [--prompt TEXT]

Timing: wall time of whole runs through the normal engine (full trace), interleaved (greedy, superposed, superposed
without n-grams, nucleus x3 in turn within every repetition), medians over repetitions. The n-gram model (default
corpus) is built/loaded in a warm-up run, outside the timing. Superposed runs use early_stop=false so every run
decodes exactly N steps; a nucleus run that ends at EOS is scaled to N tokens (time per token x N), so the
"three nucleus runs" figure always means 3 x N tokens.
Targets (issue): superposed <= 1.3x one greedy run; three nucleus runs >= 2.4x the superposed run.
Perplexity: exp(mean NLL) of each generated continuation, teacher-forced through the model after the prompt (one
forward per text, not timed). Writes bench/results/superposed.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from declab.run import Run, RunRequest, get_lm, versions

MODEL = "smollm2-135m-instruct"
PROMPT = "The most important thing to know about lists in Python is that"
RESULTS = Path(__file__).resolve().parent / "results"
K = 3
NUCLEUS = {"top_p": 0.9, "temperature": 1.0}


def one(lm, strategy: str, params: dict, tokens: int, prompt: str, seed: int = 0):
    t0 = time.perf_counter()
    res = Run(lm, RunRequest(model=MODEL, strategy=strategy, prompt=prompt, prompt_format="raw", params=params,
                             max_new_tokens=tokens, seed=seed)).run_to_end()
    wall = time.perf_counter() - t0
    if res.status != "ok":
        raise RuntimeError(f"{strategy}: {res.status} {res.error}")
    print(f"    {strategy} {params} seed {seed}: {len(res.sequences[0].token_ids)} tokens in {wall:.1f} s, "
          f"median step {median_step_ms(res):.1f} ms", file=sys.stderr, flush=True)
    return wall, res


def median_step_ms(res) -> float:
    """Median over steps of forward + selection time (the trace's dt_ms of each step's first token row): less
    sensitive than whole-run wall time to load swings on a shared machine."""
    tokens = res.frame[res.frame.kind == "token"]
    return float(tokens.groupby("step").dt_ms.first().iloc[1:].median())


def perplexity(lm, prompt_ids: list[int], gen: list[int]) -> float:
    if not gen:
        return float("nan")
    out = lm.prefill(prompt_ids + gen, all_logits=True)
    logp = torch.log_softmax(out.logits[0, len(prompt_ids) - 1:-1].float(), -1)
    nll = -logp.gather(-1, torch.tensor(gen, device=logp.device)[:, None]).mean()
    return float(torch.exp(nll))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--skip-alpha0", action="store_true", help="leave out the alpha=0 (no n-gram) variant")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    lm = get_lm(MODEL)
    N = args.tokens
    spd = {"num_drafts": K, "early_stop": False}
    spd0 = dict(spd, alpha=0.0)
    t0 = time.perf_counter()
    one(lm, "superposed", spd, 2, args.prompt)                      # builds / loads the n-grams
    ngram_setup_s = time.perf_counter() - t0
    one(lm, "greedy", {}, 2, args.prompt)
    one(lm, "sample", NUCLEUS, 2, args.prompt)

    walls: dict[str, list[float]] = {"greedy": [], "superposed": [], "superposed_alpha0": [], "nucleus_x3": []}
    step_ms: dict[str, list[float]] = {"greedy": [], "superposed": [], "superposed_alpha0": [], "nucleus": []}
    kept: dict[str, object] = {}
    nucleus_texts: list[list[int]] = []
    for rep in range(args.reps):                                      # interleaved
        w, res = one(lm, "greedy", {}, N, args.prompt)
        walls["greedy"].append(w)
        step_ms["greedy"].append(median_step_ms(res))
        kept["greedy"] = res
        w, res = one(lm, "superposed", spd, N, args.prompt)
        walls["superposed"].append(w)
        step_ms["superposed"].append(median_step_ms(res))
        kept["superposed"] = res
        if not args.skip_alpha0:
            w, res = one(lm, "superposed", spd0, N, args.prompt)
            walls["superposed_alpha0"].append(w)
            step_ms["superposed_alpha0"].append(median_step_ms(res))
            kept["superposed_alpha0"] = res
        total = 0.0
        for i in range(K):
            w, res = one(lm, "sample", NUCLEUS, N, args.prompt, seed=1000 * rep + i)
            n = max(1, len(res.sequences[0].token_ids))
            total += w * N / n
            step_ms["nucleus"].append(median_step_ms(res))
            nucleus_texts.append(res.sequences[0].token_ids)
        walls["nucleus_x3"].append(total)
    med = {k: statistics.median(v) if v else float("nan") for k, v in walls.items()}

    prompt_ids = lm.encode_prompt(args.prompt, "raw")
    ppl = {
        "greedy": [perplexity(lm, prompt_ids, kept["greedy"].sequences[0].token_ids)],
        "superposed": [perplexity(lm, prompt_ids, s.token_ids) for s in kept["superposed"].sequences],
        "superposed_alpha0": [perplexity(lm, prompt_ids, s.token_ids) for s in kept["superposed_alpha0"].sequences]
        if "superposed_alpha0" in kept else [float("nan")],
        "nucleus": [perplexity(lm, prompt_ids, ids) for ids in nucleus_texts],
    }
    table = {
        "greedy_s": med["greedy"], "superposed_s": med["superposed"], "superposed_alpha0_s": med["superposed_alpha0"],
        "nucleus_x3_s": med["nucleus_x3"],
        "superposed_vs_greedy": med["superposed"] / med["greedy"],
        "superposed_alpha0_vs_greedy": med["superposed_alpha0"] / med["greedy"],
        "nucleus_x3_vs_superposed": med["nucleus_x3"] / med["superposed"],
        "nucleus_x3_vs_superposed_alpha0": med["nucleus_x3"] / med["superposed_alpha0"],
    }
    print(f"{N} tokens, {args.reps} interleaved reps (median wall s), k={K}, prompt {args.prompt!r}")
    for key in ("greedy_s", "superposed_s", "superposed_alpha0_s", "nucleus_x3_s"):
        print(f"  {key:28} {table[key]:8.2f}")
    print(f"  superposed / greedy          {table['superposed_vs_greedy']:8.3f}   (target <= 1.3)")
    print(f"  superposed(a=0) / greedy     {table['superposed_alpha0_vs_greedy']:8.3f}")
    print(f"  3 nucleus / superposed       {table['nucleus_x3_vs_superposed']:8.3f}   (target >= 2.4)")
    print(f"  3 nucleus / superposed(a=0)  {table['nucleus_x3_vs_superposed_alpha0']:8.3f}")
    steps = {k: statistics.median(v) if v else float("nan") for k, v in step_ms.items()}
    table["step_ms"] = steps
    table["step_superposed_vs_greedy"] = steps["superposed"] / steps["greedy"]
    print(f"  median step ms: greedy {steps['greedy']:.1f}, superposed {steps['superposed']:.1f} "
          f"({table['step_superposed_vs_greedy']:.3f}x), superposed(a=0) {steps['superposed_alpha0']:.1f}, "
          f"nucleus {steps['nucleus']:.1f}")
    print("perplexity under the model (exp mean NLL of the continuation):")
    for key, vals in ppl.items():
        show = ", ".join(f"{v:.2f}" for v in vals)
        print(f"  {key:18} median {statistics.median(vals):7.2f}   [{show}]")
    res = kept["superposed"]
    fb = res.meta["metrics"].get("fallback_steps")
    print(f"superposed drafts (fallback steps: {fb} of {N}):")
    for i, s in enumerate(res.sequences):
        print(f"  [{i}] ppl(pseudo) {s.extra['ppl']:.2f}  {s.text[:100]!r}")
    RESULTS.mkdir(exist_ok=True)
    out = {"model": MODEL, "prompt": args.prompt, "tokens": N, "reps": args.reps, "k": K, "nucleus": NUCLEUS,
           "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "loadavg_1m": os.getloadavg()[0],
           "ngram_setup_s": ngram_setup_s, "walls": walls, "table": table, "perplexity": ppl,
           "superposed_metrics": {k: v for k, v in res.meta["metrics"].items() if isinstance(v, (int, float, str))},
           "drafts": [s.text for s in res.sequences], "versions": versions()}
    (RESULTS / "superposed.json").write_text(json.dumps(out, indent=2, default=lambda x: None if isinstance(
        x, float) and math.isnan(x) else str(x)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
