"""The drafter observatory (issue 17 item 6) on the scripted fake model: `declab drafters` (summary table and CSV,
one trace per drafter, every run in the run library, every drafter's output the greedy output at temperature 0,
bad input exits 2 with one line), the shared logic in declab/run/observatory.py, and the app page."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from declab.cli import main
from declab.core import UserError
from declab.core.trace import read_meta, read_trace
from declab.run import Run, RunRequest, get_lm
from declab.run import observatory as obs
from declab.models.registry import load_registry
from declab.run.store import open_store
from strategies.spec_tree import SpecTree

ROOT = Path(__file__).resolve().parent.parent
HOME = ROOT / "app" / "Home.py"
PROMPT = " the cat"
DRAFTERS = ["model", "aded", "prompt_lookup"]


def greedy_ids(n: int) -> list[int]:
    lm = get_lm("fake")
    res = Run(lm, RunRequest(model="fake", strategy="greedy", prompt=PROMPT, max_new_tokens=n)).run_to_end()
    return res.sequences[0].token_ids


def test_cli_drafters_summary_traces_library_and_greedy_outputs(fake_registry, tmp_path, capsys):
    out = tmp_path / "sum.csv"
    code = main(["drafters", "--prompt", PROMPT, "--drafters", ",".join(DRAFTERS), "--max-new-tokens", "12",
                 "--csv", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert all(d in printed for d in DRAFTERS) and "acceptance_rate" in printed

    summary = obs.read_summary_csv(out)
    assert list(summary.columns) == list(obs.SUMMARY_COLUMNS)
    assert summary["drafter"].tolist() == DRAFTERS and set(summary["status"]) == {"ok"}
    assert (summary["new_tokens"] == 12).all()
    assert (summary["target_forwards"] == summary["rounds"]).all() and (summary["mean_accepted_length"] >= 1).all()
    assert summary["speedup"].notna().all() and summary["spec_ms"].notna().all()

    greedy = greedy_ids(12)
    stored = {r["run_id"] for r in open_store().list()}
    for drafter, run_id in zip(summary["drafter"], summary["run_id"]):
        trace = tmp_path / f"sum-{drafter}.csv"
        meta = read_meta(tmp_path / f"sum-{drafter}.meta.json")
        frame = read_trace(trace, meta["columns"])
        assert meta["run_id"] == run_id and meta["strategy"] == "spec_tree"
        assert meta["params"]["drafter"] == drafter and meta["seed"] == 0
        assert meta["sequences"][0]["token_ids"] == greedy              # temperature 0: the target's greedy text
        assert frame["token_id"][frame["kind"] == "token"].tolist()[:12] == greedy
        assert run_id in stored
    assert len(stored) == len(DRAFTERS)


def test_cli_drafters_traces_dir_shared_params_and_no_store(fake_registry, tmp_path, capsys):
    traces = tmp_path / "traces"
    code = main(["drafters", "--prompt", PROMPT, "--drafters", "lookahead, token_recycling", "--max-new-tokens", "8",
                 "--set", "tree_budget=4", "--set", "measure_speedup=false", "--seed", "3", "--traces", str(traces),
                 "--no-store"])
    assert code == 0
    assert sorted(p.name for p in traces.iterdir()) == ["lookahead.csv", "lookahead.meta.json",
                                                         "token_recycling.csv", "token_recycling.meta.json"]
    for d in ("lookahead", "token_recycling"):
        meta = json.loads((traces / f"{d}.meta.json").read_text())
        assert meta["params"]["tree_budget"] == 4 and meta["params"]["drafter"] == d and meta["seed"] == 3
        assert meta["metrics"].get("speedup") is None
    assert open_store().list() == []


def test_ctrl_c_stops_the_current_drafter_skips_the_rest_and_keeps_them(fake_registry, monkeypatch, tmp_path,
                                                                        capsys):
    original = SpecTree.run

    def run(self, ctx, cfg):                       # Ctrl-C after aded's third round
        gen, n = original(self, ctx, cfg), 0
        try:
            while True:
                ev = gen.send(None)
                n += 1
                if cfg.drafter == "aded" and n == 3:
                    os.kill(os.getpid(), signal.SIGINT)
                yield ev
        except StopIteration as done:
            return done.value

    monkeypatch.setattr(SpecTree, "run", run)
    before = signal.getsignal(signal.SIGINT)
    out = tmp_path / "s.csv"
    assert main(["drafters", "--prompt", PROMPT, "--drafters", ",".join(DRAFTERS), "--max-new-tokens", "12",
                 "--csv", str(out)]) == 130
    assert signal.getsignal(signal.SIGINT) is before
    err = capsys.readouterr().err
    assert err.startswith("declab: interrupted") and err.count("\n") == 1
    summary = obs.read_summary_csv(out)
    assert summary["status"].tolist() == ["ok", "stopped", "stopped"]
    assert summary["new_tokens"].tolist()[0] == 12 and summary["new_tokens"].tolist()[2] == 0
    stored = {r["run_id"]: r["status"] for r in open_store().list()}
    assert stored == dict(zip(summary["run_id"], summary["status"]))


@pytest.mark.parametrize("argv, message", [
    (["--drafters", "model,oracle"], "unknown drafter 'oracle'; the drafters are: model, aded, token_recycling, "
                                     "lookahead, prompt_lookup"),
    (["--drafters", "aded,aded"], "drafter 'aded' is listed twice"),
    (["--drafters", ","], "no drafters given"),
    (["--set", "drafter=aded"], "the drafter is chosen per run"),
    (["--set", "tree_budget=99"], r"drafter model: spec_tree: tree_budget must be in \[1, 64\]"),
    (["--set", "temperature=0", "--set", "verify=rsd"], "drafter model: spec_tree: verify must be auto or greedy"),
    (["--model", "ghost"], "drafter model: unknown model 'ghost'"),
    (["--csv", "/no/such/dir/s.csv"], "folder does not exist"),
])
def test_bad_input_exits_2_with_one_line_before_any_run(fake_registry, capsys, argv, message):
    assert main(["drafters", "--prompt", PROMPT, "--max-new-tokens", "4"] + argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("declab: error: ") and re.search(message, err), err
    assert open_store().list() == []


def test_drafter_requests_share_everything_but_the_drafter(fake_registry):
    reqs = obs.drafter_requests("fake", PROMPT, "aded, model", max_new_tokens=5, seed=9,
                                params={"tree_depth": 3}, prompt_format="raw")
    assert [label for label, _ in reqs] == ["aded", "model"]
    for label, req in reqs:
        assert req.strategy == "spec_tree" and req.params == {"tree_depth": 3, "drafter": label}
        assert (req.model, req.prompt, req.seed, req.max_new_tokens, req.prompt_format) == ("fake", PROMPT, 9, 5,
                                                                                            "raw")
    with pytest.raises(UserError, match="drafter aded: spec_tree: unknown parameter 'nope'"):
        obs.drafter_requests("fake", PROMPT, ["aded"], params={"nope": 1})


def test_summary_frame_rows_and_spreadsheet_safe_csv(tmp_path):
    meta = {"run_id": "abc", "status": "ok", "wall_s": 0.5,
            "metrics": {"new_tokens": 4, "rounds": 2, "target_forwards": 2, "acceptance_rate": 0.5, "speedup": None}}
    frame = obs.summary_frame([("=aded", meta), ("model", None), ("lookahead", None, "error")])
    assert list(frame.columns) == list(obs.SUMMARY_COLUMNS)
    assert frame["status"].tolist() == ["ok", "not run", "error"]
    assert frame.loc[0, "rounds"] == 2 and frame["speedup"].isna().all()
    path = tmp_path / "s.csv"
    obs.write_summary_csv(frame, path)
    text = path.read_text()
    assert '"\'=aded"' in text                                       # a formula-like cell is defused
    assert obs.read_summary_csv(path).equals(frame)
    assert obs.summary_csv_bytes(frame).decode() == text


# ------------------------------------------------------------------------------------------------ the app page
def test_app_page_runs_two_drafters_and_shows_the_summary(fake_registry):
    at = AppTest.from_file(str(HOME), default_timeout=90).run()
    at.switch_page("views/drafters.py").run()
    assert not at.exception, [e.value for e in at.exception]
    # every drafter the fake model can run is preselected; the trained-head ones need weights it has not got
    usable = list(obs.usable_drafters(load_registry().get("fake")))
    assert at.multiselect(key="drf:drafters").value == usable
    assert set(obs.legal_drafters()) - set(usable) == {"medusa", "hydra", "eagle", "kangaroo"}
    assert "drf:drafter" not in [w.key for w in at.selectbox]         # the drafter is not a shared setting
    at.multiselect(key="drf:drafters").set_value(["aded", "prompt_lookup"])
    at.number_input(key="drf:max_new_tokens").set_value(10)
    at.checkbox(key="drf:measure_speedup").uncheck()
    at.button(key="drf:go").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not [e.value for e in at.error]
    runs = at.session_state["declab_runs"]
    assert [r.meta["params"]["drafter"] for r in runs] == ["aded", "prompt_lookup"]
    assert len({r.text for r in runs}) == 1                           # temperature 0: the same (greedy) text
    summary = next(d.value for d in at.dataframe if list(d.value.columns) == list(obs.SUMMARY_COLUMNS))
    assert summary["drafter"].tolist() == ["aded", "prompt_lookup"] and set(summary["status"]) == {"ok"}
    assert summary["run_id"].tolist() == [r.run_id for r in runs]
    assert "Summary CSV" in [d.label for d in at.get("download_button")]
    stored = {r["run_id"] for r in open_store().list()}
    assert {r.run_id for r in runs} <= stored
    picker = at.get("button_group")[0]                                # open the second drafter's run
    assert picker.value == "aded"
    picker.set_value("prompt_lookup").run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.get("button_group")[0].value == "prompt_lookup"
    opened = [t.value for t in at.text if t.value.startswith("spec_tree on fake")]
    assert len(opened) == 1 and '"drafter": "prompt_lookup"' in opened[0]
