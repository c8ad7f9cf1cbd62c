"""The Library page (app/views/library.py) on streamlit's AppTest with the fake model: app runs land in the run store
and survive a new session; filters and search; open in the Trace explorer without a model; send runs to Compare;
tag, delete, export; model text stays escaped."""

from __future__ import annotations

import datetime
import json

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from declab.run.store import open_store
from tests.test_app import HOME, TIMEOUT, errors, ok, plotly_charts, run_default, session_runs
from tests.conftest import APP_PROMPT, script_seed

LIBRARY = "views/library.py"


def new_session() -> AppTest:
    """A fresh browser session (nothing in session_state): what a reload or an app restart gives."""
    return ok(AppTest.from_file(str(HOME), default_timeout=TIMEOUT).run())


def library(at: AppTest) -> AppTest:
    return ok(at.switch_page(LIBRARY).run())


def listed(at: AppTest) -> list[str]:
    frames = [d.value for d in at.dataframe if "run id" in d.value.columns]
    return frames[0]["run id"].tolist() if frames else []


def select(at: AppTest, ids: list[str]) -> AppTest:
    return ok(at.multiselect(key="lib:sel").set_value(ids).run())


def store_fake_run(fake_lm, strategy="greedy", seed=0, prompt="the cat", n=20, started=None, tags=()):
    from declab.run import Run, RunRequest
    result = Run(fake_lm, RunRequest(model="fake", strategy=strategy, prompt=prompt, max_new_tokens=n,
                                     seed=seed)).run_to_end()
    if started:
        result.meta["started_at"] = started
    open_store().save(result, source="test", tags=tags)
    return result


def test_empty_library_says_so(fake_registry):
    at = library(new_session())
    assert not errors(at)
    assert any("library is empty" in i.value for i in at.info)


def test_app_runs_are_stored_and_survive_a_new_session(fake_registry, tmp_store):
    a = new_session()
    run_default(a)
    a.selectbox(key="run:strategy").set_value("sample").run()
    run_default(a)
    ids = [r.run_id for r in session_runs(a)]
    assert len(ids) == 2
    rows = open_store().list()
    assert sorted(r["run_id"] for r in rows) == sorted(ids) and {r["source"] for r in rows} == {"app"}
    meta, frame = open_store().get(ids[0])
    assert meta == json.loads(json.dumps(session_runs(a)[0].meta, default=str))
    pd.testing.assert_frame_equal(frame, session_runs(a)[0].frame)

    b = library(new_session())                         # another session (a reload, a restart) sees both
    assert session_runs(b) == []
    assert listed(b) == ids[::-1]                     # newest first
    assert any("2 of 2 stored runs" in c.value for c in b.caption)


def test_failed_app_run_is_stored_as_failed(fake_registry, monkeypatch):
    from tests.test_app import _patch_greedy

    def oom(ctx):
        raise RuntimeError("CUDA out of memory (simulated)")
    _patch_greedy(monkeypatch, 3, oom)
    run_default(new_session())
    (row,) = open_store().list()
    assert row["status"] == "failed" and "out of memory" in row["error"]
    assert len(open_store().get(row["run_id"])[0]["sequences"][0]["token_ids"]) == 3
    at = library(new_session())
    at.multiselect(key="lib:status").set_value(["failed"]).run()
    assert listed(ok(at)) == [row["run_id"]]


def test_filters_and_search(fake_registry, fake_lm):
    g = store_fake_run(fake_lm, "greedy", started="2026-01-01T10:00:00")
    s = store_fake_run(fake_lm, "sample", seed=script_seed(20), prompt=APP_PROMPT,
                       started="2026-01-05T10:00:00", tags=["lecture"])
    at = library(new_session())
    assert listed(at) == [s.meta["run_id"], g.meta["run_id"]]
    at.multiselect(key="lib:strategy").set_value(["greedy"]).run()
    assert listed(ok(at)) == [g.meta["run_id"]]
    at.multiselect(key="lib:strategy").set_value([]).run()
    at.multiselect(key="lib:tag").set_value(["lecture"]).run()
    assert listed(ok(at)) == [s.meta["run_id"]]
    at.multiselect(key="lib:tag").set_value([]).run()
    at.date_input(key="lib:until").set_value(datetime.date(2026, 1, 2)).run()
    assert listed(ok(at)) == [g.meta["run_id"]]
    at.date_input(key="lib:until").set_value(None)
    at.date_input(key="lib:since").set_value(datetime.date(2026, 1, 2)).run()
    assert listed(ok(at)) == [s.meta["run_id"]]
    at.date_input(key="lib:since").set_value(None)
    at.text_input(key="lib:search").set_value("SKY IS BLUE").run()      # the prompt
    assert listed(ok(at)) == [s.meta["run_id"]]
    at.text_input(key="lib:search").set_value("<script>").run()          # the generated text
    assert listed(ok(at)) == [s.meta["run_id"]]
    at.text_input(key="lib:search").set_value("no such words").run()
    assert listed(ok(at)) == [] and any("No stored run matches" in i.value for i in at.info)


def test_open_a_stored_run_in_the_trace_explorer_without_a_model(fake_registry, fake_lm, monkeypatch):
    result = store_fake_run(fake_lm, "sample", seed=script_seed(20), prompt=APP_PROMPT)

    def no_model(*a, **k):
        raise AssertionError("the Trace explorer must not load a model")
    import declab.models.loading
    monkeypatch.setattr(declab.models.loading, "load_lm", no_model)
    at = library(new_session())
    select(at, [result.meta["run_id"]])
    assert any(c.value == result.sequences[0].text for c in at.code)   # the selection's text, as text
    assert at.button(key="lib:compare").disabled and not at.button(key="lib:open").disabled
    at.button(key="lib:open").click().run()
    ok(at)
    assert at.title[0].value == "Trace explorer" and not errors(at)
    assert at.radio(key="tx:source").value == "A run of this session"
    assert at.selectbox(key="tx:pick").value == result.meta["run_id"]
    assert len(plotly_charts(at)) >= 1
    assert any(c.value == result.sequences[0].text for c in at.code)
    assert [r.run_id for r in session_runs(at)] == [result.meta["run_id"]]
    at.switch_page("views/trace_explorer.py")       # AppTest reruns its own page; a browser stays where it went
    at.toggle(key=f"tx:{result.meta['run_id']}:chips").set_value(True).run()
    body = "".join(h.value for h in ok(at).get("html"))
    assert "&lt;script&gt;" in body and "<script>" not in body          # model text stays escaped


def test_send_stored_runs_to_compare(fake_registry, fake_lm):
    runs = [store_fake_run(fake_lm, "greedy", n=30),
            store_fake_run(fake_lm, "sample", seed=script_seed(30, "the cat"), n=30),
            store_fake_run(fake_lm, "sample", seed=1, n=30)]
    ids = [r.meta["run_id"] for r in runs]
    at = library(new_session())
    select(at, ids[:1])
    assert at.button(key="lib:compare").disabled
    select(at, ids)
    assert not at.button(key="lib:compare").disabled and at.button(key="lib:open").disabled
    at.button(key="lib:compare").click().run()
    ok(at)
    assert at.title[0].value == "Compare strategies" and not errors(at)
    metrics = [d.value for d in at.dataframe if "configuration" in d.value.columns][0]
    assert len(metrics) == 3 and metrics["configuration"].str.contains("sample").sum() == 2
    diffs = [h.value for h in at.get("html") if "declab-tokens" in h.value]
    assert len(diffs) == 3 and all("<script>" not in d for d in diffs)
    assert any(c.key == "cmp:figure" for c in plotly_charts(at))


def test_tag_delete_and_export_a_selection(fake_registry, fake_lm):
    runs = [store_fake_run(fake_lm, "greedy"), store_fake_run(fake_lm, "sample", seed=2)]
    ids = [r.meta["run_id"] for r in runs]
    at = library(new_session())
    select(at, ids)
    at.text_input(key="lib:tagtext").set_value("week 1")
    at.button(key="lib:tagadd").click().run()
    ok(at)
    assert all(r["tags"] == ["week 1"] for r in open_store().list())
    assert any("added to 2 runs" in s.value for s in at.success)
    assert at.multiselect(key="lib:tag").options == ["week 1"]
    at.button(key="lib:tagremove").click().run()
    assert all(r["tags"] == [] for r in open_store().list())

    assert at.download_button(key="lib:export").label == "Export selection"
    for fmt in ("csv", "parquet", "html"):                      # the format choice keeps the page working
        at.radio(key="lib:fmt").set_value(fmt).run()
        ok(at)

    select(at, ids[:1])
    assert at.button(key="lib:delete").disabled                 # needs the confirmation first
    at.checkbox(key="lib:confirm").check().run()
    at.button(key="lib:delete").click().run()
    ok(at)
    assert [r["run_id"] for r in open_store().list()] == [ids[1]]
    assert listed(at) == [ids[1]] and at.multiselect(key="lib:sel").value == []
    assert any("Deleted 1 run" in s.value for s in at.success)


@pytest.mark.parametrize("page", ["views/run.py", LIBRARY])
def test_a_broken_store_shows_a_message_not_a_traceback(fake_registry, monkeypatch, tmp_path, page):
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"not a database" * 200)
    monkeypatch.setenv("DECLAB_STORE", str(bad))
    at = new_session()
    if page == LIBRARY:
        at = library(at)
        assert any("not a usable declab run store" in e for e in errors(at))
    else:
        run_default(at)                                          # the run itself works and is kept in the session
        assert len(session_runs(at)) == 1
        assert any("not in the run library" in w.value for w in at.warning)


def test_import_an_exported_run_from_the_page(fake_registry, fake_lm, tmp_path):
    from declab.core import trace as tr
    from tests.test_store import hostile_run
    meta, frame = hostile_run()
    tr.write_csv(frame, tmp_path / "run.csv")
    tr.write_json(meta, tmp_path / "run.meta.json")
    at = library(new_session())
    at.file_uploader(key="lib:imp:trace").upload("run.csv", (tmp_path / "run.csv").read_bytes(), "text/csv")
    at.file_uploader(key="lib:imp:meta").upload("run.meta.json", b"{broken", "application/json")
    at.run()
    at.button(key="lib:imp:go").click().run()
    assert any("not valid JSON" in e for e in errors(ok(at))) and open_store().count() == 0
    at.file_uploader(key="lib:imp:meta").clear().upload("run.meta.json", (tmp_path / "run.meta.json").read_bytes(),
                                                        "application/json")
    at.run()
    at.button(key="lib:imp:go").click().run()
    ok(at)
    assert any("Imported run hostile01" in s.value for s in at.success)
    assert listed(at) == ["hostile01"] and open_store().list()[0]["source"] == "import"
    saved_meta, saved_frame = open_store().get("hostile01")
    assert saved_meta == meta
    pd.testing.assert_frame_equal(saved_frame, frame)
    assert not [h for h in at.get("html") if "<script>" in h.value]
