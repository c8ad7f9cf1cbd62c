"""viz.funnel (docs/strategies.md#sampler_chain): the funnel figure and the Teach page's stage table, from a
sampler_chain trace on the scripted fake model; chosen for sampler_chain runs only."""

from __future__ import annotations

import math

import pandas as pd
import pytest

import viz
from declab.run import Run, RunRequest
from strategies.llama_samplers import DEFAULT_ORDER
from tests.conftest import FAKE_REGISTRY
from tests.fake import FakeLM
from viz.funnel import funnel_figure, stage_table


@pytest.fixture(scope="module")
def frame():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DECLAB_MODELS", str(FAKE_REGISTRY))
        lm = FakeLM()
        res = Run(lm, RunRequest(model=lm.key, strategy="sampler_chain", prompt=" the cat", max_new_tokens=8,
                                 seed=1, params={"top_k": 12, "logit_bias": "13-inf"})).run_to_end()
    return res.frame


def test_funnel_has_a_count_and_a_mass_line_per_stage_on_a_log_axis(frame):
    fig = funnel_figure(frame)
    stages = ("logit_bias",) + DEFAULT_ORDER
    names = [t.name for t in fig.data]
    assert names[::2] == [f"{i}. {s}" for i, s in enumerate(stages)] and names[1::2] == names[::2]
    assert fig.layout.yaxis.type == "log"
    st = frame[frame.kind == "stage"]
    top_k = st[st.stage == "top_k"].sort_values("step")
    count_line = fig.data[2 * stages.index("top_k")]
    assert list(count_line.y) == top_k["n_kept"].tolist() and set(count_line.y) == {12}
    mass_line = fig.data[2 * stages.index("min_p") + 1]
    assert list(mass_line.y) == pytest.approx(st[st.stage == "min_p"].sort_values("step")["mass_kept"].tolist())


def test_funnel_is_chosen_for_sampler_chain_runs_only(frame):
    assert "Sampler chain" in viz.figures_for(frame, {})
    other = frame[frame.kind != "stage"].drop(columns=["n_stages"])
    assert "Sampler chain" not in viz.figures_for(other, {})
    assert funnel_figure(other) is None


def test_stage_table_lists_each_stage_and_the_top_tokens_it_removed(frame):
    table = stage_table(frame, 2)
    assert table["stage"].tolist() == ["logit_bias"] + list(DEFAULT_ORDER)
    st = frame[(frame.kind == "stage") & (frame.step == 2)].sort_values("stage_pos")
    assert table["after"].tolist() == st["n_kept"].astype(int).tolist()
    assert table["before"].iloc[1:].tolist() == st["n_kept"].astype(int).tolist()[:-1]
    cands = frame[(frame.kind == "candidate") & (frame.step == 2)]
    for _, c in cands[cands.removed_at.notna()].iterrows():
        row = table[table.pos == int(c.removed_at)].iloc[0]
        assert f"({math.exp(c.logprob):.3g}, {c.p_stage:.3g})" in row["removed (top tokens)"]
    assert stage_table(frame, 99).empty


def test_token_text_in_the_table_is_plain_text(frame):
    hostile = frame.copy()
    cand = hostile.index[(hostile.kind == "candidate") & (hostile.step == 0) & hostile.removed_at.notna()][0]
    hostile.loc[cand, "token_text"] = "<script>alert(1)</script>\n"
    cell = " ".join(stage_table(hostile, 0)["removed (top tokens)"])
    assert "'<script>alert(1)</script>↵'" in cell          # shown as text in st.dataframe, newline made visible
    assert isinstance(pd.DataFrame(stage_table(hostile, 0)), pd.DataFrame)


def test_stage_rows_round_trip_through_csv_and_parquet(frame, tmp_path):
    from declab.core.trace import column_dtypes, read_trace, write_csv, write_parquet
    write_csv(frame, tmp_path / "t.csv")
    write_parquet(frame, tmp_path / "t.parquet")
    for back in (read_trace(tmp_path / "t.csv", column_dtypes(frame)), read_trace(tmp_path / "t.parquet")):
        assert stage_table(back, 3).equals(stage_table(frame, 3))
        assert back[back.kind == "stage"]["n_kept"].tolist() == frame[frame.kind == "stage"]["n_kept"].tolist()
