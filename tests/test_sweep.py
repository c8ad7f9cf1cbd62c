"""Sweeps on the scripted fake model: the grid, validation before anything runs, the summary files, the run library
tag, failures recorded while the sweep goes on, resume after a kill (exactly one row per run), metrics by their
definitions, the progress bar, the figures and the Sweeps page."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from streamlit.testing.v1 import AppTest

from declab.core import UserError
from declab.core.trace import read_trace
from declab.run.store import open_store
from declab.sweep import metrics as M
from declab.sweep.driver import SUMMARY_COLUMNS, ProgressBar, read_rows, run_sweep, tag_of
from declab.sweep.spec import parse_sweep
from tests.fake import FakeLM, hashed_logits
from tests.test_app import HOME, TIMEOUT, ok
from viz import sweep as V

ROOT = Path(__file__).resolve().parent.parent

SWEEP = """
name: fake-grid
model: fake
prompts: [" the cat", " a big red", " it was very"]
max_new_tokens: 8
seeds: [0, 1]
runs:
  - strategy: sample
    grid: {temperature: [0.5, 1.0], top_k: [0, 3]}
  - strategy: greedy
metrics: [rep_n, distinct_1, perplexity, pass_at_1]
"""


def fake_sweep(text: str = SWEEP, **kw):
    return parse_sweep(text, **kw)


def test_the_grid_is_every_combination_times_prompts_times_seeds(fake_registry):
    sw = fake_sweep()
    assert len(sw.runs) == (2 * 2 + 1) * 3 * 2
    sample = [r for r in sw.runs if r.strategy == "sample"]
    combos = {(r.params["temperature"], r.params["top_k"]) for r in sample}
    assert combos == {(0.5, 0), (0.5, 3), (1.0, 0), (1.0, 3)}
    assert sample[0].params == {"temperature": 0.5, "top_k": 0}        # the last grid key varies fastest
    assert [(r.prompt.id, r.seed) for r in sample[:6]] == [("p0", 0), ("p0", 1), ("p1", 0), ("p1", 1), ("p2", 0),
                                                          ("p2", 1)]
    assert len({r.key for r in sw.runs}) == len(sw.runs)
    # a strategy that takes a grammar decodes each grammar task with its own grammar
    g = fake_sweep("name: g\nmodel: fake\nprompts: {set: grammar, n: 2}\nruns: [gcd, sample]\nmax_new_tokens: 4")
    assert [r.params for r in g.runs if r.strategy == "gcd"] == [{"grammar": "binary_len_3"},
                                                                  {"grammar": "binary_len_5"}]
    assert all(r.params == {} for r in g.runs if r.strategy == "sample")


@pytest.mark.parametrize("change, message", [
    ("runs:\n  - strategy: nope", "runs[0].strategy: unknown strategy 'nope'"),
    ("runs:\n  - strategy: sample\n    grid: {tempurature: [1.0]}", "sample: unknown parameter 'tempurature'"),
    ("runs:\n  - strategy: sample\n    grid: {temperature: [1.0, -2]}", "temperature must be in"),
    ("runs:\n  - strategy: sample\n    grid: {}", "runs[0].grid: is empty"),
    ("runs:\n  - strategy: sample\n    grid: {temperature: []}", "runs[0].grid.temperature: the list of values is empty"),
    ("prompts: {set: poems}", "prompts.set: unknown prompt set 'poems'; sets: open-ended, chat, humaneval"),
    ("prompts: {set: chat, n: 99}", "prompts.n: must be an integer in [1, 12]"),
    ("metrics: [bleu]", "metrics[0]: unknown metric 'bleu'; metrics: rep_n, distinct_n"),
    ("seeds: []", "seeds: the list is empty"),
    ("max_new_tokens: 0", "max_new_tokens: must be an integer in [1, 4096]"),
    ("model: nope", "model: unknown model 'nope'; known models: fake"),
    ("colour: blue", "sweep file: unknown key(s) colour; keys: name, model"),
])
def test_a_bad_sweep_file_is_one_line_naming_the_field_and_the_legal_values(fake_registry, change, message):
    base = {k: v for k, v in (line.split(":", 1) for line in
                              ["name: bad", "model: fake", "prompts: [' the cat']", "max_new_tokens: 4"])}
    key = change.split(":", 1)[0]
    lines = [f"{k}:{v}" for k, v in base.items() if k != key] + [change]
    if key != "runs":
        lines.append("runs: [greedy]")
    with pytest.raises(UserError) as e:
        parse_sweep("\n".join(lines))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_cli_refuses_a_bad_file_before_anything_runs(fake_registry, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nmodel: fake\nprompts: [' the cat']\nruns:\n  - strategy: sample\n"
                   "    grid: {temperature: [1.0, 999]}\n")
    from declab.cli import main
    err = io.StringIO()
    import contextlib
    with contextlib.redirect_stderr(err):
        rc = main(["sweep", str(bad), "--out", str(tmp_path / "out")])
    assert rc == 2
    line = err.getvalue().strip()
    assert "\n" not in line and "runs[0] (sample" in line and "temperature must be in (0" in line
    assert not (tmp_path / "out").exists()


@pytest.fixture
def finished(fake_registry, tmp_path):
    sw = fake_sweep()
    res = run_sweep(sw, tmp_path / "out", backend="inline", load=lambda key: FakeLM(key=key))
    return sw, res, tmp_path / "out"


def test_summary_has_one_row_per_run_with_the_columns_then_metrics(finished):
    sw, res, out = finished
    df = pd.read_parquet(out / "summary.parquet")
    assert len(df) == len(sw.runs) == res.total and res.failed == 0 and res.missing == 0
    assert tuple(df.columns[:len(SUMMARY_COLUMNS)]) == SUMMARY_COLUMNS
    assert list(df.columns[-4:]) == ["rep_n", "distinct_1", "perplexity", "pass_at_1"]
    assert "mean_entropy_bits" in df.columns                           # the strategy's own metrics in between
    assert df["pass_at_1"].isna().all()                                # no tests in this prompt set: NA, not 0
    assert set(df["status"]) == {"ok"} and (df["sweep"] == "fake-grid").all()
    assert json.loads(df["params"].iloc[0]) == {"temperature": 0.5, "top_k": 0}
    # seeded runs are reproducible, greedy ignores the seed
    greedy = df[df["strategy"] == "greedy"]
    assert (greedy.groupby("prompt_id")["text"].nunique() == 1).all()
    # the CSV is spreadsheet-safe (the fake's vocabulary has ' =1+1', '\t', '-x'...) and reads back exact
    csv_df = read_trace(out / "summary.csv", {c: str(t) for c, t in df.dtypes.items()})
    assert csv_df["text"].tolist() == df["text"].tolist()
    raw = (out / "summary.csv").read_text(encoding="utf-8")
    assert '"=' not in raw and '"\t' not in raw


def test_every_run_is_in_the_run_library_tagged_with_the_sweep(finished):
    sw, res, out = finished
    store = open_store()
    listed = store.list(tag=tag_of("fake-grid"))
    df = res.summary
    assert sorted(r["run_id"] for r in listed) == sorted(df["run_id"])
    meta, frame = store.get(df["run_id"].iloc[3])
    assert meta["sweep"]["name"] == "fake-grid" and meta["sweep"]["key"] == sw.runs[3].key
    assert (frame["run_id"] == df["run_id"].iloc[3]).all() and (frame["kind"] == "token").any()
    assert listed[0]["source"] == "sweep"


def test_resume_after_a_kill_runs_only_what_is_missing_and_ends_with_one_row_per_run(finished):
    sw, res, out = finished
    first = res.summary.set_index("run_id")
    lines = (out / "rows.jsonl").read_text().splitlines()
    # a kill after 7 runs, in the middle of writing the 8th line; run 9 was stored but its line never written
    (out / "rows.jsonl").write_text("\n".join(lines[:7]) + "\n" + lines[7][:25])
    (out / "summary.parquet").unlink()
    calls = []

    def counting(key):
        calls.append(key)
        return FakeLM(key=key)
    again = run_sweep(sw, out, backend="inline", resume=True, load=counting)
    assert again.ran == len(sw.runs) - 7 and len(calls) == len(sw.runs) - 7
    df = pd.read_parquet(out / "summary.parquet")
    assert len(df) == len(sw.runs) and df["run_id"].is_unique
    assert df.set_index("run_id")["text"].to_dict() == first["text"].to_dict()
    assert len(read_rows(out / "rows.jsonl")) == len(sw.runs)
    assert len(open_store().list(tag=tag_of(sw.name))) == len(sw.runs)        # reruns replaced, no duplicates
    nothing = run_sweep(sw, out, backend="inline", resume=True, load=counting)
    assert nothing.ran == 0 and len(pd.read_parquet(out / "summary.parquet")) == len(sw.runs)
    with pytest.raises(UserError, match="already holds a sweep; add --resume"):
        run_sweep(sw, out, backend="inline", load=counting)


def test_a_failing_run_is_recorded_with_its_message_and_the_sweep_goes_on(fake_registry, tmp_path):
    base = hashed_logits(32)

    def logits(context):
        if 7 in context[:3]:                                         # prompts starting with ' dog' break the model
            raise RuntimeError("the fake model broke on a dog")
        return base(context)
    long_prompt = " the" * 600                                       # 600 tokens: over the fake's context of 512
    text = (f"name: fails\nmodel: fake\nprompts: [' dog ran', ' the cat', '{long_prompt}']\nmax_new_tokens: 6\n"
            "seeds: [0]\nruns: [greedy, sample]\nmetrics: [rep_n]\n")
    res = run_sweep(parse_sweep(text), tmp_path / "out", backend="inline",
                    load=lambda key: FakeLM(logits_fn=logits, key=key))
    df = res.summary.set_index(["strategy", "prompt_id"])
    assert res.failed == 4 and len(df) == 6
    assert df.loc[("greedy", "p1"), "status"] == "ok" and df.loc[("sample", "p1"), "status"] == "ok"
    assert df.loc[("greedy", "p0"), "error"] == "RuntimeError: the fake model broke on a dog"
    assert "exceeds the context length 512" in df.loc[("sample", "p2"), "error"]
    failed = open_store().get(df.loc[("greedy", "p0"), "run_id"])[0]
    assert failed["status"] == "failed" and "dog" in failed["error"]


def test_a_sigkilled_local_sweep_resumes_to_one_row_per_run(fake_registry, tmp_path):
    """The CLI with one spawned worker process, killed with SIGKILL mid-sweep; its worker notices and exits; the
    rest is finished with --resume."""
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text("name: killed\nmodel: fake\nprompts: [' the cat', ' a dog', ' it was', ' big red']\n"
                          "max_new_tokens: 12\nseeds: [0, 1]\nruns: [greedy, sample]\nmetrics: [distinct_n]\n")
    out = tmp_path / "out"
    env = dict(os.environ, DECLAB_FAKE_DELAY="0.05", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "declab", "sweep", str(sweep_file), "--out", str(out)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while len(read_rows(out / "rows.jsonl")) < 2:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no rows within 60 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    rows = read_rows(out / "rows.jsonl")
    worker = rows[0]["worker"]["pid"]
    assert worker != proc.pid and 2 <= len(rows) < 16
    deadline = time.monotonic() + 15
    while Path(f"/proc/{worker}").exists() and time.monotonic() < deadline:       # orphaned: it exits by itself
        time.sleep(0.2)
    assert not Path(f"/proc/{worker}").exists()
    res = run_sweep(parse_sweep(sweep_file.read_text()), out, backend="inline", resume=True)
    assert res.ran == 16 - len(rows) and len(res.summary) == 16 and res.summary["run_id"].is_unique
    assert set(res.summary["status"]) == {"ok"}


def test_metrics_follow_their_definitions():
    assert M.distinct_n([1, 2, 1, 2, 3], 2) == 3 / 4                # windows 12 21 12 23
    assert M.rep_n([1, 2, 1, 2, 3], 2) == 1 / 4
    assert M.distinct_n([5], 2) is None and M.rep_n([], 1) is None
    assert M.distinct_n([4, 4, 4], 1) == 1 / 3
    lm = FakeLM()
    prompt, gen = [1, 2], [3, 4, 5]
    want = 0.0
    for i, t in enumerate(gen):
        want += float(torch.log_softmax(lm.logits_fn(prompt + gen[:i]), -1)[t])
    assert M.perplexity(lm, prompt, gen) == pytest.approx(math.exp(-want / 3), rel=1e-5)
    assert M.perplexity(lm, prompt, []) is None
    from declab.sweep import code
    problem = code.problems()["HumanEval/0"]
    right = "```python\n" + problem["prompt"] + problem["canonical_solution"] + "```"
    assert M.pass_at_1("HumanEval/0", right) == 1.0
    assert M.pass_at_1("HumanEval/0", "```python\ndef has_close_elements(numbers, threshold):\n    return 1\n```") == 0.0
    assert M.pass_at_1(None, right) is None


def test_progress_bar_shows_runs_done_and_an_eta_on_a_terminal_only():
    class Tty(io.StringIO):
        def isatty(self):
            return True
    quiet = io.StringIO()
    ProgressBar("s", 10, 0, quiet).update("ok")
    assert quiet.getvalue() == ""
    tty = Tty()
    bar = ProgressBar("s", 10, 4, tty)
    bar.update("ok")
    bar.update("failed")
    assert "6/10 runs (1 failed)" in tty.getvalue() and "ETA" in tty.getvalue()


def test_figures_lines_bands_heatmap_and_frontier(finished):
    _, res, _ = finished
    df = res.summary
    assert V.param_names(df) == ["temperature", "top_k"]
    fig = V.metric_vs_param(df, "distinct_1", "temperature")
    band, line, runs = fig.data[0], fig.data[1], fig.data[2]
    d = df[(df["strategy"] == "sample")].assign(t=V.with_params(df)["param.temperature"])
    per_seed = d.groupby(["t", "seed"])["distinct_1"].mean()
    assert list(line.y) == pytest.approx(list(per_seed.groupby("t").mean()))
    assert max(band.y) == pytest.approx(per_seed.max())
    assert set(runs.customdata[:, 0]) <= set(df["run_id"])
    heat = V.grid_heatmap(df, "perplexity", "sample", "temperature", "top_k").data[0]
    cell = d[(d["t"] == 1.0) & (d["params"].str.contains('"top_k": 3'))]["perplexity"].mean()
    assert heat.z[list(heat.y).index("3")][list(heat.x).index("1.0")] == pytest.approx(cell)
    pts = pd.DataFrame({"x": [1, 2, 3, 2], "y": [1, 2, 3, 1]})
    assert V.frontier(pts, "x", "y", True, False).values.tolist() == [[2, 1], [3, 3]]
    par = V.pareto(df, "distinct_1", "perplexity")
    assert len(par.data[0].x) == 4 and par.data[-1].name == "Pareto frontier"      # four sample settings


def test_sweeps_page_shows_the_table_plots_and_opens_a_run_in_the_trace_explorer(finished, monkeypatch):
    _, res, out = finished
    monkeypatch.setenv("DECLAB_SWEEPS", str(out.parent))
    at = ok(AppTest.from_file(str(HOME), default_timeout=TIMEOUT).run())
    at = ok(at.switch_page("views/sweeps.py").run())
    assert not at.exception
    assert any(len(d.value) == len(res.summary) for d in at.dataframe)
    rid = res.summary["run_id"].iloc[5]
    at.session_state["sweeps:picked"] = rid
    at = ok(at.run())
    assert any(res.summary["text"].iloc[5] == c.value for c in at.code)
    at = ok(at.button(key="sw:open").click().run())
    assert not at.exception and not at.error
    assert [t.value for t in at.title] == ["Trace explorer"]
    assert at.session_state["declab_last"]["explorer"] == rid                      # opened from the run library
    assert rid in [r.run_id for r in at.session_state["declab_runs"]]
