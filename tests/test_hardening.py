"""Issue 23 (hardening), on the scripted fake model: nothing untrusted is interpreted as markdown, table CSVs are
spreadsheet-safe (header names and categorical columns too), the app's file fields stay in the corpus folder with
bounded walks, imports are validated, every failure is one line with exit status 2 (output paths, a non-UTF-8
models.yaml, damaged store pages, a broken pipe, a locked store), strategy-specific flags and non-finite n-gram
weights are refused, and `declab run` shows a progress bar on a terminal only. The browser half (a run survives its
page, Stop shows at once, /run, no outside assets) is tests/test_browser.py."""

from __future__ import annotations

import csv
import io
import json
import os
import pty
import re
import select
import sqlite3
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from declab.cli import main
from declab.core import UserError
from declab.run.store import open_store
from tests.conftest import FAKE_REGISTRY, ROOT

APP = ROOT / "app"
HOSTILE = "**bold** [link](http://evil.example/x) ![img](http://evil.example/i.png) <b>b</b> $x^2$"


@pytest.fixture(autouse=True)
def _fake_models(fake_registry):
    """Every test here runs on tests/data/models-fake.yaml (the scripted fake is the default model)."""


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(code: int, err: str, pattern: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("declab: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), lines[0]


def store_fake_run(fake_lm, n: int = 6, **meta) -> dict:
    from declab.run import Run, RunRequest
    result = Run(fake_lm, RunRequest(model="fake", strategy="greedy", prompt="the cat", max_new_tokens=n)).run_to_end()
    result.meta.update(meta)
    open_store().save(result, source="test")
    return result.meta


# ---------------------------------------------------------------------------------------------- 2. plain text
SHOW_RUN = f"""
import sys
sys.path.insert(0, {str(APP)!r})
import pandas as pd
import common, render
from declab.core import trace as tr
frame = pd.DataFrame({{"kind": ["token", "token"], "step": [0, 1], "token_text": [" a", " b"],
                      "logprob": [-0.5, -1.0]}})
for col, dtype in tr.BASE_DTYPES.items():
    if col not in frame:
        frame[col] = pd.Series([None] * len(frame), index=frame.index, dtype=dtype)
meta = {{"run_id": "r1", "status": "failed", "error": {HOSTILE!r}, "strategy": {HOSTILE!r}, "model": {HOSTILE!r},
        "metrics": {{"perplexity": {HOSTILE!r}, "tokens_per_s": "![i](http://evil.example/m.png)"}},
        "sequences": [{{"text": "x", "token_ids": [1], "score": {HOSTILE!r}}}, {{"text": "y", "token_ids": [2]}}]}}
render.show_run(common.RunRecord(meta=meta, frame=frame, label="hostile"), key="h", export=False)
"""


def markdown_sources(at: AppTest) -> list[str]:
    """The markdown text of every element Streamlit renders as markdown (metric values included)."""
    kinds = ("markdown", "caption", "error", "warning", "info", "success")
    out = [e.value for kind in kinds for e in getattr(at, kind)]
    out += [m.value for m in at.metric] + [m.label for m in at.metric]
    return [str(v) for v in out]


def test_run_text_from_a_file_is_never_markdown():
    """Strategy, model, error, metric values and scores of an imported run render as the characters they are: no
    bold, no link, no image URL for the browser to fetch (today a metric value is markdown)."""
    at = AppTest.from_string(SHOW_RUN, default_timeout=30).run()
    assert not at.exception, [e.value for e in at.exception]
    sources = markdown_sources(at)
    assert any("evil" in s for s in sources), sources                 # the hostile values are shown...
    for s in sources:                                                  # ...with every markdown character escaped
        assert not re.search(r"(?<!\\)(\*\*|!\[|\]\(|<b>|\$)", s), s


def test_plain_escapes_every_markdown_construct():
    sys.path.insert(0, str(APP))
    import common
    text = common.plain(HOSTILE + " www.evil.example :red[x] a_b_c `code` # h")
    assert not re.search(r"(?<!\\)[*\[\]()!<>$`#_]", text), text
    assert text.replace("\\", "") == HOSTILE + " www.evil.example :red[x] a_b_c `code` # h"


# ---------------------------------------------------------------------------------------------- 2. table CSVs
def test_table_csv_neutralises_formulas_in_cells_headers_and_categories():
    sys.path.insert(0, str(APP))
    import exports
    table = pd.DataFrame({"=HYPERLINK(\"http://evil\")": ["=1+1", "ok"],
                          "cat": pd.Categorical(["@SUM(A1)", "-2+3"]),
                          "tab": ["\tcmd", "\rcmd"], "n": [-1, 2]})
    rows = list(csv.reader(io.StringIO(exports.table_csv_bytes(table).decode("utf-8"))))
    header, body = rows[0], rows[1:]
    assert header[0] == "'=HYPERLINK(\"http://evil\")", header
    for row in body:
        for cell, col in zip(row, header):
            if col != "n":
                assert not cell.startswith(("=", "+", "-", "@", "\t", "\r", "\n")), (col, cell)
    assert [r[3] for r in body] == ["-1", "2"]                          # numbers are never touched


def test_trace_csv_with_hostile_headers_and_categories_reads_back_exactly(tmp_path):
    from declab.core import trace as tr
    frame = pd.DataFrame({"kind": ["token"], "step": [0], "token_text": ["=x"], "logprob": [-1.0],
                          "=cmd": ["+y"], "c": pd.Categorical(["@z"])})
    path = tmp_path / "t.csv"
    tr.write_csv(frame, path)
    header = path.read_text().splitlines()[0]
    assert '"\'=cmd"' in header, header
    back = tr.read_trace(path, tr.column_dtypes(frame))
    assert list(back.columns) == list(frame.columns)
    assert back["=cmd"].tolist() == ["+y"] and back["c"].astype(str).tolist() == ["@z"]


def test_streamlit_own_table_download_is_off_and_reruns_do_not_stop_scripts():
    """app/.streamlit/config.toml (Streamlit's script-level config for app/Home.py): no toolbar CSV download, and a
    rerun waits for the script's next Streamlit call (so the run follower sees StopException only on Stop)."""
    import tomllib
    config = tomllib.loads((APP / ".streamlit" / "config.toml").read_text())
    assert config["client"]["disableDataExport"] is True
    assert config["runner"]["fastReruns"] is False
    assert config["browser"]["gatherUsageStats"] is False


# ---------------------------------------------------------------------------------------------- 3. server paths
def test_app_paths_are_confined_to_the_corpus_folder(tmp_path, monkeypatch):
    from declab.core.corpus import confine, confine_params
    root = tmp_path / "corpora"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.txt").write_text("the cat sat")
    (root / "out").symlink_to("/etc")
    monkeypatch.setenv("DECLAB_CORPUS_DIR", str(root))
    assert confine("sub/a.txt", "ngram_corpus") == str(root / "sub" / "a.txt")
    assert confine(str(root / "sub"), "ngram_corpus") == str(root / "sub")
    for outside in ("/etc/passwd", "../../etc/passwd", "sub/../../x", "out/passwd", "~/.ssh/id_rsa"):
        with pytest.raises(UserError, match="corpus folder") as e:
            confine(outside, "ngram_corpus")
        assert "/etc" not in str(e.value) and str(tmp_path) not in str(e.value)
    assert confine_params({"ngram_corpus": "", "alpha": 0.5}) == {"ngram_corpus": "", "alpha": 0.5}


def test_corpus_folder_walks_are_bounded(tmp_path, monkeypatch):
    from declab.core import corpus
    for i in range(12):
        (tmp_path / f"d{i}").mkdir()
        (tmp_path / f"d{i}" / "x.txt").write_text("text")
    monkeypatch.setattr(corpus, "MAX_WALK_ENTRIES", 10)
    with pytest.raises(UserError, match="more than 10 entries"):
        corpus.corpus_identity(str(tmp_path))
    monkeypatch.setattr(corpus, "MAX_WALK_ENTRIES", 1000)
    monkeypatch.setattr(corpus, "MAX_CORPUS_FILES", 5)
    with pytest.raises(UserError, match="more than 5 text files"):
        corpus.corpus_identity(str(tmp_path))


def test_run_page_refuses_a_server_path(fake_registry, tmp_store, tmp_path, monkeypatch):
    """A path typed into the superposed form outside the corpus folder: one message, nothing decoded or stored."""
    from tests.test_app import HOME, TIMEOUT
    monkeypatch.setenv("DECLAB_CORPUS_DIR", str(tmp_path / "corpora"))
    at = AppTest.from_file(str(HOME), default_timeout=TIMEOUT).run()
    at.selectbox(key="run:strategy").set_value("superposed").run()
    at.text_input(key="run:superposed:ngram_corpus").set_value("/etc/hostname").run()
    at.button(key="run:go").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("corpus folder" in e.value for e in at.error), [e.value for e in at.error]
    assert open_store().count() == 0


# ---------------------------------------------------------------------------------------------- 4. imports
def write_export(folder: Path, meta: dict, frame: pd.DataFrame | None = None) -> Path:
    from declab.core import trace as tr
    frame = frame if frame is not None else pd.DataFrame({"kind": ["token"], "step": [0], "token_text": [" a"],
                                                          "logprob": [-0.1]})
    path = folder / "t.csv"
    tr.write_csv(frame, path)
    (folder / "t.meta.json").write_text(json.dumps(meta))
    return path


@pytest.mark.parametrize("meta, field", [
    ({"run_id": "../../etc/x"}, "run_id"), ({"run_id": "a" * 65}, "run_id"), ({"run_id": 7}, "run_id"),
    ({"status": "pwned"}, "status"), ({"sequences": "text"}, "sequences"), ({"sequences": ["x"]}, "sequences"),
    ({"sequences": [{"token_ids": ["1"]}]}, r"sequences\[0\]\.token_ids"), ({"metrics": [1]}, "metrics"),
    ({"params": "a=1"}, "params"), ({"seed": "7"}, "seed"), ({"wall_s": "1 s"}, "wall_s"),
    ({"strategy": {"x": 1}}, "strategy"), ({"max_new_tokens": 1.5}, "max_new_tokens"),
])
def test_imported_metadata_is_validated(tmp_path, capsys, meta, field):
    trace = write_export(tmp_path, meta)
    code, _, err = cli(capsys, "runs", "import", str(trace))
    one_error_line(code, err, f"field '{field}'")
    assert open_store().count() == 0


def test_a_trace_with_only_the_documented_columns_imports_and_renders(tmp_path, capsys):
    import viz
    from declab.core.metrics import summarize
    frame = pd.DataFrame({"kind": ["token", "token"], "step": [0, 1], "token_text": [" a", "=b"],
                          "logprob": [-0.1, -2.0]})
    trace = write_export(tmp_path, {"run_id": "only-four", "strategy": "greedy"}, frame)
    code, out, err = cli(capsys, "runs", "import", str(trace))
    assert code == 0 and out.strip() == "only-four", err
    meta, back = open_store().get("only-four")
    assert back["token_text"].tolist() == [" a", "=b"]
    summarize(back)
    viz.figures_for(back, meta)
    at = AppTest.from_string(SHOW_RUN.replace("render.show_run(common.RunRecord(meta=meta",
                                              "render.show_run(common.RunRecord(meta={'run_id': 'only-four'}"),
                             default_timeout=30).run()
    assert not at.exception, [e.value for e in at.exception]


def test_zip_entries_are_built_from_safe_names():
    from declab.run.store import bundle_bytes
    frame = pd.DataFrame({"kind": ["token"], "step": [0], "token_text": ["a"], "logprob": [-0.1]})
    data = bundle_bytes([({"run_id": "../../x", "strategy": "../../../etc/cron.d/evil"}, frame),
                         ({"run_id": "ok_1", "strategy": "a/b\\c"}, frame)], "csv")
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    assert all("/" not in n and "\\" not in n and not n.startswith(".") for n in names), names


def test_terminal_output_has_no_control_characters_from_stored_data(fake_lm, capsys):
    esc = "\x1b[2J\x1b]0;pwned\x07\r"
    meta = store_fake_run(fake_lm, strategy=f"greedy{esc}", model=f"fake{esc}", error=f"boom{esc}",
                          prompt=f"p{esc}", sequences=[{"text": f"t{esc}\nline 2", "token_ids": [1]}])
    for argv in (("runs", "show", meta["run_id"]), ("runs", "list")):
        code, out, err = cli(capsys, *argv)
        assert code == 0, err
        assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", out), repr(out)
    assert "line 2" in cli(capsys, "runs", "show", meta["run_id"])[1]


# ---------------------------------------------------------------------------------------------- 5. failures
def unwritable_folder(tmp_path: Path) -> Path:
    if os.geteuid() == 0:                       # root writes through file modes; sysfs refuses new files
        return Path("/sys")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


@pytest.mark.parametrize("flag", ["--csv", "--json", "--html", "--parquet"])
def test_unwritable_output_paths_are_one_line_and_the_run_is_stored(fake_registry, tmp_path, capsys, flag):
    base = ["run", "--strategy", "greedy", "--prompt", "the cat", "--max-new-tokens", "3", "--quiet"]
    code, _, err = cli(capsys, *base, flag, str(unwritable_folder(tmp_path) / "x.out"))
    one_error_line(code, err, r"cannot write .*x\.out: .*the run is stored as [0-9a-f]+")
    assert open_store().count() == 1
    code, _, err = cli(capsys, *base, flag, str(tmp_path))                  # a folder: refused before decoding
    one_error_line(code, err, "it is a folder")
    assert open_store().count() == 1
    if Path("/dev/full").exists():
        code, _, err = cli(capsys, *base, flag, "/dev/full")
        one_error_line(code, err, "No space left on device.*stored as")
        assert open_store().count() == 2


def test_runs_export_to_a_full_disk_is_one_line(fake_lm, capsys, tmp_path):
    run_id = store_fake_run(fake_lm)["run_id"]
    target = "/dev/full" if Path("/dev/full").exists() else str(unwritable_folder(tmp_path) / "x.csv")
    one_error_line(*cli(capsys, "runs", "export", run_id, "--json", target)[::2], "cannot write")
    one_error_line(*cli(capsys, "runs", "export", run_id, "--html", str(tmp_path))[::2], "it is a folder")


def test_models_yaml_that_is_not_utf8_is_one_line(tmp_path, capsys, monkeypatch):
    path = tmp_path / "models.yaml"
    path.write_bytes(b"models:\n  x:\n    source: {hub: caf\xe9}\n")
    monkeypatch.setenv("DECLAB_MODELS", str(path))
    one_error_line(*cli(capsys, "list")[::2], "not UTF-8")


def test_models_yaml_that_is_not_utf8_is_a_message_in_the_app(tmp_path, monkeypatch):
    from tests.test_app import HOME, TIMEOUT
    path = tmp_path / "models.yaml"
    path.write_bytes(b"models:\n  x:\n    source: {hub: caf\xe9}\n")
    monkeypatch.setenv("DECLAB_MODELS", str(path))
    at = AppTest.from_file(str(HOME), default_timeout=TIMEOUT).run()
    assert not at.exception, [e.value for e in at.exception]
    msgs = [e.value for e in at.error]
    assert any("not UTF" in m for m in msgs) and not any(str(tmp_path) in m for m in msgs), msgs


def damage(run_id: str, column: str) -> None:
    with sqlite3.connect(open_store().path) as c:
        if column == "trace":
            c.execute("UPDATE traces SET data = ? WHERE run_id = ?", (b"PAR1\x00garbage", run_id))
        else:
            c.execute("UPDATE runs SET meta = ? WHERE run_id = ?", ("{not json", run_id))


@pytest.mark.parametrize("column", ["trace", "meta"])
def test_damaged_store_pages_are_one_line(fake_lm, capsys, tmp_path, column):
    good = store_fake_run(fake_lm)["run_id"]
    bad = store_fake_run(fake_lm)["run_id"]
    damage(bad, column)
    for argv in (("runs", "show", bad), ("runs", "export", bad, "--csv", str(tmp_path / "x.csv")),
                 ("runs", "export", bad, good, "--dir", str(tmp_path))):
        one_error_line(*cli(capsys, *argv)[::2], f"run {bad} is damaged")
    assert cli(capsys, "runs", "show", good)[0] == 0                      # the other runs stay readable


def test_damaged_run_in_the_library_is_a_message(fake_registry, fake_lm):
    from tests.test_app import HOME, TIMEOUT
    bad = store_fake_run(fake_lm)["run_id"]
    damage(bad, "trace")
    at = AppTest.from_file(str(HOME), default_timeout=TIMEOUT).run()
    at = at.switch_page("views/library.py").run()
    at.multiselect(key="lib:sel").set_value([bad]).run()
    at.button(key="lib:open").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("is damaged" in e.value for e in at.error), [e.value for e in at.error]


def test_broken_pipe_is_one_line(fake_lm):
    for i in range(3):
        store_fake_run(fake_lm)
    proc = subprocess.Popen([sys.executable, "-m", "declab", "runs", "list", "--json"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()                                   # the reader is gone before anything is written: EPIPE
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 2, err
    assert err.strip() == "declab: error: output closed before it was all written (broken pipe)", err


def test_locked_store_is_said_at_once(fake_lm, capsys, monkeypatch):
    from declab.run import store
    run_id = store_fake_run(fake_lm)["run_id"]
    monkeypatch.setattr(store, "LOCK_NOTICE_S", 0.2)
    monkeypatch.setattr(store, "BUSY_TIMEOUT_S", 1.5)
    holder = sqlite3.connect(open_store().path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")                      # another process writing and never finishing
    try:
        t0 = time.monotonic()
        code, _, err = cli(capsys, "runs", "tag", run_id, "--add", "x")
        took = time.monotonic() - t0
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert "is locked by another process; waiting up to 2 s" in err.splitlines()[0], err
    one_error_line(code, err, "is locked by another process .*waited")
    assert took < 10


# ---------------------------------------------------------------------------------------------- 6. parameters, flags
def test_non_finite_ngram_weights_are_refused(fake_registry, capsys):
    for bad in ("inf,0.1", "0.1,nan", "-inf"):
        code, _, err = cli(capsys, "run", "--strategy", "superposed", "--prompt", "the cat", "--max-new-tokens", "2",
                           "--set", f"ngram_weights={bad}")
        one_error_line(code, err, "ngram_weights must be 1 to 6 finite non-negative numbers")
    assert open_store().count() == 0


def test_strategy_specific_flags_are_refused_where_unused(fake_registry, capsys, tmp_path):
    grammar = tmp_path / "g.ebnf"
    grammar.write_text('root ::= "a"')
    code, _, err = cli(capsys, "run", "--strategy", "greedy", "--prompt", "the cat", "--grammar-file", str(grammar))
    one_error_line(code, err, r"--grammar-file is not used by strategy 'greedy'.*asap.*gcd")
    code, _, err = cli(capsys, "run", "--strategy", "sample", "--prompt", "the cat", "--lame-prompt", "x")
    one_error_line(code, err, r"--lame-prompt is not used by strategy 'sample'.*uscd")
    assert open_store().count() == 0


# ---------------------------------------------------------------------------------------------- 7. progress
class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


class Tty(io.StringIO):
    def isatty(self):
        return True


def drive(run, stream) -> tuple[list[str], "object"]:
    from declab.run.progress import ProgressBar
    clock = Clock()
    bar = ProgressBar(run, stream, clock=clock)
    for _ in run.events():
        clock.t += 0.5
        bar.update()
    bar.close()
    return stream.getvalue() if hasattr(stream, "getvalue") else "", bar


def test_progress_bar_tokens_rate_and_eta_on_a_terminal_only(fake_lm):
    from declab.run import Run, RunRequest

    def run():
        return Run(fake_lm, RunRequest(model="fake", strategy="sample", prompt="the cat", max_new_tokens=8, seed=1))
    text, _ = drive(run(), Tty())
    frames = [f for f in text.split("\r\x1b[K") if f]
    assert frames and re.match(r"\[#+\.*\] \d/8 tokens · 2\.0 tok/s · ETA \d+\.\d s", frames[-1]), frames
    assert re.search(r"\] 4/8 tokens · 2\.0 tok/s · ETA 2\.0 s", text), frames
    assert text.endswith("\r\x1b[K")                                        # the line is cleared at the end
    silent, _ = drive(run(), io.StringIO())
    assert silent == ""


def test_progress_bar_counts_samples_for_sampling_strategies(fake_lm):
    from declab.run import Run, RunRequest
    run = Run(fake_lm, RunRequest(model="fake", strategy="asap", prompt="the cat", max_new_tokens=6, seed=0,
                                  grammar='root ::= (" the" | " cat" | " sat")+', params={"num_samples": 3}))
    text, _ = drive(run, Tty())
    assert re.search(r"sample [23]/3 \([12] done\) · \d+ tokens · [\d.]+ tok/s · ETA \d+\.\d s", text), text


def test_declab_run_draws_the_bar_on_a_terminal_stderr(tmp_path):
    """A real terminal (a pty) for stderr: the bar is drawn there and stdout keeps only the text."""
    env = dict(os.environ, DECLAB_MODELS=str(FAKE_REGISTRY), DECLAB_FAKE_DELAY="0.03")
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "declab", "run", "--strategy", "greedy", "--prompt", "the cat",
                             "--max-new-tokens", "30", "--no-store"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=slave)
    os.close(slave)
    chunks = []
    reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read()), daemon=True)
    reader.start()
    seen = b""
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            break
        try:
            data = os.read(master, 4096)
        except OSError:
            break
        if not data:
            break
        seen += data
    assert proc.wait(timeout=60) == 0, seen
    reader.join(10)
    os.close(master)
    assert re.search(rb"\] \d+/30 tokens \xc2\xb7 [\d.]+ tok/s \xc2\xb7 ETA", seen), seen
    assert b"tok/s" not in chunks[0] and chunks[0].strip()
