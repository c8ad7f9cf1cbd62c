"""Speculative decoding that pays on a CPU (issue 21): greedy `speculative` / `spec_tree` against target-only greedy.

Two prompt sets, chat format, the embedded model, greedy (temperature 0), so every speculative run must give exactly
the target-only greedy tokens (a mismatch is printed and makes the exit status 1):

* input-grounded: bench/prompts/input_grounded.jsonl, 16 prompts that quote, repeat, rename in, edit, correct or
  reformat a given text or code (the answer reuses the input, where prompt lookup copies whole spans);
* open chat: the sweeps' `chat` questions (declab/sweep/prompts.py), where there is little to copy.

Per prompt and configuration, interleaved repetitions (every repetition runs target-only greedy and every
configuration once, in the same order), the median over repetitions of the run's wall time, and of the prompt's
prefill alone (`lm.prefill`, timed in the same repetition). Reported per configuration, medians over prompts:

* speedup: target-only wall / speculative wall, prefill included in both (what a user waits for the answer);
* decode speedup: the same with the prefill taken out of both (the decoding only: how much faster tokens come);
* tokens/round (TreeMetrics / SpeculativeMetrics mean_accepted_length) and same = identical outputs / prompts;
* draft cost: drafting ms per round over target-only greedy ms per token (the drafter's cost in target steps).

Every run uses the lab's own loop with full tracing; `measure_speedup` is off (the baseline is timed here).

    .venv/bin/python -m bench.speculative_cpu [--tokens 128] [--reps 2] [--sets grounded,open] [--prompts N]
                                              [--configs LABEL,...] [--threads N]

Prints a table and writes bench/results/speculative_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from declab.run import Run, RunRequest, get_lm, versions
from declab.sweep.prompts import CHAT

MODEL = "smollm2-135m-instruct"
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
GROUNDED_FILE = HERE / "prompts" / "input_grounded.jsonl"

# label -> (strategy, params). The recommended settings (the app's advice) are the `pl` rows on grounded prompts.
CONFIGS = {
    "prompt_lookup g4": ("speculative", {"draft": "prompt_lookup"}),
    "prompt_lookup g16": ("speculative", {"draft": "prompt_lookup", "num_draft_tokens": 16}),
    "prompt_lookup g24": ("speculative", {"draft": "prompt_lookup", "num_draft_tokens": 24}),
    "tree prompt_lookup b24 d20": ("spec_tree", {"drafter": "prompt_lookup", "tree_budget": 24, "branching": 2,
                                                 "tree_depth": 20}),
    "tree prompt_lookup b32 d24": ("spec_tree", {"drafter": "prompt_lookup", "tree_budget": 32, "branching": 2,
                                                 "tree_depth": 24}),
    "ngram g8": ("speculative", {"draft": "ngram", "num_draft_tokens": 8}),
    "model draft g4": ("speculative", {"draft": "model"}),
    "tree recycling b8": ("spec_tree", {"drafter": "token_recycling", "tree_budget": 8, "branching": 2,
                                        "tree_depth": 4}),
    "tree model b8": ("spec_tree", {"drafter": "model", "tree_budget": 8, "branching": 2, "tree_depth": 4}),
    # trained heads (issue 18): chains (branching 1) and trees
    "medusa chain d4": ("spec_tree", {"drafter": "medusa", "tree_budget": 4, "branching": 1, "tree_depth": 4}),
    "medusa tree b8": ("spec_tree", {"drafter": "medusa", "tree_budget": 8, "branching": 3, "tree_depth": 4}),
    "hydra chain d4": ("spec_tree", {"drafter": "hydra", "tree_budget": 4, "branching": 1, "tree_depth": 4}),
    "hydra tree b8": ("spec_tree", {"drafter": "hydra", "tree_budget": 8, "branching": 3, "tree_depth": 4}),
    "eagle chain d4": ("spec_tree", {"drafter": "eagle", "tree_budget": 4, "branching": 1, "tree_depth": 4}),
    "eagle tree b8": ("spec_tree", {"drafter": "eagle", "tree_budget": 8, "branching": 3, "tree_depth": 4}),
    "kangaroo chain d6": ("spec_tree", {"drafter": "kangaroo", "tree_budget": 6, "branching": 1, "tree_depth": 6}),
}
HEAD_CONFIGS = tuple(k for k in CONFIGS if k.split()[0] in ("medusa", "hydra", "eagle", "kangaroo"))
SET_CONFIGS = {                         # what runs on which set by default (--configs overrides)
    "grounded": ("prompt_lookup g4", "prompt_lookup g16", "prompt_lookup g24"),
    "open": ("prompt_lookup g4", "ngram g8", "model draft g4", "tree recycling b8", "tree model b8") + HEAD_CONFIGS,
}
TARGETS = {"grounded": ("prompt_lookup g16", 4.5), "open": (None, 1.2)}   # set -> (row held to it, or the best)


def grounded_prompts() -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in GROUNDED_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(r["name"], r["prompt"]) for r in rows]


def open_prompts() -> list[tuple[str, str]]:
    return [(f"chat-{i}", t) for i, t in enumerate(CHAT)]


SETS = {"grounded": grounded_prompts, "open": open_prompts}


def timed_run(lm, strategy: str, prompt: str, tokens: int, params: dict, prompt_format: str = "chat"):
    req = RunRequest(model=lm.key, strategy=strategy, prompt=prompt, prompt_format=prompt_format,
                     params=dict(params, measure_speedup=False) if strategy != "greedy" else {},
                     max_new_tokens=tokens, seed=0)
    run = Run(lm, req)
    t0 = time.perf_counter()
    res = run.run_to_end()
    wall = time.perf_counter() - t0
    if res.status != "ok":
        raise SystemExit(f"bench.speculative_cpu: {strategy} {params} failed: {res.error}")
    return wall, res


def draft_ms_per_round(res, strategy: str) -> float:
    """Drafting ms per round: spec_tree's per-round `draft_ms` (on each round's last token row), speculative's
    per-token `draft_ms` (propose rows), summed over the run, over its rounds."""
    f = res.frame
    rows = f[f["kind"] == ("token" if strategy == "spec_tree" else "propose")]
    total = float(rows["draft_ms"].fillna(0).sum()) if "draft_ms" in rows.columns else 0.0
    return total / max(res.meta["metrics"].get("rounds") or 1, 1)


def prefill_s(lm, prompt: str, prompt_format: str = "chat") -> float:
    ids = lm.encode_prompt(prompt, prompt_format)
    t0 = time.perf_counter()
    lm.prefill(ids)
    return time.perf_counter() - t0


def measure(lm, sets: dict, configs: dict, tokens: int, reps: int, prompt_format: str = "chat"
            ) -> tuple[list[dict], list[str]]:
    """Per (set, config): the medians described in the module docstring, and the mismatches found. `configs`:
    set -> {label: (strategy, params)}."""
    samples: dict = {}
    mismatches = []
    for name, fn in sets.items():
        for pname, text in fn():
            timed_run(lm, "greedy", text, 4, {}, prompt_format)   # warm-up of this prompt's shapes, untimed
            for _ in range(reps):
                pre = prefill_s(lm, text, prompt_format)
                g_wall, g = timed_run(lm, "greedy", text, tokens, {}, prompt_format)
                ref = g.sequences[0].token_ids
                for label, (strategy, params) in configs[name].items():
                    wall, res = timed_run(lm, strategy, text, tokens, params, prompt_format)
                    got = res.sequences[0].token_ids
                    if got != ref:
                        mismatches.append(f"{name}/{pname} {label}: output differs from target-only greedy")
                    s = samples.setdefault((name, label, pname), {"wall": [], "g": [], "pre": [], "tpr": [],
                                                                   "draft": [], "same": True, "n": len(ref)})
                    s["draft"].append(draft_ms_per_round(res, strategy))
                    s["wall"].append(wall)
                    s["g"].append(g_wall)
                    s["pre"].append(pre)
                    s["tpr"].append(res.meta["metrics"].get("mean_accepted_length") or 0.0)
                    s["same"] &= got == ref
    rows = []
    for name in sets:
        for label in configs[name]:
            per = [v for (n, lab, _p), v in samples.items() if n == name and lab == label]
            if not per:
                continue
            med = statistics.median
            speed = [med(v["g"]) / med(v["wall"]) for v in per]
            decode = [(med(v["g"]) - med(v["pre"])) / max(med(v["wall"]) - med(v["pre"]), 1e-3) for v in per]
            strategy, params = configs[name][label]
            rows.append({"set": name, "config": label, "strategy": strategy, "params": params,
                         "speedup": round(med(speed), 3), "decode_speedup": round(med(decode), 3),
                         "tokens_per_round": round(med(med(v["tpr"]) for v in per), 3),
                         "same": f"{sum(v['same'] for v in per)}/{len(per)}", "prompts": len(per),
                         "greedy_ms_per_token": round(med(1000 * med(v["g"]) / max(v["n"], 1) for v in per), 2),
                         "draft_cost": round(med(med(v["draft"]) / max(1000 * med(v["g"]) / max(v["n"], 1), 1e-3)
                                                 for v in per), 3),
                         "per_prompt_speedup": [round(x, 3) for x in speed]})
    return rows, mismatches


def target_lines(rows: list[dict]) -> list[str]:
    """The issue's targets: grounded median >= 4.5x (the recommended prompt-lookup row), open chat >= 1.2x (best)."""
    out = []
    for name, (label, goal) in TARGETS.items():
        cands = [r for r in rows if r["set"] == name and (label is None or r["config"] == label)]
        if not cands:
            continue
        best = max(cands, key=lambda r: r["speedup"])
        out.append(f"target: {name} {best['config']} speedup {best['speedup']:.2f}x (decode only "
                   f"{best['decode_speedup']:.2f}x) (>= {goal})")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.speculative_cpu", description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--sets", default="grounded,open")
    ap.add_argument("--prompts", type=int, default=None, help="at most this many prompts per set")
    ap.add_argument("--configs", default=None, help=f"comma-separated labels for every set (default: each set's own "
                                                    f"list; all: {', '.join(CONFIGS)})")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sets, configs = {}, {}
    for name in args.sets.split(","):
        prompts = SETS[name]()[: args.prompts]
        sets[name] = (lambda p=prompts: p)
        labels = args.configs.split(",") if args.configs else SET_CONFIGS[name]
        configs[name] = {k: CONFIGS[k] for k in labels}
    lm = get_lm(MODEL)
    t0 = time.perf_counter()
    rows, mismatches = measure(lm, sets, configs, args.tokens, args.reps)
    result = {"model": MODEL, "kernels": lm.spec.kernels, "threads": torch.get_num_threads(), "tokens": args.tokens,
              "reps": args.reps, "rows": rows, "mismatches": mismatches, "versions": versions(),
              "wall_s": round(time.perf_counter() - t0, 1)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "speculative_cpu.json").write_text(json.dumps(result, indent=2))
    print(f"{MODEL} on cpu, {torch.get_num_threads()} threads, {args.tokens} new tokens, chat, greedy; median over "
          f"prompts of the median of {args.reps} interleaved repetitions")
    print(f"{'set':9s} {'config':20s} {'speedup':>8s} {'decode':>7s} {'tok/round':>9s} {'draft':>6s} {'same':>6s}")
    for r in rows:
        print(f"{r['set']:9s} {r['config']:20s} {r['speedup']:8.2f} {r['decode_speedup']:7.2f} "
              f"{r['tokens_per_round']:9.2f} {r['draft_cost']:6.2f} {r['same']:>6s}")
    for line in target_lines(rows):
        print(line)
    for m in mismatches:
        print("MISMATCH:", m)
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
