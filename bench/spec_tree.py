"""Tree speculative decoding (`spec_tree`) on the embedded model, every drafter as a chain and as trees.

Each drafter runs as a chain and as trees of growing node budgets, on open-ended and on input-grounded chat
prompts, greedy (temperature 0).

Shapes (depth 4 throughout; `--budgets`, `--branching`):

    chain      branching 1, tree_budget 4, tree_depth 4   the model drafter: chain speculative decoding (gamma 4);
                                                           a model-free drafter: its single best branch
    tree b8    branching 2, tree_budget 8, tree_depth 4
    tree b16   branching 3, tree_budget 16, tree_depth 4
    tree b32   branching 4, tree_budget 32, tree_depth 4

The model drafter grows its trees level by level (static expansion), so a budget that runs out before depth 4
leaves the tree shallower (b8 at branching 2: 2 + 4 + 2 nodes, depth 3); `depth` in the table is the mean over
rounds of the deepest drafted node. Model-free drafters fill their trees branch by branch up to depth 4.

Prompt sets: `open` (explain, story, advice...: little to copy from the prompt) and `grounded` (correct, reformat
or rewrite a given text or code: the answer repeats the prompt, where prompt lookup shines).

Per (set, drafter, shape), from the same runs:
* tokens/round: the median over prompts of TreeMetrics.mean_accepted_length (emitted tokens per target forward);
* nodes/round: the median over prompts of TreeMetrics.tree_nodes_mean;
* speedup: TreeMetrics.speedup (`measure_speedup`: target-only decoding of the same length timed right after the
  run, in the same process), median over repetitions, then over prompts;
* bookkeeping: sum over rounds of `bookkeeping_ms` / sum of `round_ms` (the last `token` row of each round): the
  round minus the target's and the draft model's forwards; the issue's budget is <= 10% of a round. Round 0 is
  left out (`bookkeeping_share_all_rounds` in the JSON keeps it): on a tree round the target's prefill (and the
  draft model's) runs outside the timed tree forwards, so it lands in round 0's bookkeeping. For a model-free
  drafter the share includes the drafter's own work (ADED's MCTS, the trie walk...), for the model drafter its
  cache catch-up forward each round, so `ex-draft` gives the share without any drafting (round - target verify
  forward - draft_ms);
* same: runs whose output equals target greedy decoding (the `greedy` strategy on the same prompt) / runs. A
  mismatch is printed loudly and makes the exit status 1.

Repetitions are interleaved (every repetition runs every prompt and configuration once, in the same order); every
run uses the lab's own loop with full tracing.

    .venv/bin/python -m bench.spec_tree [--tokens 64] [--prompts 6] [--drafters model,aded,...] [--budgets 8,16,32]
                                        [--branching N] [--reps 2] [--threads N] [--sets open,grounded]

Prints a table and writes bench/results/spec_tree.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from declab.run import Run, RunRequest, get_lm, versions
from declab.sweep.prompts import CHAT
from strategies.spec_tree import DRAFTERS

TARGET, DRAFT = "smollm2-135m-instruct", "smollm2-135m-draft"
RESULTS = Path(__file__).resolve().parent / "results"
DEPTH = 4
CHAIN_GAMMA = 4
BRANCHING = {8: 2, 16: 3, 32: 4}                 # tree budget -> children per node (other budgets: nearest key)

PROMPTS = {
    "open": list(CHAT[1:7]),          # chat questions (declab/sweep/prompts.py, the sweeps' `chat` set)
    "grounded": [
        "Correct the spelling and grammar in this text and return only the corrected text:\n\n"
        "Yesterday me and my freind goes to the libary to borrow some book about the history of the city. The "
        "librarian were very helpfull and she show us where the old maps was kept.",
        "Reformat this list as a Markdown table with the columns Name, Age and City:\n\n"
        "Alice, 34, Paris\nBob, 27, Berlin\nCarla, 45, Madrid\nDavid, 31, Rome",
        "Rename the variable `x` to `total` in this Python function and return the whole function:\n\n"
        "```python\ndef add_all(numbers):\n    x = 0\n    for n in numbers:\n        x = x + n\n    return x\n```",
        "Rewrite this paragraph in the past tense:\n\n"
        "The train leaves the station at seven. Maria sits by the window and watches the fields go by. She reads "
        "a book and drinks a cup of tea while the sun rises over the hills.",
        "Add type hints to this Python function and return the whole function:\n\n"
        "```python\ndef greet(name, times):\n    message = 'Hello, ' + name + '!'\n"
        "    return ' '.join([message] * times)\n```",
        "Convert this JSON object to YAML:\n\n"
        '{"name": "declab", "version": "0.1", "dependencies": ["torch", "transformers", "pandas"], '
        '"license": "MIT"}',
    ],
}


def branching_for(budget: int, forced: int | None) -> int:
    if forced:
        return forced
    return BRANCHING[min(BRANCHING, key=lambda b: (abs(b - budget), b))]


def shapes(budgets: list[int], forced: int | None) -> list[tuple[str, dict]]:
    """(label, spec_tree params) for the chain and each tree budget."""
    out = [("chain", {"branching": 1, "tree_budget": CHAIN_GAMMA, "tree_depth": CHAIN_GAMMA})]
    for b in budgets:
        out.append((f"tree b{b}", {"branching": branching_for(b, forced), "tree_budget": b, "tree_depth": DEPTH}))
    return out


def run(lm, strategy, prompt, n, params=None, draft=None):
    req = RunRequest(model=lm.key, strategy=strategy, prompt=prompt, prompt_format="chat", params=params or {},
                     max_new_tokens=n, seed=0)
    res = Run(lm, req, models={"draft": draft} if draft is not None else None).run_to_end()
    if res.status != "ok":
        raise SystemExit(f"bench.spec_tree: {strategy} {params} failed: {res.error}")
    return res


def round_figures(frame) -> dict:
    """Per-run sums over rounds from the trace: round / verify / draft / bookkeeping ms, and the mean deepest
    drafted node per round (rounds without drafts count 0)."""
    tok = frame[frame.kind == "token"]
    last = tok[tok["round_ms"].notna()] if "round_ms" in tok else tok.iloc[0:0]
    keys = ("round_ms", "verify_ms", "draft_ms", "bookkeeping_ms")
    sums = {k: float(last[k].sum()) if k in last else 0.0 for k in keys}
    later = last[last["round"] > 0] if len(last) else last               # round 0 holds both prefills
    sums.update({f"{k}_r1": float(later[k].sum()) if len(later) else 0.0 for k in keys})
    prop = frame[frame.kind == "propose"]
    rounds = max(int(tok["round"].nunique()), 1) if "round" in tok else 1
    deepest = float(prop.groupby("round")["depth"].max().sum()) / rounds if len(prop) else 0.0
    return {**sums, "rounds": rounds, "depth_mean": deepest}


def median(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return round(statistics.median(xs), 4) if xs else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.spec_tree", description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per run (default 64)")
    ap.add_argument("--prompts", type=int, default=6, help="prompts per set (default 6, at most 6)")
    ap.add_argument("--sets", default="open,grounded", help="prompt sets (default open,grounded)")
    ap.add_argument("--drafters", default=",".join(DRAFTERS), help=f"comma-separated (default {','.join(DRAFTERS)})")
    ap.add_argument("--budgets", default="8,16,32", help="tree node budgets besides the chain (default 8,16,32)")
    ap.add_argument("--branching", type=int, default=None,
                    help="children per node for every tree (default by budget: 8->2, 16->3, 32->4)")
    ap.add_argument("--expand", default="static", choices=("static", "dynamic"), help="model drafter expansion")
    ap.add_argument("--reps", type=int, default=2, help="interleaved repetitions, medians reported (default 2)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    drafters = [d.strip() for d in args.drafters.split(",") if d.strip()]
    bad = [d for d in drafters if d not in DRAFTERS]
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    if bad or any(s not in PROMPTS for s in sets):
        ap.error(f"drafters must be among {', '.join(DRAFTERS)}; sets among {', '.join(PROMPTS)}")
    budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
    shape_list = shapes(budgets, args.branching)
    prompts = {s: PROMPTS[s][: args.prompts] for s in sets}

    target = get_lm(TARGET)
    draft = get_lm(DRAFT) if "model" in drafters else None
    configs = []                                     # (drafter, shape label, params)
    for d in drafters:
        for label, shape in shape_list:
            params = dict(shape, drafter=d, temperature=0.0, measure_speedup=True)
            if d == "model":
                params["expand"] = args.expand
            configs.append((d, label, params))

    greedy_ids = {}                                  # (set, prompt index) -> target greedy tokens
    for s in sets:
        for i, p in enumerate(prompts[s]):
            greedy_ids[(s, i)] = run(target, "greedy", p, args.tokens).sequences[0].token_ids
    d0, _, p0 = configs[0]                           # warm-up, untimed
    run(target, "spec_tree", prompts[sets[0]][0], min(args.tokens, 16), p0, draft if d0 == "model" else None)

    samples: dict[tuple, list[dict]] = {}            # (set, drafter, shape, prompt index) -> one dict per rep
    mismatches = []
    t_start = time.perf_counter()
    for rep in range(args.reps):
        for s in sets:
            for i, p in enumerate(prompts[s]):
                for d, label, params in configs:
                    res = run(target, "spec_tree", p, args.tokens, params, draft if d == "model" else None)
                    out = res.sequences[0].token_ids
                    m = res.meta.get("metrics", {})
                    same = out == greedy_ids[(s, i)]
                    if not same:
                        first = next((k for k, (a, b) in enumerate(zip(out, greedy_ids[(s, i)])) if a != b),
                                     min(len(out), len(greedy_ids[(s, i)])))
                        mismatches.append({"set": s, "prompt": i, "drafter": d, "shape": label, "rep": rep,
                                           "first_difference": first, "tokens": len(out),
                                           "greedy_tokens": len(greedy_ids[(s, i)])})
                        print(f"!!! MISMATCH: {s} prompt {i} drafter {d} {label} rep {rep}: output differs from "
                              f"target greedy at token {first}", file=sys.stderr, flush=True)
                    samples.setdefault((s, d, label, i), []).append(
                        {"same": same, "tokens": len(out), **{k: m.get(k) for k in (
                            "mean_accepted_length", "tree_nodes_mean", "speedup", "spec_ms", "target_only_ms",
                            "acceptance_rate", "node_efficiency", "acceptance_by_depth", "table_coverage",
                            "rounds")}, **round_figures(res.frame)})
        print(f"repetition {rep + 1}/{args.reps} done ({time.perf_counter() - t_start:.0f} s)", flush=True)

    rows = []
    for s in sets:
        for d, label, params in configs:
            per_prompt = [samples[(s, d, label, i)] for i in range(len(prompts[s]))]

            def med(key):          # median over prompts of the median over repetitions
                return median([median([r[key] for r in reps]) for reps in per_prompt])

            def share(num, sub=(), suffix="_r1"):   # median over prompts of the per-run share (median over reps)
                def one(r):                           # sum over rounds of num (minus sub) / sum of round_ms
                    whole = r["round_ms" + suffix]
                    return (r[num + suffix] - sum(r[k + suffix] for k in sub)) / whole if whole else None
                return median([median([one(r) for r in reps]) for reps in per_prompt])

            runs = [r for reps in per_prompt for r in reps]
            depth_acc: dict[str, list[float]] = {}
            for reps in per_prompt:
                for k, v in (reps[0].get("acceptance_by_depth") or {}).items():
                    depth_acc.setdefault(k, []).append(v)
            ms_tok = median([median([r["spec_ms"] / max(r["tokens"], 1) for r in reps if r["spec_ms"]])
                             for reps in per_prompt])
            rows.append({
                "set": s, "drafter": d, "shape": label, "params": params,
                "mean_accepted_length": med("mean_accepted_length"),
                "tree_nodes_mean": med("tree_nodes_mean"),
                "depth_mean": med("depth_mean"),
                "speedup": med("speedup"),
                "spec_ms_per_token": ms_tok,
                "acceptance_rate": med("acceptance_rate"),
                "node_efficiency": med("node_efficiency"),
                "acceptance_by_depth": {k: median(v) for k, v in sorted(depth_acc.items(), key=lambda kv: int(kv[0]))},
                "bookkeeping_share": share("bookkeeping_ms"),
                "overhead_share_ex_draft": share("round_ms", ("verify_ms", "draft_ms")),
                "draft_share": share("draft_ms"),
                "verify_share": share("verify_ms"),
                "bookkeeping_share_all_rounds": share("bookkeeping_ms", suffix=""),
                "table_coverage": med("table_coverage"),
                "identical_to_target_greedy": sum(r["same"] for r in runs), "runs": len(runs),
                "per_prompt": [{"mean_accepted_length": reps[0]["mean_accepted_length"],
                                "speedup": median([r["speedup"] for r in reps]),
                                "tree_nodes_mean": reps[0]["tree_nodes_mean"],
                                "bookkeeping_share": median([r["bookkeeping_ms_r1"] / r["round_ms_r1"]
                                                             if r["round_ms_r1"] else None for r in reps])}
                               for reps in per_prompt],
            })

    report = {"model": TARGET, "draft": DRAFT, "device": str(target.device), "dtype": str(target.dtype),
              "threads": torch.get_num_threads(), "tokens": args.tokens, "reps": args.reps,
              "shapes": {label: shape for label, shape in shape_list}, "expand": args.expand, "prompts": prompts,
              "rows": rows, "mismatches": mismatches, "versions": versions(),
              "wall_s": round(time.perf_counter() - t_start, 1)}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "spec_tree.json"
    out.write_text(json.dumps(report, indent=2))

    def f(x, fmt):
        return format(x, fmt) if x is not None else "-"

    print(f"{TARGET} (+ {DRAFT} for the model drafter) on {target.device}, {torch.get_num_threads()} threads, "
          f"{args.tokens} new tokens, greedy, {len(next(iter(prompts.values())))} prompts per set, "
          f"median of {args.reps} interleaved repetitions")
    print("shapes: " + "; ".join(f"{lab} = branching {sh['branching']}, budget {sh['tree_budget']}, "
                                 f"depth {sh['tree_depth']}" for lab, sh in shape_list))
    head = (f"{'set':9s} {'drafter':16s} {'shape':9s} {'tok/round':>9s} {'nodes':>6s} {'depth':>5s} "
            f"{'speedup':>7s} {'ms/tok':>7s} {'bookkeep':>8s} {'ex-draft':>8s}  same")
    print(head)
    for r in rows:
        over = " (>10%)" if (r["bookkeeping_share"] or 0) > 0.10 else ""
        print(f"{r['set']:9s} {r['drafter']:16s} {r['shape']:9s} {f(r['mean_accepted_length'], '9.2f')} "
              f"{f(r['tree_nodes_mean'], '6.1f')} {f(r['depth_mean'], '5.2f')} {f(r['speedup'], '6.2f')}x "
              f"{f(r['spec_ms_per_token'], '7.1f')} {f(r['bookkeeping_share'], '8.1%')} "
              f"{f(r['overhead_share_ex_draft'], '8.1%')}  {r['identical_to_target_greedy']}/{r['runs']}{over}")
    print(f"wrote {out}")
    if mismatches:
        print(f"!!! {len(mismatches)} run(s) did NOT reproduce target greedy decoding (see 'mismatches' in {out}):",
              file=sys.stderr)
        for mm in mismatches:
            print(f"!!!   {mm}", file=sys.stderr)
        return 1
    print("every output equals target greedy decoding")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
