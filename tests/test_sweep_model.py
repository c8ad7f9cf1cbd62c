"""A small sweep on the embedded model with both backends: local (one spawned worker process) and Ray (a local
cluster on 127.0.0.1, started by the CLI for the sweep and stopped after; the whole Ray run bounded by a timeout).
Deterministic strategies give the same summary on both. Grammar validity on the embedded tokenizer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from declab.run.store import open_store
from declab.sweep import metrics as M
from declab.sweep.driver import run_sweep, tag_of
from declab.sweep.spec import parse_sweep

pytestmark = pytest.mark.model

ROOT = Path(__file__).resolve().parent.parent
RAY_TIMEOUT_S = 90
SWEEP = """
name: embedded-small
model: smollm2-135m-instruct
prompts: {set: chat, n: 2}
max_new_tokens: 8
seeds: [0]
runs:
  - strategy: greedy
  - strategy: contrastive_search
    params: {penalty_alpha: 0.6, top_k: 4}
metrics: [rep_n, distinct_n, perplexity]
"""


def test_local_and_ray_backends_give_the_same_summary(tmp_path):
    pytest.importorskip("ray")
    sweep_file = tmp_path / "small.yaml"
    sweep_file.write_text(SWEEP)
    local = run_sweep(parse_sweep(SWEEP), tmp_path / "local", backend="local", workers=1).summary
    assert len(local) == 4 and set(local["status"]) == {"ok"}
    assert (local["new_tokens"] > 0).all() and local["perplexity"].gt(1).all()

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "declab", "sweep", str(sweep_file), "--out", str(tmp_path / "ray"),
                             "--backend", "ray", "--workers", "1"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=RAY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)                      # the CLI and the Ray it started
        proc.communicate()
        pytest.fail(f"the Ray sweep did not finish within {RAY_TIMEOUT_S} s")
    assert proc.returncode == 0, stderr.decode()[-2000:]
    ray = pd.read_parquet(tmp_path / "ray" / "summary.parquet")
    same = ["strategy", "params", "prompt_id", "seed", "status", "new_tokens", "text", "rep_n", "distinct_n"]
    pd.testing.assert_frame_equal(local[same], ray[same])
    assert ray["perplexity"].tolist() == pytest.approx(local["perplexity"].tolist(), rel=1e-4)
    stored = open_store().list(tag=tag_of("embedded-small"))
    assert len(stored) == 8 and {r["source"] for r in stored} == {"sweep"}    # both sweeps' traces, on the driver


def test_grammar_validity_on_the_embedded_tokenizer(real_lm):
    assert M.grammar_valid(real_lm, "binary_len_3", real_lm.tokenizer.encode("101", add_special_tokens=False)) == 1.0
    assert M.grammar_valid(real_lm, "binary_len_3", real_lm.tokenizer.encode("10", add_special_tokens=False)) == 0.0
    assert M.grammar_valid(real_lm, None, []) is None
