import csv

import pandas as pd
import pytest

from declab.core.trace import BASE_COLUMNS, Trace, read_trace, write_csv, write_parquet

HOSTILE = ["a,b", '"q"', 'x\ny', "\r\nz", "a\rb", "\r", "t\tab", "\x00nul", "\x1b[31m", "é😀", "=1+1", "+SUM(A1)",
           "-2", "@cmd", "'quoted'", "", "NA", "nan", "None", "<script>alert(1)</script>", "\u2028", "\x85",
           "<|im_end|>", "  ", "\\", "'", "=", "True"]


def hostile_frame():
    tr = Trace("r1", "greedy", "m")
    for i, text in enumerate(HOSTILE):
        tr.add("token", i, branch_id=0, parent_id=0, position=i, token_id=i, token_text=text, logprob=-0.5 - i,
               entropy=1.0, score=None if i % 3 else -1.5, accepted=bool(i % 2), dt_ms=1.0, note=text, k=i)
    tr.add("finish", len(HOSTILE))            # a row with most cells missing
    return tr.frame()


def test_frame_has_base_columns_first_then_extras():
    df = hostile_frame()
    assert list(df.columns[: len(BASE_COLUMNS)]) == list(BASE_COLUMNS)
    assert list(df.columns[len(BASE_COLUMNS):]) == ["note", "k"]


def test_csv_round_trips_any_token_text_exactly(tmp_path):
    df = hostile_frame()
    path = tmp_path / "t.csv"
    write_csv(df, path)
    back = read_trace(path, {c: str(t) for c, t in df.dtypes.items()})
    pd.testing.assert_frame_equal(back, df)
    assert back["token_text"].tolist()[: len(HOSTILE)] == HOSTILE
    assert back["token_text"].isna().tolist()[-1]          # missing stays missing, "" stays ""


def test_csv_round_trips_without_metadata(tmp_path):
    df = hostile_frame()
    write_csv(df, tmp_path / "t.csv")
    back = read_trace(tmp_path / "t.csv")
    assert back["token_text"].tolist()[: len(HOSTILE)] == HOSTILE
    assert back["note"].tolist()[: len(HOSTILE)] == HOSTILE
    pd.testing.assert_series_equal(back["logprob"], df["logprob"])


def test_csv_neutralises_formulas_for_spreadsheets_but_not_numbers(tmp_path):
    df = hostile_frame()
    path = tmp_path / "t.csv"
    write_csv(df, path)
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    header, body = rows[0], rows[1:]
    text_col, lp_col = header.index("token_text"), header.index("logprob")
    for row in body:
        assert not row[text_col].startswith(("=", "+", "-", "@", "\t", "\r"))
    assert body[0][lp_col] == "-0.5"                         # numbers untouched
    assert body[HOSTILE.index("=1+1")][text_col] == "'=1+1"


def test_parquet_round_trips_exactly(tmp_path):
    df = hostile_frame()
    write_parquet(df, tmp_path / "t.parquet")
    pd.testing.assert_frame_equal(read_trace(tmp_path / "t.parquet"), df)


@pytest.mark.parametrize("text", HOSTILE)
def test_each_hostile_text_alone(tmp_path, text):
    tr = Trace("r", "s", "m")
    tr.add("token", 0, token_text=text)
    df = tr.frame()
    write_csv(df, tmp_path / "one.csv")
    assert read_trace(tmp_path / "one.csv")["token_text"].tolist() == [text]
