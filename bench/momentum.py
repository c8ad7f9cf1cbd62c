"""Degeneration and speed: greedy, momentum decoding, contrastive search and nucleus sampling on open-ended prompts.

    .venv/bin/python -m bench.momentum [--prompts 20] [--tokens 256] [--threads 1] [--out bench/results/momentum.json]

For each prompt (raw format, continued as open-ended text) the four strategies run one after the other on the
embedded model, in an order rotated per prompt so that a slow spell of a shared machine does not land on one
strategy; one untimed warm-up run of each comes first. Every strategy runs its lab defaults (momentum alpha 0.2,
k 5, cac238b table; contrastive search alpha 0.6, k 4) and nucleus sampling uses top_p 0.95, seed = prompt index.

Metrics, on whitespace-split words of each generated text, as SimCTG's `measure_repetition_and_diversity`
(used by both papers):
- rep-n = 100 * (1 - sum over texts of unique n-grams / sum over texts of n-grams), n = 2, 3, 4 (lower = less
  repetition inside a text), n-grams counted as SimCTG's `eval_text` does: len - n per text (its loop leaves out
  the n-gram that ends at the last word), not len - n + 1;
- diversity = (1 - rep-2/100)(1 - rep-3/100)(1 - rep-4/100) * 100;
- distinct-n (Li et al. 2016) = 100 * unique n-grams / n-grams over all texts together, n = 1, 2 (also counts
  sameness across prompts; every n-gram, len - n + 1 per text: SimCTG has no distinct-n).
Speed: ms per generated token = the runs' total wall time (Run.run_to_end, tracing included) / total tokens
(EOS steps counted), and its ratio to greedy's in this same run. Split from the traces: `fwd_ms` = mean forward
time per token (the model: one row for greedy / momentum / nucleus, k rows for contrastive search) and
`other_ms` = (wall - all forwards) / tokens, everything else (selection, n-gram look-ups, tracing, Python); also the
median selection time `sel_ms`. On a shared CPU the forward times of identical work drift by several percent
between runs, so for strategies whose forward is greedy's own (momentum, nucleus) `other_ms` is the telling part.

`--threads` sets torch's intra-op threads (default 1): on a CPU shared with other busy processes, 2 threads
spin-wait on each other and one greedy step was measured at ~1.6 s instead of ~0.09 s with 1 thread.
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
RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = [
    "The city council met on Tuesday evening to discuss",
    "Scientists at the university announced a new method for",
    "The old lighthouse keeper had lived alone on the island for",
    "In the early nineteenth century, the railway",
    "The company reported its quarterly earnings, which",
    "She opened the letter and read the first line:",
    "The history of the printing press begins",
    "Heavy rain caused flooding across the region, and",
    "The museum's new exhibition explores",
    "Once upon a time, in a small village,",
    "The football club confirmed on Monday that its manager",
    "Researchers have long debated whether",
    "The recipe calls for fresh tomatoes, garlic and",
    "After years of negotiations, the two countries",
    "The spacecraft entered orbit around the planet and",
    "My grandfather used to tell me stories about",
    "The band's third album, released in 1998,",
    "Local residents gathered outside the courthouse to",
    "The novel follows a young woman who",
    "Engineers designing the bridge had to account for",
    "The election results surprised many observers because",
    "Deep in the forest, the travellers found",
    "The software update introduces several features, including",
    "On the morning of the storm, the harbour",
]
STRATEGIES = [("greedy", "greedy", {}),
              ("momentum", "momentum", {}),
              ("contrastive search", "contrastive_search", {}),
              ("nucleus p=0.95", "sample", {"top_p": 0.95})]


def ngrams(words: list[str], n: int) -> list[tuple]:
    """Every n-gram of the words: len - n + 1 of them (distinct-n's count)."""
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def simctg_ngrams(words: list[str], n: int) -> list[tuple]:
    """The n-grams SimCTG's `eval_text` counts: `while end_idx < len(token_list)` stops one short, so the n-gram
    ending at the last word is left out: len - n of them."""
    return [tuple(words[i:i + n]) for i in range(len(words) - n)]


def rep_n(texts: list[str], n: int) -> float:
    """SimCTG rep-n in percent, exactly as `measure_repetition_and_diversity` counts (simctg_ngrams: the last
    n-gram of each text left out): 100 * (1 - sum_texts |unique n-grams| / sum_texts |n-grams|)."""
    unique = total = 0
    for t in texts:
        grams = simctg_ngrams(t.strip().split(), n)
        unique += len(set(grams))
        total += len(grams)
    return 100.0 * (1.0 - unique / total) if total else 0.0


def distinct_n(texts: list[str], n: int) -> float:
    """distinct-n in percent over the whole set of texts: |unique n-grams| / |n-grams|."""
    grams = [g for t in texts for g in ngrams(t.split(), n)]
    return 100.0 * len(set(grams)) / len(grams) if grams else 0.0


def degeneration_metrics(texts: list[str]) -> dict:
    reps = {f"rep-{n}": rep_n(texts, n) for n in (2, 3, 4)}
    div = 100.0
    for v in reps.values():
        div *= 1.0 - v / 100.0
    return {**reps, "diversity": div, "distinct-1": distinct_n(texts, 1), "distinct-2": distinct_n(texts, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=20, help=f"number of prompts, 1..{len(PROMPTS)} (default 20)")
    ap.add_argument("--tokens", type=int, default=256, help="new tokens per run (default 256)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--out", type=Path, default=RESULTS / "momentum.json")
    args = ap.parse_args(argv)
    if not 1 <= args.prompts <= len(PROMPTS):
        ap.error(f"--prompts must be in [1, {len(PROMPTS)}]")
    torch.set_num_threads(args.threads)
    lm = get_lm(MODEL)

    def one(strategy, params, prompt, seed, n):
        req = RunRequest(model=MODEL, strategy=strategy, prompt=prompt, prompt_format="raw", params=params,
                         max_new_tokens=n, seed=seed)
        return Run(lm, req).run_to_end()

    for _, strategy, params in STRATEGIES:                      # warm-up, untimed
        one(strategy, params, PROMPTS[0], 0, 8)

    runs: dict[str, list[dict]] = {label: [] for label, _, _ in STRATEGIES}
    started = time.perf_counter()
    for i, prompt in enumerate(PROMPTS[: args.prompts]):
        order = STRATEGIES[i % len(STRATEGIES):] + STRATEGIES[: i % len(STRATEGIES)]
        for label, strategy, params in order:
            res = one(strategy, params, prompt, i, args.tokens)
            tok = res.frame[res.frame.kind == "token"]
            runs[label].append({"prompt": prompt, "text": res.sequences[0].text, "steps": int(len(tok)),
                                "wall_s": res.meta["wall_s"], "sel_ms": tok["sel_ms"].tolist(),
                                "fwd_sum_ms": float(tok["fwd_ms"].sum()),
                                "fwd_ms": tok["fwd_ms"].tolist(),
                                "overridden": int(tok["overridden"].fillna(False).astype(bool).sum())
                                if "overridden" in tok else None})
        print(f"prompt {i + 1}/{args.prompts} done, {time.perf_counter() - started:.0f} s", flush=True)

    table = {}
    for label, rows in runs.items():
        steps = sum(r["steps"] for r in rows)
        wall = sum(r["wall_s"] for r in rows)
        m = degeneration_metrics([r["text"] for r in rows])
        fwd = sum(r["fwd_sum_ms"] for r in rows)
        m.update(ms_per_token=1000.0 * wall / steps, steps=steps, fwd_ms=fwd / steps,
                 other_ms=(1000.0 * wall - fwd) / steps,
                 sel_ms=statistics.median(x for r in rows for x in r["sel_ms"]),
                 median_fwd_ms=statistics.median(x for r in rows for x in r["fwd_ms"]))
        if rows[0]["overridden"] is not None:
            m["overridden_pct"] = 100.0 * sum(r["overridden"] for r in rows) / steps
        table[label] = m
    base = table["greedy"]["ms_per_token"]
    for m in table.values():
        m["time_vs_greedy"] = m["ms_per_token"] / base

    cols = ["rep-2", "rep-3", "rep-4", "diversity", "distinct-1", "distinct-2", "ms_per_token", "time_vs_greedy",
            "fwd_ms", "other_ms", "sel_ms"]
    print(f"\n{args.prompts} prompts x {args.tokens} new tokens, {MODEL}, float32 CPU, {args.threads} thread(s), "
          f"{time.perf_counter() - started:.0f} s")
    print(f"{'strategy':<20}" + "".join(f"{c:>15}" for c in cols))
    for label, m in table.items():
        print(f"{label:<20}" + "".join(f"{m[c]:>15.3f}" if c == "time_vs_greedy" else f"{m[c]:>15.2f}"
                                       for c in cols))
    result = {"model": MODEL, "prompts": args.prompts, "new_tokens": args.tokens, "threads": args.threads,
              "cpu_count": os.cpu_count(), "load_avg": os.getloadavg(), "wall_s": time.perf_counter() - started,
              "params": {label: params for label, _, params in STRATEGIES}, "table": table,
              "texts": {label: [r["text"] for r in rows] for label, rows in runs.items()},
              "runs": {label: [{k: r[k] for k in ("prompt", "steps", "wall_s", "fwd_sum_ms", "overridden")}
                               for r in rows] for label, rows in runs.items()}, "versions": versions()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
