"""`make bench`: every strategy on the embedded model in one table, against our greedy loop and transformers' `generate`.

For each strategy (with the settings in BENCH) and for transformers' `generate` greedy and sampling, on the same
model, prompt and number of new tokens, interleaved (every repetition runs every row once, in the same order), the
median over repetitions of: wall time per emitted token (prefill included, first returned sequence), tokens/s, the
time per token relative to our greedy and to `generate` greedy measured in the same run, the peak memory
during the run and its rise above the level before it (host RSS on CPU, `torch.cuda.max_memory_allocated` on CUDA), and
the strategy's headline figure from its issue computed from the same runs (mirostat's mean surprise against tau,
repetition of momentum / contrastive search against greedy, superposed's k drafts against one greedy run and three
nucleus runs, grammar mask time per token, speculative speedup and acceptance, spec_tree's tokens per round and
speed against the greedy row for each drafter at a small tree, ead's large-model share...). Then the
model load time, cold (GGUF de-quantised and converted into a fresh cache) and warm, each in its own process.

    .venv/bin/python -m bench.run [--tokens 64] [--reps 3] [--only greedy,sample] [--no-cold]

Prints the table and writes it as JSON to bench/results/bench.json. Rows that need the embedded draft (ead,
speculative, contrastive, spec_tree with the model drafter) are left out with a note while it is not in models.yaml.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench import llamacpp
from declab.models.registry import load_registry
from declab.run import Run, RunRequest, get_lm, versions

MODEL = "smollm2-135m-instruct"
PROMPT = "The history of the printing press begins"
JSON_PROMPT = "Describe a cat as a JSON object with a name and an age."
CODE_PROMPT = ('def add(a: int, b: int) -> int:\n    """Return the sum of a and b.\n    >>> add(2, 3)\n    5\n'
               '    >>> add(-1, 1)\n    0\n    """\n')
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Row:
    label: str
    strategy: str                         # a registered strategy, or "generate" (transformers)
    params: dict = field(default_factory=dict)
    prompt: str = PROMPT
    prompt_format: str = "raw"
    model: str = MODEL


INT8 = "smollm2-135m-instruct-int8"    # the CPU fast path (models.yaml): dynamic int8 linears, not token-exact
STOCK = "smollm2-135m-instruct-stock"  # the embedded model on transformers' own kernels: what `generate` rows run on
LLAMA_CPP_MS = 6.7                     # llama.cpp on the same GGUF, 2 threads, ms/token: issue 21's figure, used only
                                       # when bench/llamacpp.py has no environment here
COMPILED = "smollm2-135m-instruct-compiled"  # kernels: compiled (declab/models/compiled.py), compiled at load
INT8_COMPILED = "smollm2-135m-instruct-int8-compiled"   # fbgemm int8 linears in a compiled step
MARGINAL = ("generate greedy", "greedy", "greedy stock kernels", "greedy compiled", "greedy int8 (CPU)",
            "greedy int8 compiled")
SAMPLE_TARGET = 1.10
BENCH = [
    Row("generate greedy", "generate", {"do_sample": False}, model=STOCK),
    Row("generate sample", "generate", {"do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": 1.0},
        model=STOCK),
    Row("greedy", "greedy"),
    Row("greedy stock kernels", "greedy", model=STOCK),
    Row("greedy compiled", "greedy", model=COMPILED),
    Row("greedy int8 (CPU)", "greedy", model=INT8),
    Row("greedy int8 compiled", "greedy", model=INT8_COMPILED),
    Row("sample", "sample", {"temperature": 1.0}),
    Row("sample top_p 0.9", "sample", {"temperature": 1.0, "top_p": 0.9}),
    Row("mirostat v1 tau 3", "mirostat", {"version": 1, "tau": 3.0}),
    Row("mirostat v2 tau 3", "mirostat", {"version": 2, "tau": 3.0}),
    Row("sampler_chain", "sampler_chain"),            # llama.cpp's default chain and parameters
    Row("momentum", "momentum"),
    Row("contrastive_search", "contrastive_search"),
    Row("beam 4", "beam", {"num_beams": 4}),
    Row("diverse_beam 4x2", "diverse_beam", {"num_beams": 4, "num_beam_groups": 2}),
    Row("superposed 3 drafts", "superposed", {"num_drafts": 3}),
    Row("gcd json", "gcd", {"grammar": "json"}, JSON_PROMPT, "chat"),
    Row("asap json", "asap", {"grammar": "json"}, JSON_PROMPT, "chat"),
    Row("uscd", "uscd", {}, CODE_PROMPT, "raw"),
    Row("contrastive", "contrastive", {}),
    Row("ead", "ead", {}),
    Row("speculative", "speculative", {"measure_speedup": False}),
    # spec_tree: one small tree (8 nodes, 2 children per node, depth 4) per drafter; speedup from the greedy row
    *[Row(f"spec_tree {label}", "spec_tree", {"drafter": drafter, "tree_budget": 8, "branching": 2,
                                              "tree_depth": 4, "measure_speedup": False})
      for label, drafter in (("model", "model"), ("aded", "aded"), ("recycling", "token_recycling"),
                             ("lookahead", "lookahead"), ("prompt_lookup", "prompt_lookup"))],
]


class PeakMemory:
    """Peak memory during the block and its rise above the level at entry, in MB: the CUDA allocator's peak on a GPU,
    else the process RSS sampled every 2 ms by a thread (Linux /proc; 0 elsewhere)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.peak_mb = self.extra_mb = 0.0

    @staticmethod
    def rss_mb() -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except OSError:
            return 0.0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
            return self
        self.base, self.top, self.done = self.rss_mb(), 0.0, threading.Event()

        def sample():
            while not self.done.wait(0.002):
                self.top = max(self.top, self.rss_mb())
        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.done.set()
            self.thread.join()
            self.peak_mb = max(self.top, self.rss_mb())
        self.extra_mb = max(0.0, self.peak_mb - self.base)
        return False


def rep_n(token_ids: list[int], n: int = 2) -> float:
    """Share (%) of the n-grams of a token sequence that repeat an earlier one (the degeneration measure)."""
    grams = [tuple(token_ids[i:i + n]) for i in range(len(token_ids) - n + 1)]
    return 100.0 * (1 - len(set(grams)) / len(grams)) if grams else 0.0


def headline(row: Row, res, by_label: dict, greedy_ids: list[int]) -> str:
    """The strategy's headline figure from its issue, from this run (res: RunResult, by_label: medians so far,
    greedy_ids: the float32 greedy row's tokens)."""
    m, frame = res.meta.get("metrics", {}), res.frame
    tokens = frame[frame.kind == "token"]
    ids = res.sequences[0].token_ids if res.sequences else []
    greedy_tok = by_label.get("greedy", {}).get("ms_per_token")
    if row.model != MODEL:
        same = next((i for i, (a, b) in enumerate(zip(ids, greedy_ids)) if a != b), min(len(ids), len(greedy_ids)))
        return f"first {same} of {len(greedy_ids)} tokens equal float32 greedy's"
    if row.strategy == "mirostat":
        return f"mean surprise {tokens.surprise.mean():.2f} bits (tau {row.params['tau']:g})"
    if row.strategy == "sampler_chain":
        return f"median {tokens.kept.median():.0f} tokens kept after the chain"
    if row.strategy in ("momentum", "contrastive_search", "greedy", "sample"):
        return f"rep-2 {rep_n(ids):.1f}%"
    if row.strategy == "superposed" and greedy_tok:
        nucleus = by_label.get("sample top_p 0.9", {}).get("median_s")
        own = by_label[row.label]["median_s"] if row.label in by_label else None
        text = f"{m.get('drafts', '?')} drafts"
        if own and by_label["greedy"].get("median_s"):
            text += f" = {own / by_label['greedy']['median_s']:.2f}x one greedy run"
        if own and nucleus:
            text += f"; 3 nucleus runs {3 * nucleus / own:.2f}x longer"
        return text
    if row.strategy in ("gcd", "asap") and "mask_ms" in tokens:
        return f"mask {tokens.mask_ms.median():.2f} ms/token"
    if row.strategy == "speculative":
        return (f"acceptance {m.get('acceptance_rate', float('nan')):.2f}, "
                f"{m.get('mean_accepted_length', float('nan')):.2f} tokens/round")
    if row.strategy == "spec_tree":
        own = by_label.get(row.label, {}).get("ms_per_token")
        speed = f", speedup {greedy_tok / own:.2f}x over greedy" if greedy_tok and own else ""
        return (f"{m.get('mean_accepted_length', float('nan')):.2f} tokens/round, "
                f"{m.get('tree_nodes_mean', float('nan')):.1f} nodes/round{speed}")
    if row.strategy == "ead":
        return f"large-model share {m.get('large_fraction', float('nan')):.2f}"
    if row.strategy == "uscd":
        return f"contrast on {m.get('contrast_fraction', 0):.0%} of steps, {m.get('flips', 0)} flips"
    if row.strategy == "contrastive":
        return f"flips {m.get('flip_fraction', 0):.0%}"
    if row.strategy in ("beam", "diverse_beam"):
        return f"{len(res.sequences)} sequences"
    return ""


def load_times() -> dict:
    """Cold: a fresh cache (GGUF de-quantized and converted); warm: the converted safetensors. In a subprocess each,
    so nothing is shared with this process; library imports (~2 s) are excluded from both."""
    code = ("import time, transformers; from declab.models.registry import load_registry; "
            "from declab.models.loading import load_lm; r=load_registry(); t=time.perf_counter(); load_lm(r.get(r.default)); "
            "print(time.perf_counter()-t)")
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        for label in ("cold", "warm"):
            env = dict(os.environ, DECLAB_CACHE=cache)
            env.pop("DECLAB_MODELS", None)
            proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
            out[f"load_{label}_s"] = round(float(proc.stdout.strip().splitlines()[-1]), 3)
    return out


def runnable(rows: list[Row], registry) -> tuple[list[Row], list[str]]:
    """Rows whose strategy can run on the embedded model here (two-model rows need its pair in models.yaml)."""
    pairs = registry.get(MODEL).pairs
    keep, notes = [], []
    for r in rows:
        needs_pair = r.strategy in ("ead", "speculative", "contrastive") or (
            r.strategy == "spec_tree" and r.params.get("drafter", "model") == "model")
        if needs_pair and not pairs:
            notes.append(f"{r.label}: left out, {MODEL} has no pair in models.yaml (the embedded draft, issue 12)")
        else:
            keep.append(r)
    return keep, notes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per run (default 64)")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions, median reported (default 3)")
    ap.add_argument("--only", default=None, help="comma-separated labels or strategies to run (default: all)")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold/warm load-time measurement")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    rows, notes = runnable(BENCH, load_registry())
    if args.only:
        wanted = {w.strip() for w in args.only.split(",")}
        rows = [r for r in rows if r.label in wanted or r.strategy in wanted or r.label in ("greedy", "generate greedy")]
    lm = get_lm(MODEL)
    load_s = {}
    for key in {r.model for r in rows} - {MODEL}:            # other models (int8 row), loaded before timing
        t0 = time.perf_counter()
        get_lm(key)
        load_s[key] = round(time.perf_counter() - t0, 2)

    def once(row: Row, tokens: int | None = None):
        lm, tokens = get_lm(row.model), tokens or args.tokens
        if row.strategy == "generate":
            ids = torch.tensor([lm.encode_prompt(row.prompt, row.prompt_format)], device=lm.device)
            with torch.inference_mode():
                lm.model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens,
                                  pad_token_id=lm.tokenizer.eos_token_id, **row.params)
            lm.sync()
            return None, tokens
        req = RunRequest(model=row.model, strategy=row.strategy, prompt=row.prompt, prompt_format=row.prompt_format,
                         params=row.params, max_new_tokens=tokens, seed=0)
        res = Run(lm, req).run_to_end()                      # ead / speculative / contrastive: the embedded draft
        if res.status != "ok":
            raise SystemExit(f"bench: {row.label} failed: {res.error}")
        return res, max(1, len(res.sequences[0].token_ids))

    for row in rows:                                         # warm-up, untimed
        once(row)
    samples: dict[str, list[tuple[float, int, float, float]]] = {r.label: [] for r in rows}
    last: dict[str, object] = {}
    for _ in range(args.reps):
        for row in rows:
            with PeakMemory(lm.device) as mem:
                t0 = time.perf_counter()
                res, n = once(row)
                wall = time.perf_counter() - t0
            samples[row.label].append((wall, n, mem.peak_mb, mem.extra_mb))
            last[row.label] = res
    # marginal time per token (the prefill and per-run costs taken out): (wall at --tokens - wall at SHORT) / the
    # difference in tokens, interleaved, median over repetitions; for the greedy-type rows
    marginal_rows = [r for r in rows if r.label in MARGINAL]
    short, marg = max(4, args.tokens // 4), {r.label: [] for r in marginal_rows}
    for _ in range(args.reps):
        for row in marginal_rows:
            t0 = time.perf_counter()
            _res, n_short = once(row, short)
            w_short = time.perf_counter() - t0
            t0 = time.perf_counter()
            _res, n_long = once(row, args.tokens)
            w_long = time.perf_counter() - t0
            if n_long > n_short:
                marg[row.label].append(1000 * (w_long - w_short) / (n_long - n_short))
    table: dict[str, dict] = {}
    for row in rows:
        walls = [s[0] for s in samples[row.label]]
        per_tok = [s[0] / s[1] * 1000 for s in samples[row.label]]
        table[row.label] = {"strategy": row.strategy, "model": row.model, "params": row.params,
                            "tokens": samples[row.label][-1][1],
                            "median_s": round(statistics.median(walls), 4),
                            "ms_per_token": round(statistics.median(per_tok), 3),
                            "tokens_per_s": round(1000 / statistics.median(per_tok), 2),
                            "peak_mb": round(max(s[2] for s in samples[row.label]), 1),
                            "extra_mb": round(max(s[3] for s in samples[row.label]), 1)}
        if marg.get(row.label):
            table[row.label]["marginal_ms"] = round(statistics.median(marg[row.label]), 3)
    g, hf = table["greedy"]["ms_per_token"], table["generate greedy"]["ms_per_token"]
    for row in rows:
        t = table[row.label]
        t["vs_greedy"] = round(t["ms_per_token"] / g, 3)
        t["vs_generate_greedy"] = round(t["ms_per_token"] / hf, 3)
        t["headline"] = (headline(row, last[row.label], table, last["greedy"].sequences[0].token_ids)
                         if last[row.label] is not None else "")
    result = {"model": MODEL, "device": str(lm.device), "dtype": str(lm.dtype), "threads": torch.get_num_threads(),
              "new_tokens": args.tokens, "reps": args.reps, "rows": table, "notes": notes, "versions": versions(),
              "other_model_load_s": load_s}
    if "generate sample" in table:                        # issue 21: sampling-type rows within 1.10x
        result["vs_generate_sample"] = {label: round(t["ms_per_token"] / table["generate sample"]["ms_per_token"], 3)
                                        for label, t in table.items()
                                        if t["strategy"] in ("sample", "mirostat", "sampler_chain")}
    if not args.no_cold:
        result.update(load_times())
    print(f"{MODEL} on {lm.device} ({lm.dtype}, {torch.get_num_threads()} threads), {args.tokens} new tokens, "
          f"median of {args.reps} interleaved repetitions")
    print(f"{'strategy':22s} {'tok/s':>7s} {'ms/tok':>7s} {'/greedy':>8s} {'/generate':>9s} {'peak MB':>8s} {'+MB':>6s}  headline")
    for label, t in table.items():
        print(f"{label:22s} {t['tokens_per_s']:7.1f} {t['ms_per_token']:7.1f} {t['vs_greedy']:8.3f} "
              f"{t['vs_generate_greedy']:9.3f} {t['peak_mb']:8.0f} {t['extra_mb']:6.1f}  {t['headline']}")
    print(f"target: greedy / generate greedy {table['greedy']['vs_generate_greedy']:.3f} (<= 1.10)")
    for label, r in result.get("vs_generate_sample", {}).items():
        print(f"target: {label} / generate sample {r:.3f} (<= {SAMPLE_TARGET:.2f})")
    for label, t in table.items():
        if "marginal_ms" in t:
            print(f"marginal: {label:22s} {t['marginal_ms']:6.1f} ms/token")
    gm = table.get("generate greedy", {}).get("marginal_ms")
    if gm and "marginal_ms" in table["greedy"]:
        result["greedy_marginal_vs_generate"] = round(table["greedy"]["marginal_ms"] / gm, 3)
        print(f"target: greedy (exact fast CPU path) marginal / generate greedy marginal "
              f"{result['greedy_marginal_vs_generate']:.3f} (<= 0.65)")
    if gm and "marginal_ms" in table.get("greedy compiled", {}):
        compiled = get_lm(COMPILED).compiled
        same = last["greedy compiled"].sequences[0].token_ids == last["greedy stock kernels"].sequences[0].token_ids \
            if "greedy stock kernels" in last else None
        result["compiled"] = {"marginal_vs_generate": round(table["greedy compiled"]["marginal_ms"] / gm, 3),
                              "load_with_compile_s": load_s.get(COMPILED), "compile_s": compiled.compile_s,
                              "tokens_equal_generate": same}
        print(f"target: greedy compiled marginal / generate greedy marginal "
              f"{result['compiled']['marginal_vs_generate']:.3f} (<= 0.65); its tokens equal generate's (the stock "
              f"kernels' greedy): {same}; load {load_s.get(COMPILED)} s, of which compiling {compiled.compile_s} s")
    int8_rows = [label for label in ("greedy int8 (CPU)", "greedy int8 compiled") if "marginal_ms" in table.get(label, {})]
    if int8_rows:                   # llama.cpp on the same GGUF, measured now (its own environment), or the issue's
        ref, where = LLAMA_CPP_MS, "issue 21's measurement; bench.llamacpp --install builds llama-cpp-python here"
        if llamacpp.installed():
            measured = llamacpp.measure(args.tokens, max(3, args.reps), torch.get_num_threads())
            ref, where = measured["marginal_ms"], f"llama-cpp-python {measured['version']}, measured in this run"
            result["llama_cpp"] = measured
        for label in int8_rows:
            r = table[label]["marginal_ms"] / ref
            result.setdefault("int8_vs_llama_cpp", {})[label] = round(r, 3)
            print(f"target: {label} marginal / llama.cpp marginal ({ref:.2f} ms, {where}) {r:.2f} (<= 2.0)")
    for note in notes:
        print("note:", note)
    for k in ("load_cold_s", "load_warm_s"):
        if k in result:
            print(f"{k}: {result[k]}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
