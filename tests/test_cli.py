"""The CLI contract: `declab list`, `declab run`, exports, and exit status 2 with one line for bad input."""

import json
import subprocess
import sys

import pytest

from declab.cli import main
from declab.core.trace import read_meta, read_trace
from tests.conftest import FAKE_REGISTRY, ROOT


@pytest.fixture(autouse=True)
def _fake(fake_registry):
    yield


def test_list_json_names_models_strategies_and_every_parameter(capsys):
    assert main(["list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["default_model"] == "fake"
    strategies = {s["name"]: s for s in data["strategies"]}
    assert {"greedy", "sample"} <= set(strategies)
    params = {p["name"]: p for p in strategies["sample"]["params"]}
    assert params["top_p"]["default"] == 1.0 and params["top_p"]["range"] == "(0.0, 1.0]"
    assert params["temperature"]["help"]


def test_list_text(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "fake (default)" in out and "top_k (int, default 0, range [0, 1000000])" in out


def test_run_writes_json_csv_parquet(tmp_path, capsys):
    out_json, out_csv, out_pq = tmp_path / "o.json", tmp_path / "o.csv", tmp_path / "o.parquet"
    code = main(["run", "--strategy", "sample", "--set", "temperature=0.8", "--set", "top_k=5", "--prompt", " the cat",
                 "--max-new-tokens", "12", "--seed", "7", "--json", str(out_json), "--csv", str(out_csv),
                 "--parquet", str(out_pq)])
    assert code == 0
    data = json.loads(out_json.read_text())
    assert set(data) >= {"model", "strategy", "params", "seed", "prompt_format", "sequences", "metrics", "wall_s",
                         "versions"}
    assert data["params"] == {"temperature": 0.8, "top_k": 5, "top_p": 1.0, "min_p": 0.0, "top_h": 0.0,
                              "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "repetition_penalty": 1.0,
                              "no_repeat_ngram_size": 0}
    assert data["seed"] == 7 and data["prompt_format"] == "raw"
    seq = data["sequences"][0]
    assert set(seq) == {"text", "token_ids", "score"} and 0 not in seq["token_ids"]
    assert capsys.readouterr().out.strip() == seq["text"].strip()
    meta = read_meta(tmp_path / "o.meta.json")
    frame = read_trace(out_csv, meta["columns"])
    assert frame.equals(read_trace(out_pq))
    tokens = frame[frame.kind == "token"]
    assert tokens.token_id.tolist()[: len(seq["token_ids"])] == seq["token_ids"]


def test_prompt_file_and_chat_format(tmp_path, capsys):
    prompt = tmp_path / "p.txt"
    prompt.write_text(" a dog")
    assert main(["run", "--strategy", "greedy", "--prompt-file", str(prompt), "--max-new-tokens", "3"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["run", "--strategy", "nope", "--prompt", "x"], "unknown strategy 'nope'"),
    (["run", "--model", "ghost", "--strategy", "greedy", "--prompt", "x"], "unknown model 'ghost'"),
    (["run", "--strategy", "greedy", "--prompt", ""], "prompt is empty"),
    (["run", "--strategy", "sample", "--set", "top_p=2", "--prompt", "x"], r"top_p must be in \(0.0, 1.0\], got 2"),
    (["run", "--strategy", "sample", "--set", "top_p", "--prompt", "x"], "--set expects PARAM=VALUE"),
    (["run", "--strategy", "greedy", "--set", "alpha=1", "--prompt", "x"], "greedy: unknown parameter 'alpha'"),
    (["run", "--strategy", "greedy", "--prompt", "x", "--max-new-tokens", "-3"], r"max new tokens .* \[1, 4096\]"),
    (["run", "--strategy", "greedy", "--prompt", "x", "--max-new-tokens", "ten"], "invalid int value"),
    (["run", "--strategy", "greedy", "--prompt-file", "/no/such/file"], "cannot read prompt file /no/such/file"),
    (["run", "--strategy", "greedy", "--prompt", "x", "--grammar-file", "/no/g.ebnf"], "cannot read grammar file"),
    (["run", "--strategy", "greedy", "--prompt", " the" * 600], "exceeds the context length 512"),
    (["run", "--strategy", "greedy", "--prompt", "x", "--json", "/no/dir/o.json"], "folder does not exist"),
    (["run", "--strategy", "greedy"], "one of the arguments --prompt --prompt-file is required"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_exits_2_with_one_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("declab: error: ")
    assert __import__("re").search(message, err), err


def test_exit_status_2_from_a_real_process():
    env = {"DECLAB_MODELS": str(FAKE_REGISTRY), "DECLAB_PLUGINS": "tests.fake", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "declab", "run", "--strategy", "sample", "--set", "temperature=-1",
                           "--prompt", "x"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "declab: error: sample: temperature must be in (0.0, 100.0], got -1.0"]
    assert "Traceback" not in proc.stderr


def test_hub_model_offline_fails_fast_with_its_name(monkeypatch, capsys):
    import declab.models.loading as loading
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout_s=3.0: False)
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-declab-cache")
    assert main(["run", "--model", "gpt2", "--strategy", "greedy", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "model 'gpt2' (hub openai-community/gpt2) is not available locally" in err and err.count("\n") == 1
