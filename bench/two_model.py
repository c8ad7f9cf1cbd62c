"""Two-model decoding on the embedded model and its distilled draft: the draft itself (top-1 agreement, cost per
token), speculative decoding (acceptance rate, mean accepted length, speedup over target-only decoding) and EAD
(large-model fraction, switches, catch-up, estimated compute saved, wall time against the large model alone).

Timings are ratios measured in this one process, interleaved (target-only greedy, then the strategy, per prompt and
repetition), medians over repetitions; every run uses the lab's own loops with full tracing. The prompts are the
draft's held-out prompts (tools/draft_data.py: topics never seen in its training).

    .venv/bin/python -m bench.two_model [--tokens 64] [--prompts 6] [--reps 2] [--threads N] [--quick]

Prints a table and writes bench/results/two_model.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from declab.run import Run, RunRequest, get_lm, versions
from tools.draft_build import agreement, cost_ratio
from tools.draft_data import build_prompts

TARGET, DRAFT = "smollm2-135m-instruct", "smollm2-135m-draft"
RESULTS = Path(__file__).resolve().parent / "results"
ROLES = {"speculative": "draft", "ead": "small"}            # the role the draft model plays in each strategy

SPECULATIVE = [
    ("greedy, gamma=2", {"num_draft_tokens": 2}),
    ("greedy, gamma=3", {"num_draft_tokens": 3}),
    ("greedy, gamma=4", {"num_draft_tokens": 4}),
    ("greedy, gamma=6", {"num_draft_tokens": 6}),
    ("greedy, heuristic", {"adaptive": "heuristic", "num_draft_tokens": 3}),
    ("greedy, confidence 0.4", {"adaptive": "confidence", "confidence_threshold": 0.4, "max_draft_tokens": 8}),
    ("greedy, specdec h=0.7", {"adaptive": "specdec", "h": 0.7, "max_draft_tokens": 8}),
    ("sample T=0.7, gamma=3", {"temperature": 0.7, "num_draft_tokens": 3}),
    ("sample T=1.0, gamma=3", {"temperature": 1.0, "num_draft_tokens": 3}),
    ("greedy, ngram table", {"draft": "ngram", "num_draft_tokens": 4}),
    ("greedy, prompt lookup", {"draft": "prompt_lookup", "num_draft_tokens": 4}),
]
EAD = [("tau=1.0", {"threshold": 1.0}), ("tau=2.0", {"threshold": 2.0}), ("tau=3.0", {"threshold": 3.0}),
       ("tau=2.0, d_min=1, w=1", {"threshold": 2.0, "min_dwell": 1, "window": 1})]


def run(lm, strategy, prompt, n, params=None, seed=0, second=None):
    """One run of `strategy` on `lm`; second: the loaded draft model, given to the strategy's second-model role
    (speculative: 'draft', ead: 'small')."""
    req = RunRequest(model=lm.key, strategy=strategy, prompt=prompt, prompt_format="chat", params=params or {},
                     max_new_tokens=n, seed=seed, second_model=second.key if second is not None else None)
    models = {ROLES.get(strategy, "draft"): second} if second is not None else None
    t0 = time.perf_counter()
    res = Run(lm, req, models=models).run_to_end()
    return res, time.perf_counter() - t0


def mean(xs):
    xs = [x for x in xs if x is not None]
    return round(statistics.fmean(xs), 4) if xs else None


def draft_numbers(target, draft, prompts, n) -> dict:
    """Teacher-forced top-1 agreement on the target's greedy answers to held-out prompts, expected acceptance at
    T=1 (mean of sum_v min(p, q)), and the cost ratio (median ms per decoded token, draft / target)."""
    answers = []
    for p in prompts:
        res, _ = run(target, "greedy", p, n)
        answers.append({"prompt_ids": target.encode_prompt(p, "chat"), "answer_ids": res.sequences[0].token_ids})
    out = agreement(target.model, draft.model, answers)
    out.update(cost_ratio(target.model, draft.model))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="fewer configurations (smoke run)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    target, draft = get_lm(TARGET), get_lm(DRAFT)
    prompts = build_prompts()[1][: args.prompts]
    spec_cfgs = SPECULATIVE[2:3] + SPECULATIVE[7:8] if args.quick else SPECULATIVE
    ead_cfgs = EAD[1:2] if args.quick else EAD
    report = {"versions": versions(), "threads": torch.get_num_threads(), "tokens": args.tokens,
              "prompts": prompts, "reps": args.reps}
    report["draft"] = draft_numbers(target, draft, prompts, args.tokens)
    print(f"draft: top-1 agreement {report['draft']['top1_agreement']:.3f}, expected acceptance (T=1) "
          f"{report['draft']['expected_acceptance']:.3f}, cost ratio {report['draft']['cost_ratio']:.3f} "
          f"({report['draft']['draft_ms_per_token']:.1f} / {report['draft']['target_ms_per_token']:.1f} ms per token)")

    rows = []
    greedy_ids = {}
    for label, params in spec_cfgs + [(f"ead {lab}", dict(p, _ead=True)) for lab, p in ead_cfgs]:
        is_ead = params.pop("_ead", False)
        strategy = "ead" if is_ead else "speculative"
        if not is_ead:
            params = dict(params, measure_speedup=False)
        base_t, strat_t, metrics, identical = [], [], [], []
        for p in prompts:
            for rep in range(args.reps):
                g, tg = run(target, "greedy", p, args.tokens)
                r, tr = run(target, strategy, p, args.tokens, params, seed=rep, second=draft)
                n_g, n_r = len(g.sequences[0].token_ids), len(r.sequences[0].token_ids)
                base_t.append(tg / max(n_g, 1))
                strat_t.append(tr / max(n_r, 1))
                greedy_ids[p] = g.sequences[0].token_ids
                if rep == 0:
                    metrics.append(r.meta["metrics"])
                    identical.append(r.sequences[0].token_ids == g.sequences[0].token_ids)
        row = {"strategy": strategy, "config": label, "params": params,
               "speedup": round(statistics.median(base_t) / statistics.median(strat_t), 4),
               "greedy_ms_per_token": round(1000 * statistics.median(base_t), 2),
               "ms_per_token": round(1000 * statistics.median(strat_t), 2),
               "identical_to_target_greedy": sum(identical), "runs": len(identical)}
        keys = (("acceptance_rate", "alpha_hat", "mean_accepted_length", "mean_draft_length") if not is_ead else
                ("large_fraction", "switches", "catch_up_tokens", "compute_saved", "measured_step_ratio"))
        for k in keys:
            row[k] = mean([m.get(k) for m in metrics])
        if not is_ead:
            pos: dict[str, list[float]] = {}
            for m in metrics:
                for k, v in (m.get("acceptance_by_position") or {}).items():
                    pos.setdefault(k, []).append(v)
            row["acceptance_by_position"] = {k: mean(v) for k, v in sorted(pos.items(), key=lambda kv: int(kv[0]))}
        rows.append(row)
        if is_ead:
            print(f"{row['config']:<28} large fraction {row['large_fraction']:.3f}  switches {row['switches']:5.1f}  "
                  f"catch-up {row['catch_up_tokens']:5.1f}  compute saved {row['compute_saved']:.3f}  "
                  f"speedup {row['speedup']:.2f}x  same as target greedy {row['identical_to_target_greedy']}/"
                  f"{row['runs']}")
        else:
            print(f"{row['config']:<28} acceptance {row['acceptance_rate'] or 0:.3f}  alpha {row['alpha_hat'] or 0:.3f}  "
                  f"tokens/round {row['mean_accepted_length']:.2f}  speedup {row['speedup']:.2f}x  "
                  f"same as target greedy {row['identical_to_target_greedy']}/{row['runs']}")
    report["rows"] = rows
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "two_model.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
