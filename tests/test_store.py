"""The run store (declab/store.py) and `declab runs ...`: exact round trips (hostile token text through store, export
and import), ok/stopped/failed runs, filters, tags, delete, concurrent writer processes, killed writers, the CLI."""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from declab.cli import main
from declab.core.errors import UserError
from declab.run.store import default_path, open_store, read_export
from declab.core.trace import Trace, column_dtypes, read_meta, read_trace
from tests.conftest import APP_PROMPT, ROOT, script_seed
from tests.test_trace import HOSTILE, hostile_frame


def hostile_run(run_id="hostile01", **meta_extra):
    """A run whose prompt, generated text, params and every trace text cell are hostile."""
    frame = hostile_frame()
    frame["run_id"] = pd.Series([run_id] * len(frame), dtype="string")
    meta = {"run_id": run_id, "status": "ok", "error": None, "model": "m", "strategy": "greedy",
            "params": {"note": "=cmd|' /C calc'!A0", "k": 3}, "seed": 7, "prompt": "".join(HOSTILE),
            "prompt_format": "raw", "started_at": "2026-03-04T05:06:07", "wall_s": 0.5,
            "metrics": {"new_tokens": len(HOSTILE), "mean_entropy_bits": 1.0},
            "sequences": [{"text": "".join(HOSTILE), "token_ids": list(range(len(HOSTILE))), "score": -1.5},
                          {"text": "<script>alert(1)</script>\r\n\x00", "token_ids": [1, 2], "score": None}],
            "columns": column_dtypes(frame), **meta_extra}
    return meta, frame


def fake_result(fake_lm, strategy="greedy", seed=0, n=12, prompt="the cat", stop_after=None):
    from declab.run import Run, RunRequest
    run = Run(fake_lm, RunRequest(model="fake", strategy=strategy, prompt=prompt, max_new_tokens=n, seed=seed))
    for i, _ in enumerate(run.events()):
        if stop_after is not None and i + 1 == stop_after:
            run.stop.set()
    return run.result


def same_run(a: tuple[dict, pd.DataFrame], b: tuple[dict, pd.DataFrame]) -> None:
    assert a[0] == b[0]
    pd.testing.assert_frame_equal(a[1], b[1])


@pytest.fixture
def store(tmp_path):
    return open_store(tmp_path / "lib" / "runs.sqlite")


# ------------------------------------------------------------------------------------------------ round trips
def test_a_fake_run_round_trips_exactly(store, fake_registry, fake_lm):
    result = fake_result(fake_lm, strategy="sample", seed=script_seed(12, APP_PROMPT), prompt=APP_PROMPT)
    run_id = store.save(result, source="test", tags=["a"])
    assert run_id == result.meta["run_id"]
    meta, frame = store.get(run_id)
    assert meta == json.loads(json.dumps(result.meta, default=str))
    pd.testing.assert_frame_equal(frame, result.frame)
    (row,) = store.list()
    assert row["run_id"] == run_id and row["status"] == "ok" and row["strategy"] == "sample"
    assert row["text"] == result.sequences[0].text and "<script>alert(1)</script>" in row["text"]
    assert row["new_tokens"] == len(result.sequences[0].token_ids) and row["n_rows"] == len(result.frame)
    assert row["tags"] == ["a"] and row["source"] == "test" and row["params"] == result.meta["params"]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_hostile_run_through_store_export_and_import(store, tmp_path, fmt):
    original = hostile_run()
    store.save(original)
    same_run(store.get("hostile01"), original)
    files = store.export("hostile01", tmp_path / f"out.{fmt}")
    assert [p.name for p in files] == [f"out.{fmt}", "out.meta.json"]
    assert read_meta(tmp_path / "out.meta.json") == original[0]
    if fmt == "csv":                               # the CSV stays spreadsheet-safe on the way out
        assert "'=1+1" in (tmp_path / "out.csv").read_text(encoding="utf-8")
    other = open_store(tmp_path / "other.sqlite")
    assert other.import_run(tmp_path / f"out.{fmt}") == "hostile01"
    same_run(other.get("hostile01"), original)
    assert other.get("hostile01")[1]["token_text"].tolist()[: len(HOSTILE)] == HOSTILE
    assert other.list()[0]["source"] == "import"


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_selection_zip_export_imports_back(store, tmp_path, fmt):
    runs = [hostile_run("hostile01"), hostile_run("hostile02", strategy="sample")]
    for r in runs:
        store.save(r)
    with zipfile.ZipFile(io.BytesIO(store.export_bytes(["hostile01", "hostile02"], fmt))) as z:
        assert sorted(z.namelist()) == sorted([f"declab-greedy-hostile01.{fmt}", "declab-greedy-hostile01.meta.json",
                                               f"declab-sample-hostile02.{fmt}", "declab-sample-hostile02.meta.json"])
        z.extractall(tmp_path / "unzipped")
    other = open_store(tmp_path / "other.sqlite")
    for r in runs:
        meta = r[0]
        run_id = other.import_run(tmp_path / "unzipped" / f"declab-{meta['strategy']}-{meta['run_id']}.{fmt}")
        same_run(other.get(run_id), r)


def test_html_report_of_a_selection_is_one_escaped_page(store):
    store.save(hostile_run("hostile01"))
    store.save(hostile_run("hostile02"))
    page = store.export_bytes(["hostile01", "hostile02"], "html").decode("utf-8")
    from plotly.offline import get_plotlyjs
    assert page.count("<html") == 1 and page.count("</html>") == 1
    assert page.count(get_plotlyjs()) == 1                      # plotly.js embedded once, not once per run
    assert "declab: 2 runs" in page and page.count("declab run hostile0") == 2
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    single = store.export_bytes(["hostile01"], "html").decode("utf-8")
    from viz.report import html_report
    uuid = __import__("re").compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
    assert uuid.sub("id", single) == uuid.sub("id", html_report(*store.get("hostile01")))    # one run: its report


def test_import_without_metadata_and_bad_files(store, tmp_path, fake_registry, fake_lm):
    from declab.core import trace as tr
    result = fake_result(fake_lm)
    tr.write_csv(result.frame, tmp_path / "bare.csv")
    run_id = store.import_run(tmp_path / "bare.csv")
    meta, frame = store.get(run_id)
    assert run_id == result.meta["run_id"] and meta["strategy"] == "greedy" and meta["model"] == "fake"
    assert meta["sequences"][0]["text"] == result.sequences[0].text
    assert frame["token_text"].tolist() == result.frame["token_text"].tolist()
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="not a declab trace"):
        read_export(tmp_path / "x.csv")
    (tmp_path / "y.json").write_text("[1]")
    with pytest.raises(UserError, match="not declab run metadata"):
        read_export(tmp_path / "bare.csv", tmp_path / "y.json")
    with pytest.raises(UserError, match="no such file"):
        read_export(tmp_path / "none.csv")
    with pytest.raises(UserError, match="already in the run store"):
        store.import_run(tmp_path / "bare.csv")


# ------------------------------------------------------------------------------------------------ statuses
def _patched_greedy(monkeypatch, after_steps: int, action):
    from declab.core import load_strategies
    from declab.core.loop import Choice, Selector, token_loop

    class Acting(Selector):
        def __init__(self, ctx):
            self.ctx = ctx

        def apply(self, logits, step):
            if step == after_steps:
                action(self.ctx)
            token = int(logits.argmax())
            return Choice(token, float(logits.log_softmax(-1)[token]))

    def run(ctx, cfg):
        return (yield from token_loop(ctx, Acting(ctx)))
    monkeypatch.setattr(load_strategies()["greedy"], "run", run, raising=False)


def test_stopped_and_failed_runs_are_stored_as_such_with_what_they_produced(store, fake_registry, fake_lm,
                                                                            monkeypatch):
    stopped = fake_result(fake_lm, n=30, stop_after=4)
    assert stopped.status == "stopped"

    def oom(ctx):
        raise RuntimeError("CUDA out of memory (simulated)")
    _patched_greedy(monkeypatch, 3, oom)
    failed = fake_result(fake_lm, n=30)
    assert failed.status == "failed"
    store.save(stopped)
    store.save(failed)
    rows = {r["status"]: r for r in store.list()}
    assert set(rows) == {"stopped", "failed"}
    assert "out of memory" in rows["failed"]["error"] and rows["stopped"]["error"] is None
    for result in (stopped, failed):
        meta, frame = store.get(result.meta["run_id"])
        assert meta["status"] == result.status and len(frame) == len(result.frame) > 0
        assert meta["sequences"][0]["token_ids"] == result.sequences[0].token_ids != []
    assert [r["run_id"] for r in store.list(status="failed")] == [failed.meta["run_id"]]


def test_a_result_status_wins_over_its_metadata(store):
    from declab.run import RunResult
    meta, frame = hostile_run()
    store.save(RunResult(meta=dict(meta, status="ok"), frame=frame, sequences=[], status="failed", error="boom"))
    saved, _ = store.get("hostile01")
    assert saved["status"] == "failed" and saved["error"] == "boom"


# ------------------------------------------------------------------------------------------------ list, tags, delete
def _meta(run_id, started, model="m1", strategy="greedy", status="ok", prompt="p", text="t"):
    tr = Trace(run_id, strategy, model)
    tr.add("token", 0, token_id=1, token_text=text, logprob=-0.1)
    return ({"run_id": run_id, "started_at": started, "model": model, "strategy": strategy, "status": status,
             "prompt": prompt, "sequences": [{"text": text, "token_ids": [1]}], "params": {}}, tr.frame())


def test_filters_search_and_order(store):
    store.save(_meta("r1", "2026-01-01T10:00:00", prompt="The CAFÉ is", text=" open"))
    store.save(_meta("r2", "2026-01-02T09:00:00", model="m2", strategy="sample", text=" 50% off_sale"))
    store.save(_meta("r3", "2026-01-03T23:59:59", status="failed", text=" café\nnoir"), tags=["x", "y"])
    ids = lambda **f: [r["run_id"] for r in store.list(**f)]  # noqa: E731
    assert ids() == ["r3", "r2", "r1"]                                   # newest first
    assert ids(model="m2") == ["r2"] and ids(model=["m1", "m2"]) == ["r3", "r2", "r1"]
    assert ids(strategy="greedy", status="ok") == ["r1"]
    assert ids(tag="y") == ["r3"] and ids(tag=["nope", "x"]) == ["r3"] and ids(tag="nope") == []
    assert ids(since="2026-01-02") == ["r3", "r2"] and ids(until="2026-01-02") == ["r2", "r1"]
    assert ids(since="2026-01-03", until="2026-01-03") == ["r3"]       # a date covers its whole day
    import datetime
    assert ids(since=datetime.date(2026, 1, 2), until=datetime.date(2026, 1, 2)) == ["r2"]
    assert ids(since="2026-01-01T10:00:01") == ["r3", "r2"]
    assert ids(search="café") == ["r3", "r1"]                          # prompt or text, unicode case-insensitive
    assert ids(search="CAFÉ IS") == ["r1"] and ids(search="50%") == ["r2"] and ids(search="%") == ["r2"]
    assert ids(search="_") == ["r2"] and ids(search="É\nN") == ["r3"]  # no LIKE wildcards
    assert ids(limit=2) == ["r3", "r2"]
    with pytest.raises(UserError, match="YYYY-MM-DD"):
        store.list(since="yesterday")
    assert store.facets() == {"model": ["m1", "m2"], "strategy": ["greedy", "sample"],
                              "status": ["failed", "ok"], "source": [""], "tag": ["x", "y"]}


def test_tags_delete_and_references(store):
    store.save(_meta("abc111", "2026-01-01T00:00:00"))
    store.save(_meta("abc222", "2026-01-02T00:00:00"))
    store.tag(["abc111", "abc222"], add=["  lecture   3 ", "b"])
    store.tag("abc2", remove=["b"])                                      # a unique prefix
    assert store.info("abc111")["tags"] == ["b", "lecture 3"] and store.info("abc222")["tags"] == ["lecture 3"]
    with pytest.raises(UserError, match="cannot be empty"):
        store.tag("abc111", add=["  "])
    with pytest.raises(UserError, match="matches several runs"):
        store.resolve("abc")
    with pytest.raises(UserError, match="no run 'zzz'"):
        store.get("zzz")
    assert store.resolve("latest") == "abc222"
    assert store.delete(["abc111"]) == 1
    assert [r["run_id"] for r in store.list()] == ["abc222"]
    with sqlite3.connect(store.path) as c:                              # trace and tags went with it
        assert c.execute("SELECT count(*) FROM traces WHERE run_id = 'abc111'").fetchone()[0] == 0
        assert c.execute("SELECT count(*) FROM tags WHERE run_id = 'abc111'").fetchone()[0] == 0
    with pytest.raises(UserError, match="already in the run store"):
        store.save(_meta("abc222", "2026-01-05T00:00:00"))
    store.save(_meta("abc222", "2026-01-05T00:00:00", text="new"), replace=True)
    assert store.get("abc222")[0]["sequences"][0]["text"] == "new" and store.count() == 1


def test_default_location_and_overrides(monkeypatch, tmp_path):
    monkeypatch.delenv("DECLAB_STORE")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_path() == tmp_path / "xdg" / "declab" / "runs.sqlite"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_path() == tmp_path / "home" / ".local" / "share" / "declab" / "runs.sqlite"
    monkeypatch.setenv("DECLAB_STORE", str(tmp_path / "env.sqlite"))
    assert open_store().path == tmp_path / "env.sqlite" and (tmp_path / "env.sqlite").is_file()


def test_the_test_suite_never_touches_the_user_store(tmp_store):
    assert os.environ["DECLAB_STORE"] == str(tmp_store)
    assert open_store().path == tmp_store


def test_a_file_that_is_not_a_store_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(UserError, match="not a usable declab run store"):
        open_store(bad)


# ------------------------------------------------------------------------------------------------ processes
WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from declab.run.store import open_store
    from declab.core.trace import Trace
    store = open_store({path!r})
    name, n, rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    sys.stdout.write("ready\\n"); sys.stdout.flush()
    while not __import__("os").path.exists({go!r}):
        time.sleep(0.01)
    for i in range(n):
        tr = Trace(f"{{name}}-{{i}}", "greedy", "m")
        for s in range(rows):
            tr.add("token", s, token_id=s, token_text=f"{{name}}/{{i}}/{{s}}" + "x" * (s % 7), logprob=-s / 10)
        run_id = store.save(({{"run_id": f"{{name}}-{{i}}", "model": "m", "strategy": "greedy",
                              "prompt": name, "payload": "{{pad}}"}}, tr.frame()))
        sys.stdout.write(run_id + "\\n"); sys.stdout.flush()
""")


def _writer(tmp_path, path, name, n, rows, pad=0):
    script = tmp_path / f"writer-{name}.py"
    script.write_text(WRITER.format(root=str(ROOT), path=str(path), go=str(tmp_path / "go")).replace("{pad}",
                                                                                                   "p" * pad))
    return subprocess.Popen([sys.executable, str(script), name, str(n), str(rows)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)


def _check_run(store, run_id, rows):
    meta, frame = store.get(run_id)
    name, i = run_id.rsplit("-", 1)
    assert meta["prompt"] == name and len(frame) == rows
    assert frame["token_text"].tolist() == [f"{name}/{i}/{s}" + "x" * (s % 7) for s in range(rows)]


def test_concurrent_writer_processes_lose_nothing(tmp_path):
    path = tmp_path / "shared.sqlite"
    procs = [_writer(tmp_path, path, f"w{k}", 12, 40) for k in range(4)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
    (tmp_path / "go").touch()                               # all four start writing at the same moment
    reported = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        reported += out.split()
    store = open_store(path)
    assert len(reported) == 48 and sorted(r["run_id"] for r in store.list()) == sorted(reported)
    for run_id in reported:
        _check_run(store, run_id, 40)
    assert store.check() == "ok"


def test_a_writer_killed_inside_its_transaction_leaves_earlier_runs_intact(tmp_path):
    """os._exit after every insert of a large run was executed but before COMMIT: the partly written run (pages
    already spilled into the WAL) is absent, earlier runs are intact, and the store takes new runs."""
    path = tmp_path / "crash.sqlite"
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        import declab.run.store as ds
        from declab.core.trace import Trace
        store = ds.open_store({str(path)!r})
        def run(i, rows):
            tr = Trace(f"run{{i}}", "greedy", "m")
            for s in range(rows):
                tr.add("token", s, token_id=s, token_text=os.urandom(24).hex(), logprob=-0.5)
            return {{"run_id": f"run{{i}}", "model": "m", "strategy": "greedy"}}, tr.frame()
        for i in range(3):
            store.save(run(i, 50))
        insert = ds._insert
        def die(c, row, blob, tags, replace):
            insert(c, row, blob, tags, replace)
            os._exit(7)                                 # killed mid-write: inside the open transaction
        ds._insert = die
        store.save(run(3, 60000))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 7, proc.stderr
    assert Path(str(path) + "-wal").stat().st_size > 100_000             # part of the big run had reached the WAL
    store = open_store(path)
    assert store.check() == "ok"
    assert [r["run_id"] for r in store.list()] == ["run2", "run1", "run0"]
    for i in range(3):
        assert len(store.get(f"run{i}")[1]) == 50
    with sqlite3.connect(path) as c:
        assert c.execute("SELECT count(*) FROM traces").fetchone()[0] == 3
    store.save(_meta("after", "2026-01-01T00:00:00"))
    assert store.count() == 4


def test_a_writer_killed_with_sigkill_while_writing_leaves_the_store_readable(tmp_path):
    path = tmp_path / "kill.sqlite"
    proc = _writer(tmp_path, path, "k", 10_000, 3000, pad=200_000)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    (tmp_path / "go").touch()
    committed = [proc.stdout.readline().strip() for _ in range(3)]
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)                         # most likely in the middle of the next save
    proc.wait(timeout=30)
    committed += proc.stdout.read().split()
    assert proc.returncode == -signal.SIGKILL
    store = open_store(path)
    assert store.check() == "ok"
    stored = [r["run_id"] for r in store.list()]
    assert set(committed) <= set(stored) and len(stored) <= len(committed) + 1
    for run_id in stored:                                    # every run present is whole (row, tags, trace)
        _check_run(store, run_id, 3000)


# ------------------------------------------------------------------------------------------------ CLI
def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_run_stores_by_default_and_runs_subcommands(fake_registry, tmp_path, capsys, tmp_store):
    code, out, _ = _cli(capsys, "run", "--strategy", "sample", "--seed", "4", "--max-new-tokens", "20", "--prompt",
                        "Explain in two sentences why the sky is blue.", "--json", str(tmp_path / "o.json"))
    assert code == 0
    data = json.loads((tmp_path / "o.json").read_text())
    run_id = data["run_id"]
    assert out.strip() == data["sequences"][0]["text"].strip()          # stdout unchanged: the text only
    store = open_store(tmp_store)
    assert [r["run_id"] for r in store.list()] == [run_id] and store.list()[0]["source"] == "cli"

    code, out, _ = _cli(capsys, "runs", "list")
    assert code == 0 and run_id in out and "sample" in out and "<script>" in out
    assert len(out.strip().splitlines()) == 2                           # header + one line per run
    code, out, _ = _cli(capsys, "runs", "list", "--json", "--strategy", "sample", "--search", "SCRIPT")
    assert [r["run_id"] for r in json.loads(out)] == [run_id]
    code, out, _ = _cli(capsys, "runs", "list", "--json", "--strategy", "greedy")
    assert json.loads(out) == []

    code, out, _ = _cli(capsys, "runs", "show", run_id[:6])
    assert code == 0 and f"run {run_id} · ok" in out and data["sequences"][0]["text"] in out
    code, out, _ = _cli(capsys, "runs", "show", "latest", "--json")
    assert json.loads(out)["params"] == data["params"]

    code, out, _ = _cli(capsys, "runs", "tag", run_id, "--add", "demo")
    assert code == 0 and out.strip() == f"{run_id}: demo"
    code, out, _ = _cli(capsys, "runs", "export", run_id, "--csv", str(tmp_path / "e.csv"), "--html",
                        str(tmp_path / "e.html"))
    assert code == 0 and (tmp_path / "e.meta.json").is_file() and (tmp_path / "e.html").stat().st_size > 0
    meta = read_meta(tmp_path / "e.meta.json")
    assert meta["run_id"] == run_id
    pd.testing.assert_frame_equal(read_trace(tmp_path / "e.csv", meta["columns"]), store.get(run_id)[1])

    code, out, _ = _cli(capsys, "runs", "delete", run_id)
    assert code == 0 and out.strip() == "deleted 1 run" and store.count() == 0
    code, out, _ = _cli(capsys, "runs", "import", str(tmp_path / "e.csv"))
    assert code == 0 and out.strip() == run_id
    same_run(store.get(run_id), (meta, read_trace(tmp_path / "e.csv", meta["columns"])))

    (tmp_path / "dir").mkdir()
    code, out, _ = _cli(capsys, "runs", "export", run_id, "--dir", str(tmp_path / "dir"), "--format", "parquet")
    assert code == 0 and sorted(p.name for p in (tmp_path / "dir").iterdir()) == [
        f"declab-sample-{run_id}.meta.json", f"declab-sample-{run_id}.parquet"]


def test_cli_no_store_and_store_flag(fake_registry, tmp_path, capsys, tmp_store):
    assert main(["run", "--strategy", "greedy", "--prompt", " the cat", "--max-new-tokens", "3", "--no-store"]) == 0
    assert not tmp_store.exists()
    other = tmp_path / "elsewhere.sqlite"
    assert main(["run", "--strategy", "greedy", "--prompt", " the cat", "--max-new-tokens", "3", "--store",
                 str(other)]) == 0
    assert open_store(other).count() == 1 and open_store(tmp_store).count() == 0
    capsys.readouterr()
    code, out, _ = _cli(capsys, "runs", "list", "--json", "--store", str(other))
    assert len(json.loads(out)) == 1


def test_cli_ctrl_c_stops_the_run_and_keeps_it_as_stopped(fake_registry, monkeypatch, capsys, tmp_store):
    # Ctrl-C at step 3; the decoding thread then waits until the main thread has stopped the run, so how many tokens
    # it made does not depend on how fast the main thread gets the signal on a loaded machine
    _patched_greedy(monkeypatch, 3, lambda ctx: (os.kill(os.getpid(), signal.SIGINT), ctx.stop.wait(10)))
    before = signal.getsignal(signal.SIGINT)
    assert main(["run", "--strategy", "greedy", "--prompt", " the cat", "--max-new-tokens", "30"]) == 130
    assert signal.getsignal(signal.SIGINT) is before
    err = capsys.readouterr().err
    assert err.startswith("declab: interrupted")
    (row,) = open_store(tmp_store).list()
    assert row["status"] == "stopped" and 3 <= row["new_tokens"] <= 4


def test_cli_store_that_cannot_be_written_warns_and_keeps_the_output(fake_registry, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = main(["run", "--strategy", "greedy", "--prompt", " the cat", "--max-new-tokens", "3", "--store",
                 str(blocker / "runs.sqlite")])
    out, err = capsys.readouterr()
    assert code == 0 and out.strip() and err.startswith("declab: warning: run not stored")


@pytest.mark.parametrize("argv, message", [
    (["runs", "show", "nope"], "no run 'nope' in the run store"),
    (["runs", "export", "latest", "--html", "r.html"], "the run store .* is empty"),
    (["runs", "export", "latest"], "runs export needs --csv"),
    (["runs", "delete"], "the following arguments are required"),
    (["runs", "list", "--since", "last week"], "dates are YYYY-MM-DD"),
    (["runs", "import", "/no/such.csv"], "cannot read trace /no/such.csv"),
    (["runs", "frob"], "invalid choice"),
])
def test_cli_runs_bad_input_exits_2_with_one_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("declab: error: ")
    assert __import__("re").search(message, err), err


def test_cli_decodes_in_the_thread_that_loaded_the_model(fake_registry, monkeypatch, capsys, tmp_store):
    """`declab run` loads the model in its main thread and decodes there too (RunService.run_here): with a second
    thread decoding while the main thread keeps its OpenMP pool, every torch operation waited for a sleeping worker
    (2.2x slower per step on the reference machine, README.md)."""
    import threading
    seen = []
    _patched_greedy(monkeypatch, 1, lambda ctx: seen.append(threading.current_thread() is threading.main_thread()))
    assert main(["run", "--strategy", "greedy", "--prompt", " the cat", "--max-new-tokens", "4", "--no-store"]) == 0
    assert seen == [True]
