"""Grammar strategies on the embedded model: KL curves of gcd and asap on the paper's binary toys, and mask time.

    .venv/bin/python -m bench.grammar [--samples 300] [--threads 1] [--out bench/results/grammar.json] [--html PATH]

1. KL curves (docs/strategies.md#asap, Park et al. 2024). For binary_len_3 ({000, 100, 101, 110, 111}) and the skewed
   binary_len_5 (17 of the 32 length-5 strings) the prompt "Write a binary string of length N." (chat format) is
   decoded by gcd and by asap with `--samples` samples each (seed 0, temperature 1, no top-k / top-p). Both
   languages are small, so the run's exact mode enumerates every grammatical token sequence with the model and
   the trace carries KL(empirical of the first n samples || exact Q) in nats, the sliding-window variant over the
   last n/4 samples, and GCD's exact limit KL(GCD's distribution || Q). The table gives them at a few n;
   `--html PATH` draws both curves on one axis (viz.grammar.kl_compare_figure).
2. Mask time per token: gcd runs every built-in grammar on a prompt that fits it (one sample each) and every
   step records `mask_ms` = xgrammar's fill_next_token_bitmask plus listing the allowed ids from the bitmask
   (what the strategy pays per token for the grammar; the model's logits width here is 49152). The median over
   all steps of each grammar is reported, and separately the median of fill_next_token_bitmask alone, timed
   by replaying the generated tokens through a fresh matcher.

`--threads` sets torch's intra-op threads (default 1: on a CPU shared with other busy processes, two threads
spin-wait on each other). Timings are medians of one run on this machine, whatever else it was doing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import xgrammar as xg

from declab.run import Run, RunRequest, get_lm, versions
from strategies import grammar as G
from viz.grammar import kl_compare_figure

MODEL = "smollm2-135m-instruct"
RESULTS = Path(__file__).resolve().parent / "results"
TOYS = {"binary_len_3": ("Write a binary string of length 3.", 6),
        "binary_len_5": ("Write a binary string of length 5.", 8)}
MASK_CASES = {
    "binary_len_5": ("Write a binary string of length 5.", 8),
    "arithmetic": ("Write an arithmetic expression that equals 12.", 32),
    "json": ("Give a JSON object with a name and an age.", 64),
    "sql_select": ("Write an SQL query that lists the names of all users older than 30.", 48),
    "sygus_string": ("Write an SMT-LIB string expression over `name` that returns its first letter.", 48),
}
CHECKPOINTS = (1, 10, 30, 100, 300, 1000, 3000)


def run(lm, strategy: str, grammar: str, prompt: str, n: int, samples: int, **params):
    req = RunRequest(model=MODEL, strategy=strategy, prompt=prompt, max_new_tokens=n, seed=0,
                     params={"grammar": grammar, "num_samples": samples, **params})
    t0 = time.perf_counter()
    res = Run(lm, req).run_to_end()
    return res, time.perf_counter() - t0


def at(kl_rows, n: int, column: str = "kl"):
    rows = kl_rows[kl_rows["samples"] == n]
    return None if rows.empty else round(float(rows[column].iloc[0]), 4)


def fill_only_ms(lm, text: str, token_ids: list[int]) -> list[float]:
    """fill_next_token_bitmask alone, per position of a generated sequence (a fresh matcher replays it)."""
    m = xg.GrammarMatcher(G.compiled_grammar(lm, text))
    bm = xg.allocate_token_bitmask(1, lm.vocab_size)
    out = []
    for t in list(token_ids) + [None]:
        t0 = time.perf_counter()
        m.fill_next_token_bitmask(bm)
        out.append((time.perf_counter() - t0) * 1000.0)
        if t is None or not m.accept_token(int(t)):
            break
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=300, help="samples per strategy and toy grammar (default 300)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--out", type=Path, default=RESULTS / "grammar.json")
    ap.add_argument("--html", type=Path, default=None, help="also write the KL curves as an HTML page (~5 MB)")
    ap.add_argument("--parts", default="kl,mask", help="kl, mask or both (default); a part left out keeps its "
                                                        "entry of an existing --out file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    lm = get_lm(MODEL)
    parts = set(args.parts.split(","))
    old = json.loads(args.out.read_text()) if args.out.exists() else {}
    result = {"model": MODEL, "samples": args.samples, "threads": args.threads, "versions": versions(),
              "kl": {} if "kl" in parts else old.get("kl", {}), "mask": {} if "mask" in parts else old.get("mask", {})}
    if "kl" not in parts:
        result["samples"] = old.get("samples")
    frames = {}
    if "kl" in parts:
        kl_part(lm, args, result, frames)
    if "mask" in parts:
        mask_part(lm, result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False))
    print(f"\nwrote {args.out}")
    if args.html and frames:
        write_html(args.html, frames)
    return 0


def kl_part(lm, args, result: dict, frames: dict) -> None:
    print(f"KL(empirical || exact Q) in nats, {args.samples} samples per run, {MODEL}, float32 CPU")
    print(f"{'grammar':13s} {'strategy':8s} " + " ".join(f"n={n:<6d}" for n in CHECKPOINTS if n <= args.samples)
          + "  window@N  gcd-limit  EFG~root/Z   wall s")
    for grammar, (prompt, n) in TOYS.items():
        for strategy in ("gcd", "asap"):
            res, wall = run(lm, strategy, grammar, prompt, n, args.samples)
            f, m = res.frame, res.meta["metrics"]
            kl = f[f.kind == "kl"]
            frames[(grammar, strategy)] = f
            curve = {n_: at(kl, n_) for n_ in CHECKPOINTS if n_ <= args.samples}
            final = {"kl": at(kl, args.samples), "kl_window": at(kl, args.samples, "kl_window")}
            ratio = m["efg_root"] / m["z"] if m.get("z") and m.get("efg_root") is not None else None
            result["kl"].setdefault(grammar, {})[strategy] = {
                "curve": curve, **final, "kl_gcd_limit": m.get("kl_gcd_limit"), "z": m.get("z"),
                "efg_root": m.get("efg_root"), "exact": bool(kl["exact"].all()), "wall_s": round(wall, 2),
                "distinct": int((f[f.kind == "target"]["count"] > 0).sum()),
                "target": {t: round(float(q), 5) for t, q in zip(f[f.kind == "target"]["token_text"],
                                                                  f[f.kind == "target"]["q"])}}
            print(f"{grammar:13s} {strategy:8s} " + " ".join(f"{v if v is not None else '-':<8}" for v in
                                                             curve.values())
                  + f"  {final['kl_window']:<8}  {m.get('kl_gcd_limit', float('nan')):<9.4f}  "
                  + (f"{ratio:<10.6f}" if ratio else "-         ") + f"  {wall:7.1f}", flush=True)


def mask_part(lm, result: dict) -> None:
    print("\nmask time per token (ms): gcd, one sample per built-in grammar")
    print(f"{'grammar':13s} {'steps':>5s} {'mask_ms median':>15s} {'fill only median':>17s} {'allowed median':>15s}")
    all_mask, all_fill = [], []
    for grammar, (prompt, n) in MASK_CASES.items():
        res, _ = run(lm, "gcd", grammar, prompt, n, 1, exact_max_nodes=0)
        tok = res.frame[res.frame.kind == "token"]
        mask = [float(x) for x in tok["mask_ms"]]
        fill = fill_only_ms(lm, G.BUILTIN_GRAMMARS[grammar], res.sequences[0].token_ids)
        all_mask += mask
        all_fill += fill
        result["mask"][grammar] = {"steps": len(mask), "mask_ms_median": round(statistics.median(mask), 4),
                                   "fill_ms_median": round(statistics.median(fill), 4),
                                   "allowed_median": int(statistics.median(tok["allowed"])),
                                   "text": res.sequences[0].text, "complete": res.sequences[0].extra["complete"]}
        r = result["mask"][grammar]
        print(f"{grammar:13s} {r['steps']:5d} {r['mask_ms_median']:15.3f} {r['fill_ms_median']:17.3f} "
              f"{r['allowed_median']:15d}   {r['text'][:50]!r}", flush=True)
    result["mask"]["all"] = {"steps": len(all_mask), "mask_ms_median": round(statistics.median(all_mask), 4),
                             "fill_ms_median": round(statistics.median(all_fill), 4)}
    print(f"{'all':13s} {len(all_mask):5d} {result['mask']['all']['mask_ms_median']:15.3f} "
          f"{result['mask']['all']['fill_ms_median']:17.3f}")


def write_html(path: Path, frames: dict) -> None:
    parts = []
    for grammar in TOYS:
        fig = kl_compare_figure({s: frames[(grammar, s)] for s in ("gcd", "asap")})
        fig.update_layout(title_text=f"{grammar}: KL(empirical ‖ exact Q) against the number of samples")
        parts.append(fig.to_html(full_html=False, include_plotlyjs="inline" if not parts else False))
    path.write_text("<!DOCTYPE html><html><head><meta charset='utf-8'><title>declab grammar bench</title></head>"
                    "<body>" + "".join(parts) + "</body></html>", encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
