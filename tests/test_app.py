"""The Streamlit app on the scripted fake model, through streamlit.testing.v1.AppTest (no browser).

Every page renders without exceptions; Run produces text, plotly charts and the four download buttons; bad input
(empty prompt, out-of-range parameter, too many tokens) shows a message and keeps earlier runs; Compare, Teach, Export
and the Trace explorer (uploaded CSV/Parquet + JSON) work; sessions do not share runs; model text is escaped.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from tests.conftest import script_seed

ROOT = Path(__file__).resolve().parent.parent
HOME = ROOT / "app" / "Home.py"
PAGES = ["views/run.py", "views/compare.py", "views/trace_explorer.py", "views/teach.py", "views/export.py"]
TIMEOUT = 60


@pytest.fixture
def app(fake_registry):
    """A fresh app session on the fake registry (default model: the scripted fake)."""
    return AppTest.from_file(str(HOME), default_timeout=TIMEOUT).run()


def ok(at: AppTest) -> AppTest:
    assert not at.exception, [e.value for e in at.exception]
    return at


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def plotly_charts(at: AppTest) -> list:
    return at.get("plotly_chart")


def download_labels(at: AppTest) -> list[str]:
    return [d.label for d in at.get("download_button")]


def run_default(at: AppTest) -> AppTest:
    at.button(key="run:go").click().run()
    return ok(at)


def session_runs(at: AppTest) -> list:
    return at.session_state["declab_runs"] if "declab_runs" in at.session_state else []


# ------------------------------------------------------------------------------------------------ pages
@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_without_exceptions(app, page):
    ok(app)
    app.switch_page(page).run()
    ok(app)
    assert not errors(app)
    assert any("0 runs in this session" in c.value for c in app.sidebar.caption)


def test_landing_page_is_run_titled_declab_with_greedy_and_default_model(app):
    ok(app)
    assert app.title[0].value == "declab"
    assert app.selectbox(key="run:model").value == "fake"
    assert app.selectbox(key="run:strategy").value == "greedy"
    assert app.button(key="run:go").label == "Run"


# ------------------------------------------------------------------------------------------------ Run
def test_run_with_defaults_shows_text_charts_metrics_and_downloads(app):
    run_default(app)
    assert not errors(app)
    (rec,) = session_runs(app)
    assert rec.status == "ok" and rec.text
    assert any(c.value == rec.text for c in app.code)
    assert len(plotly_charts(app)) >= 1
    assert {"CSV trace", "Parquet trace", "JSON metadata", "HTML report"} <= set(download_labels(app))
    assert any(m.label == "New tokens" for m in app.metric)
    assert any("1 run in this session" in c.value for c in app.sidebar.caption)


def test_parameter_form_is_generated_from_the_strategy_spec(app):
    from declab.core import get_strategy
    app.selectbox(key="run:strategy").set_value("sample").run()
    ok(app)
    for p in get_strategy("sample").params():
        widget = app.number_input(key=f"run:sample:{p['name']}")
        assert widget.value == p["default"]
        assert p["range"] in widget.help


def test_the_speculative_strategies_say_which_drafter_to_pick(app):
    for name in ("speculative", "spec_tree"):
        app.selectbox(key="run:strategy").set_value(name).run()
        ok(app)
        advice = [i.value for i in app.info if "Which drafter" in i.value]
        assert advice and "prompt_lookup" in advice[0] and "open-ended chat" in advice[0]
    app.selectbox(key="run:strategy").set_value("greedy").run()
    assert not [i.value for i in app.info if "Which drafter" in i.value]


def test_the_sidebar_sets_the_threads_a_run_takes(app):
    import torch
    before = torch.get_num_threads()
    try:
        app.sidebar.number_input(key="declab_threads").set_value(1).run()
        ok(app)
        run_default(app)
        (rec,) = session_runs(app)
        assert rec.meta["metrics"]["torch_threads"] == 1
    finally:
        torch.set_num_threads(before)


def _registered_strategies() -> list[str]:
    import strategies  # noqa: F401
    from declab.core import STRATEGIES
    return sorted(STRATEGIES)


@pytest.mark.parametrize("name", _registered_strategies())
def test_every_registered_strategy_gets_a_form_and_runs_or_explains(app, name):
    """New strategies appear with no app change: the form comes from their params(); a default run either
    produces a chart or (for strategies needing more input, e.g. a grammar or a second model) a clear message."""
    app.selectbox(key="run:strategy").set_value(name).run()
    ok(app)
    app.number_input(key="run:max_new_tokens").set_value(8)
    run_default(app)
    assert len(plotly_charts(app)) >= 1 or errors(app) or app.warning


def test_sample_run_with_parameters(app):
    app.selectbox(key="run:strategy").set_value("sample").run()
    app.number_input(key="run:sample:temperature").set_value(0.7)
    app.number_input(key="run:sample:top_k").set_value(5)
    run_default(app)
    assert not errors(app)
    (rec,) = session_runs(app)
    assert rec.meta["params"]["temperature"] == 0.7 and rec.meta["params"]["top_k"] == 5


def test_empty_prompt_shows_error_and_keeps_earlier_runs(app):
    run_default(app)
    assert len(session_runs(app)) == 1
    app.text_area(key="run:prompt").set_value("   ")
    run_default(app)
    assert any("prompt is empty" in e for e in errors(app))
    assert len(session_runs(app)) == 1                       # the earlier run is still there and shown
    assert len(plotly_charts(app)) >= 1


def test_out_of_range_parameter_shows_error(app):
    app.selectbox(key="run:strategy").set_value("sample").run()
    app.number_input(key="run:sample:temperature").set_value(0.0)      # range (0, 100]: 0 is excluded
    run_default(app)
    msgs = errors(app)
    assert any("temperature" in e and "(0.0, 100.0]" in e for e in msgs), msgs
    assert session_runs(app) == []


def test_token_limit_beyond_context_is_refused_with_message(app):
    app.number_input(key="run:max_new_tokens").set_value(600)          # the fake model's context is 512
    run_default(app)
    assert any("context length" in e for e in errors(app))
    assert session_runs(app) == []


def test_prompt_with_no_known_tokens_is_refused(app):
    app.text_area(key="run:prompt").set_value("qqqq")                  # the fake tokenizer drops unknown chars
    run_default(app)
    assert any("no tokens" in e for e in errors(app))


def _patch_greedy(monkeypatch, after_steps: int, action):
    """Make greedy yield `after_steps` steps through the real loop, then call action(ctx)."""
    from declab.core import STRATEGIES
    from declab.core.loop import Choice, Selector, token_loop
    greedy = STRATEGIES["greedy"]

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
    monkeypatch.setattr(greedy, "run", run, raising=False)


def test_a_failing_run_shows_its_error_and_keeps_earlier_runs(app, monkeypatch):
    run_default(app)
    first = session_runs(app)[0]

    def oom(ctx):
        raise RuntimeError("CUDA out of memory (simulated)")
    _patch_greedy(monkeypatch, 3, oom)
    run_default(app)
    assert any("out of memory" in e for e in errors(app)), errors(app)
    runs = session_runs(app)
    assert runs[0] is first and len(runs) == 2
    assert runs[1].status == "failed" and len(runs[1].meta["sequences"][0]["token_ids"]) == 3
    app.selectbox(key="run:view").set_value(first.run_id).run()        # the earlier run is still there, intact
    ok(app)
    assert any(c.value == first.text for c in app.code)


def test_a_stopped_run_is_kept_with_what_it_produced(app, monkeypatch):
    _patch_greedy(monkeypatch, 4, lambda ctx: ctx.stop.set())         # what the Stop button does to the run
    run_default(app)
    (rec,) = session_runs(app)
    assert rec.status == "stopped" and 4 <= len(rec.meta["sequences"][0]["token_ids"]) <= 5
    assert any("stopped" in w.value for w in app.warning)
    assert len(plotly_charts(app)) >= 1


def test_two_sessions_do_not_share_runs(fake_registry):
    a = AppTest.from_file(str(HOME), default_timeout=TIMEOUT).run()
    b = AppTest.from_file(str(HOME), default_timeout=TIMEOUT).run()
    run_default(a)
    b.run()
    assert len(session_runs(a)) == 1
    assert session_runs(b) == []


def test_concurrent_sessions_share_the_model_safely(fake_registry, monkeypatch):
    """Three sessions sampling at once on the one cached model get exactly what each gets alone, and only their own
    run."""
    import threading

    from streamlit.runtime.scriptrunner.script_cache import ScriptCache
    from streamlit.testing.v1 import app_test, local_script_runner

    # A server compiles each page once, in its one locked ScriptCache; AppTest gives every session its own cache, so
    # three sessions compiling at once race in CPython 3.11's ast.parse ("AST constructor recursion depth
    # mismatch", then a KeyError on the page's widgets). Share one cache here, as the server does.
    shared = ScriptCache()
    for module in (app_test, local_script_runner):
        monkeypatch.setattr(module, "ScriptCache", lambda: shared)

    def session(seed: int, out: dict) -> None:
        try:
            at = AppTest.from_file(str(HOME), default_timeout=TIMEOUT).run()
            at.selectbox(key="run:strategy").set_value("sample").run()
            at.number_input(key="run:seed").set_value(seed)
            at.number_input(key="run:max_new_tokens").set_value(100)
            at.button(key="run:go").click().run()
            out[seed] = ([r.text for r in session_runs(at)], len(at.exception))
        except Exception:                      # a thread's exception would otherwise only show as a missing seed
            import traceback
            out[seed] = traceback.format_exc()

    together: dict = {}
    threads = [threading.Thread(target=session, args=(seed, together)) for seed in (0, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    alone: dict = {}
    for seed in (0, 2, 3):
        session(seed, alone)
    assert together == alone
    assert all(len(texts) == 1 and texts[0] and n_exc == 0 for texts, n_exc in alone.values())
    assert len({texts[0] for texts, _ in alone.values()}) == 3


def test_token_view_escapes_model_text(app):
    app.selectbox(key="run:strategy").set_value("sample").run()
    app.number_input(key="run:seed").set_value(script_seed(48))
    run_default(app)
    (rec,) = session_runs(app)
    assert "<script>alert(1)</script>" in rec.text
    assert any(c.value == rec.text for c in app.code)                  # shown as text in a code block
    app.toggle(key=f"run:{rec.run_id}:chips").set_value(True).run()
    ok(app)
    body = "".join(h.value for h in app.get("html"))
    assert "declab-tokens" in body
    assert "<script>" not in body and "&lt;script&gt;alert(1)&lt;/script&gt;" in body


# ------------------------------------------------------------------------------------------------ Compare
def test_compare_two_configurations(app):
    app.switch_page("views/compare.py").run()
    ok(app)
    app.number_input(key="cmp:max_new_tokens").set_value(40)
    app.number_input(key="cmp:seed").set_value(script_seed(40))  # config 2 (sample) emits <script>
    app.button(key="cmp:go").click().run()
    ok(app)
    assert not errors(app)
    runs = session_runs(app)
    assert [r.meta["strategy"] for r in runs] == ["greedy", "sample"]
    assert len({r.meta["seed"] for r in runs}) == 1 and len({r.meta["prompt"] for r in runs}) == 1
    assert any(c.key == "cmp:figure" for c in plotly_charts(app))
    diffs = [h.value for h in app.get("html") if "declab-tokens" in h.value]
    assert len(diffs) == 2 and all("<script>" not in d for d in diffs)
    assert "&lt;script&gt;" in diffs[1]
    assert any("<mark" in d for d in diffs)                  # greedy and sampling differ somewhere
    for column in ("logprob", "dt_ms"):
        app.get("button_group")[0].set_value(column).run()
        ok(app)


def test_compare_four_configurations_and_a_bad_one(app):
    app.switch_page("views/compare.py").run()
    app.radio(key="cmp:n").set_value(4).run()
    ok(app)
    app.selectbox(key="cmp:3:strategy").set_value("sample").run()
    app.number_input(key="cmp:3:sample:top_p").set_value(0.0)          # (0, 1]: refused
    app.button(key="cmp:go").click().run()
    ok(app)
    assert any(e.startswith("config 4: sample") and "top_p" in e for e in errors(app))
    assert session_runs(app) == []
    app.number_input(key="cmp:3:sample:top_p").set_value(0.9)
    app.button(key="cmp:go").click().run()
    ok(app)
    assert len(session_runs(app)) == 4


# ------------------------------------------------------------------------------------------------ Teach
def test_teach_steps_through_a_run(app):
    app.switch_page("views/teach.py").run()
    ok(app)
    app.button(key="teach:go").click().run()
    ok(app)
    assert not errors(app)
    (rec,) = session_runs(app)
    key = f"teach:{rec.run_id}:step"
    assert app.slider(key=key).value == 0
    table = app.dataframe[0].value
    assert list(table.columns[:3]) == ["rank", "token", "probability"]
    assert table["chosen"].sum() == 1 and table["chosen"].iloc[0]  # greedy picks rank 1
    assert any("most likely" in m.value for m in app.markdown)
    app.button(key=f"{key}:next").click().run()
    ok(app)
    assert app.slider(key=key).value == 1
    app.slider(key=key).set_value(5).run()
    ok(app)
    cands = rec.frame[(rec.frame["kind"] == "candidate") & (rec.frame["step"] == 5)].sort_values("rank")
    assert app.dataframe[0].value["probability"].round(6).tolist() == \
        cands["logprob"].map(lambda x: __import__("math").exp(x)).round(6).tolist()
    assert any("Paper:" in c.value for c in app.caption)


# ------------------------------------------------------------------------------------------------ Export
def test_export_page_lists_every_run_with_downloads(app):
    run_default(app)
    run_default(app)
    app.switch_page("views/export.py").run()
    ok(app)
    labels = download_labels(app)
    assert labels.count("CSV trace") == 2 and labels.count("HTML report") == 2
    assert "All runs (CSV + JSON, zip)" in labels


def _upload(name: str, data: bytes) -> io.BytesIO:
    """What Streamlit's file_uploader hands a page: bytes with the file's name."""
    f = io.BytesIO(data)
    f.name = name
    return f


def test_export_bytes_round_trip_and_report_is_escaped(fake_registry, fake_lm):
    sys.path.insert(0, str(ROOT / "app"))
    try:
        import exports
        import render
    finally:
        sys.path.remove(str(ROOT / "app"))
    from declab.core import trace as tr
    meta, frame = _fake_run(fake_lm, max_new_tokens=200)
    back = pd.read_csv(io.BytesIO(exports.csv_bytes(frame)), dtype=str, keep_default_na=False)
    assert len(back) == len(frame)
    _, read = exports.read_upload(_upload("t.csv", exports.csv_bytes(frame)),
                                  _upload("t.meta.json", exports.json_bytes(meta)))
    pd.testing.assert_frame_equal(read, frame, check_dtype=False)
    pd.testing.assert_frame_equal(pd.read_parquet(io.BytesIO(exports.parquet_bytes(frame))), frame)
    assert json.loads(exports.json_bytes(meta))["run_id"] == meta["run_id"]
    report = exports.report_bytes(meta, frame).decode("utf-8")
    assert "<script>alert(1)</script>" not in report
    assert tr.BASE_COLUMNS[0] in exports.csv_bytes(frame).decode("utf-8").splitlines()[0]
    html = render.diff_html([" <script>alert(1)</script>", " the"], [" the"])
    assert "<script>" not in html and "&lt;script&gt;" in html and "<mark" in html


# ------------------------------------------------------------------------------------------------ Trace explorer
def _fake_run(lm, max_new_tokens=30, strategy="greedy"):
    from declab.run import Run, RunRequest
    run = Run(lm, RunRequest(model="fake", strategy=strategy, prompt="the cat", max_new_tokens=max_new_tokens))
    result = run.run_to_end()
    return result.meta, result.frame


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_trace_explorer_renders_an_uploaded_trace(app, fake_lm, tmp_path, fmt):
    from declab.core import trace as tr
    meta, frame = _fake_run(fake_lm, strategy="sample")
    path = tmp_path / f"run.{fmt}"
    (tr.write_csv if fmt == "csv" else tr.write_parquet)(frame, path)
    tr.write_json(meta, tmp_path / "run.json")
    app.switch_page("views/trace_explorer.py").run()
    ok(app)
    app.file_uploader(key="tx:trace").upload(path.name, path.read_bytes())
    app.file_uploader(key="tx:meta").upload("run.json", (tmp_path / "run.json").read_bytes(), "application/json")
    app.run()
    ok(app)
    assert not errors(app)
    assert len(plotly_charts(app)) >= 1
    assert any(c.value == meta["sequences"][0]["text"] for c in app.code)
    assert session_runs(app) == []
    app.button(key="tx:add").click().run()                               # then Teach / Export can use it
    ok(app)
    assert [r.run_id for r in session_runs(app)] == [meta["run_id"]]
    app.switch_page("views/teach.py").run()
    ok(app)
    assert app.slider(key=f"teach:{meta['run_id']}:step").value == 0


def test_trace_explorer_without_metadata_and_with_bad_files(app, fake_lm, tmp_path):
    from declab.core import trace as tr
    meta, frame = _fake_run(fake_lm)
    tr.write_csv(frame, tmp_path / "run.csv")
    app.switch_page("views/trace_explorer.py").run()
    app.file_uploader(key="tx:trace").upload("run.csv", (tmp_path / "run.csv").read_bytes(), "text/csv")
    app.run()
    ok(app)
    assert any("No metadata" in w.value for w in app.warning)
    assert len(plotly_charts(app)) >= 1
    app.file_uploader(key="tx:meta").upload("run.json", b"{not json", "application/json")
    app.run()
    ok(app)
    assert any("not valid JSON" in e for e in errors(app))
    app.file_uploader(key="tx:meta").clear()
    app.file_uploader(key="tx:trace").clear().upload("other.csv", b"a,b\n1,2\n", "text/csv")
    app.run()
    ok(app)
    assert any("not a declab trace" in e for e in errors(app))


def test_trace_explorer_opens_a_run_of_this_session(app):
    run_default(app)
    app.switch_page("views/trace_explorer.py").run()
    app.radio(key="tx:source").set_value("A run of this session").run()
    ok(app)
    assert len(plotly_charts(app)) >= 1
