"""Derived metrics: functions over a trace frame, each defined in its docstring. `summarize` applies those that
fit the frame (a metric whose rows are absent is left out rather than reported as 0)."""

from __future__ import annotations

import math

import pandas as pd


def _tokens(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["kind"] == "token"]


def num_token_rows(df: pd.DataFrame) -> int:
    """Number of `token` rows: tokens emitted by the strategy over all branches (EOS included)."""
    return int((df["kind"] == "token").sum())


def mean_entropy_bits(df: pd.DataFrame) -> float:
    """Mean over `token` rows of the entropy (bits) of the model's next-token distribution at that step."""
    return float(_tokens(df)["entropy"].mean())


def mean_logprob(df: pd.DataFrame) -> float:
    """Mean over `token` rows of ln p_model(chosen token)."""
    return float(_tokens(df)["logprob"].mean())


def perplexity(df: pd.DataFrame) -> float:
    """exp(-mean_logprob): the model's perplexity on its own chosen tokens."""
    return float(math.exp(-mean_logprob(df)))


def median_step_ms(df: pd.DataFrame) -> float:
    """Median of dt_ms over `token` rows: the typical cost of one decoding step."""
    return float(_tokens(df)["dt_ms"].median())


def acceptance_rate(df: pd.DataFrame) -> float:
    """accepted / (accepted + rejected) over `accept` and `reject` rows (speculative drafts, grammar tokens...)."""
    acc = int((df["kind"] == "accept").sum())
    rej = int((df["kind"] == "reject").sum())
    return acc / (acc + rej)


def summarize(df: pd.DataFrame) -> dict:
    out: dict[str, float] = {}
    if df.empty:
        return out
    if (df["kind"] == "token").any():
        out.update(token_rows=num_token_rows(df), mean_entropy_bits=mean_entropy_bits(df),
                   mean_logprob=mean_logprob(df), perplexity=perplexity(df))
        if _tokens(df)["dt_ms"].notna().any():
            out["median_step_ms"] = median_step_ms(df)
    if df["kind"].isin(["accept", "reject"]).any():
        out["acceptance_rate"] = acceptance_rate(df)
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in out.items()}
