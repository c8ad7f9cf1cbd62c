"""The app shows the grammar picker and editor for gcd and asap and runs them (Streamlit AppTest, fake model)."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from strategies import grammar as G

HOME = Path(__file__).resolve().parent.parent / "app" / "Home.py"


@pytest.fixture
def app(fake_registry):
    return AppTest.from_file(str(HOME), default_timeout=60).run()


@pytest.mark.parametrize("strategy", ["gcd", "asap"])
def test_grammar_picker_editor_and_run(app, strategy):
    app.selectbox(key="run:strategy").set_value(strategy).run()
    assert not app.exception
    pick = app.selectbox(key="run:grammar_pick")
    assert pick.options == ["(custom)"] + list(G.BUILTIN_NAMES)
    pick.set_value("json").run()
    editor = app.text_area(key="run:grammar:json")
    assert editor.value == G.BUILTIN_GRAMMARS["json"]
    app.number_input(key=f"run:{strategy}:num_samples").set_value(3)
    app.number_input(key="run:max_new_tokens").set_value(10)
    app.button(key="run:go").click().run()
    assert not app.exception and not [e.value for e in app.error]
    (rec,) = app.session_state["declab_runs"]
    assert rec.meta["extras"]["grammar"] == G.BUILTIN_GRAMMARS["json"]
    assert len(rec.meta["sequences"]) == 3 and rec.meta["metrics"]["grammar"] == "json"
    assert len(app.get("plotly_chart")) >= 1


def test_bad_grammar_in_the_editor_shows_its_position(app):
    app.selectbox(key="run:strategy").set_value("asap").run()
    app.text_area(key="run:grammar:(custom)").set_value('root ::= "a" |').run()
    app.button(key="run:go").click().run()
    assert not app.exception
    msgs = [e.value for e in app.error]
    assert any("grammar does not compile" in m and "line 1, column" in m for m in msgs), msgs
    assert "declab_runs" not in app.session_state or not app.session_state["declab_runs"]
