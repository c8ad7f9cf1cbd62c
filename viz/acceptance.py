"""Acceptance views: how much of what was proposed survived.

Panels, each drawn only when its rows/columns exist (stacked vertically in one figure):
- accepted length per round: number of `accept` rows per `round` (speculative decoding);
- acceptance by draft position: accept / (accept + reject) per `draft_pos`;
- rolling acceptance rate: the mean of accept (1) / reject (0) over the last ROLLING_WINDOW such rows, by step;
- masked mass per step: the `masked_mass` column (probability mass the grammar mask removed; gcd / asap);
- model share: the cumulative share of emitted tokens produced by each model, when token rows come from more than
  one model (ead: the large model's share).

`predicted_acceptance_figure(frame, meta)`: how well the drafted tokens' predicted acceptance (the `confidence`
column of `propose` rows: SpecDec++'s trained acceptance head under speculative adaptive=specdec, else the draft's
own probability) matched what the target did, and where each round stopped (docs/strategies.md#speculative; Huang
et al., "SpecDec++", arXiv 2405.19715):
- calibration: drafted tokens binned by predicted acceptance a^; per bin the actual acceptance = the share of
  verified drafts (verdict accepted, against rejected; drafts discarded after an earlier rejection were never
  tested) and, when sampling, the mean acceptance probability min(1, p/q); the diagonal is perfect calibration.
  A head trained with weight_mismatch w > 1 sits below it by design (a^ = a / (a + w (1 - a)));
- drafted length per round (bars), accepted drafts per round (markers) and the length allowed (`gamma`);
- the predicted chance of at least one rejection, 1 - prod a^, over the round's predicted tokens, against the stop
  threshold h (from the run's parameters, when given).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from viz.common import HIGHLIGHT, PALETTE, chosen_path, esc, has, meta_params, num, rows_of, show_token, style

ROLLING_WINDOW = 20
NUM_BINS = 10                # calibration bins of the predicted acceptance
ROUND_TEXT = 60              # characters of a round's drafted text shown on hover
INTEGER_AXES = ("round", "draft position")
UNIT_AXES = ("acceptance rate", "share of tokens", "masked mass")         # fractions in [0, 1]


def _accepted_flags(rows: pd.DataFrame) -> np.ndarray:
    return (rows["kind"] == "accept").to_numpy(dtype=float)


def _per_round(decisions: pd.DataFrame):
    if not has(decisions, "round"):
        return None
    per = pd.Series(_accepted_flags(decisions), index=decisions.index).groupby(decisions["round"]).sum()
    return ("Accepted tokens per round", "round", "accepted tokens",
            [go.Bar(x=num(per.index.to_series()), y=per.to_numpy(), name="accepted per round",
                    marker_color=PALETTE[0], showlegend=False)])


def _by_draft_pos(decisions: pd.DataFrame):
    if not has(decisions, "draft_pos"):
        return None
    rate = pd.Series(_accepted_flags(decisions), index=decisions.index).groupby(decisions["draft_pos"]).agg(
        ["mean", "size"])
    return ("Acceptance by draft position", "draft position", "acceptance rate",
            [go.Bar(x=num(rate.index.to_series()), y=rate["mean"].to_numpy(), name="acceptance by position",
                    customdata=rate["size"].to_numpy(), marker_color=PALETTE[1], showlegend=False,
                    hovertemplate="position %{x}: %{y:.2f} of %{customdata}<extra></extra>")])


def _rolling(decisions: pd.DataFrame):
    if not len(decisions):
        return None
    rate = pd.Series(_accepted_flags(decisions)).rolling(ROLLING_WINDOW, min_periods=1).mean().to_numpy()
    x = num(decisions["step"]) if has(decisions, "step") else np.arange(len(decisions))
    return (f"Rolling acceptance rate (last {ROLLING_WINDOW} decisions)", "step", "acceptance rate",
            [go.Scatter(x=x, y=rate, mode="lines", name="rolling acceptance", line={"color": PALETTE[2]},
                        showlegend=False)])


def _masked_mass(frame: pd.DataFrame):
    if not has(frame, "masked_mass", "step"):
        return None
    per = frame[frame["masked_mass"].notna()].groupby("step")["masked_mass"].mean()
    return ("Probability mass removed by the grammar mask", "step", "masked mass",
            [go.Scatter(x=num(per.index.to_series()), y=num(per), mode="lines+markers", name="masked mass",
                        line={"color": PALETTE[3]}, showlegend=False)])


def _model_share(frame: pd.DataFrame):
    path = chosen_path(frame)
    if not has(path, "model") or path["model"].nunique() < 2:
        return None
    models = path["model"].astype("string").fillna("?")
    n = np.arange(1, len(path) + 1)
    traces = [go.Scatter(x=num(path["step"]), y=np.cumsum((models == m).to_numpy()) / n, mode="lines",
                         name=f"share {esc(m)}", line={"color": PALETTE[(4 + i) % len(PALETTE)]})
              for i, m in enumerate(sorted(models.unique()))]
    return ("Share of tokens by model (cumulative)", "step", "share of tokens", traces)


def acceptance_figure(frame: pd.DataFrame) -> go.Figure | None:
    """Every acceptance panel that applies, stacked; None when none does (no accept/reject rows, no
    masked_mass, one model)."""
    if frame is None or "kind" not in frame.columns:
        return None
    decisions = rows_of(frame, "accept", "reject")
    panels = [p for p in (_per_round(decisions), _by_draft_pos(decisions), _rolling(decisions),
                          _masked_mass(frame), _model_share(frame)) if p is not None]
    if not panels:
        return None
    fig = make_subplots(rows=len(panels), cols=1, subplot_titles=[p[0] for p in panels],
                        vertical_spacing=min(0.12, 0.3 / len(panels)))
    for i, (_, x_title, y_title, traces) in enumerate(panels, start=1):
        for trace in traces:
            fig.add_trace(trace, row=i, col=1)
        fig.update_xaxes(title_text=x_title, row=i, col=1, dtick=1 if x_title in INTEGER_AXES else None)
        fig.update_yaxes(title_text=y_title, row=i, col=1, range=[0, 1.05] if y_title in UNIT_AXES else None)
    return style(fig, "Acceptance", height=120 + 260 * len(panels), legend_right=True)


# ------------------------------------------------------------------------------------------------ predicted acceptance
def _drafts(frame: pd.DataFrame) -> pd.DataFrame | None:
    """One row per drafted token: round, draft_pos, predicted (confidence), token_text, and the verdict row's
    verdict / accept_prob / u (joined on round and draft_pos); None without propose rows that have confidence."""
    props = rows_of(frame, "propose")
    if not has(props, "confidence", "round", "draft_pos"):
        return None
    out = pd.DataFrame({"round": num(props["round"]), "draft_pos": num(props["draft_pos"]),
                        "predicted": num(props["confidence"]),
                        "gamma": num(props["gamma"]) if "gamma" in props else np.nan,
                        "token_text": props["token_text"].astype("string").fillna("").to_numpy()
                        if "token_text" in props else ""})
    dec = rows_of(frame, "accept", "reject")
    if has(dec, "round", "draft_pos"):
        verdict = (dec["verdict"].astype("string") if "verdict" in dec else
                   dec["kind"].map({"accept": "accepted", "reject": "rejected"}).astype("string"))
        right = pd.DataFrame({"round": num(dec["round"]), "draft_pos": num(dec["draft_pos"]),
                              "verdict": verdict.fillna("").to_numpy(),
                              "accept_prob": num(dec["accept_prob"]) if "accept_prob" in dec else np.nan,
                              "u": num(dec["u"]) if "u" in dec else np.nan})
        out = out.merge(right.drop_duplicates(["round", "draft_pos"]), on=["round", "draft_pos"], how="left")
    else:
        out["verdict"], out["accept_prob"], out["u"] = "", np.nan, np.nan
    return out.sort_values(["round", "draft_pos"], kind="stable").reset_index(drop=True)


def _calibration(drafts: pd.DataFrame, num_bins: int) -> list:
    tested = drafts[drafts["verdict"].isin(["accepted", "rejected"]) & drafts["predicted"].notna()]
    if not len(tested):
        return []
    pred = tested["predicted"].to_numpy(dtype=float)
    b = np.minimum((np.clip(pred, 0.0, 1.0) * num_bins).astype(int), num_bins - 1)
    g = pd.DataFrame({"bin": b, "pred": pred, "acc": (tested["verdict"] == "accepted").to_numpy(dtype=float),
                      "aprob": tested["accept_prob"].to_numpy(dtype=float)}).groupby("bin")
    per = g.agg(pred=("pred", "mean"), acc=("acc", "mean"), aprob=("aprob", "mean"), n=("acc", "size"))
    lo = per.index.to_numpy() / num_bins
    bins = [f"{a:.1f}-{a + 1 / num_bins:.1f}" for a in lo]
    size = 6 + 14 * np.sqrt(per["n"].to_numpy() / per["n"].max())
    traces = [go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect calibration",
                         line={"color": "#b0b0b0", "dash": "dash"}, hoverinfo="skip"),
              go.Scatter(x=per["pred"].to_numpy(), y=per["acc"].to_numpy(), mode="lines+markers",
                         name="accepted share (verified drafts)", marker={"size": size, "color": PALETTE[0]},
                         line={"color": PALETTE[0]}, customdata=np.stack([bins, per["n"].to_numpy()], -1),
                         hovertemplate="predicted %{customdata[0]} (mean %{x:.3f}): accepted %{y:.3f} "
                                       "of %{customdata[1]}<extra></extra>")]
    if has(drafts, "u"):                          # sampling: the acceptance probability min(1, p/q) itself
        traces.append(go.Scatter(x=per["pred"].to_numpy(), y=per["aprob"].to_numpy(), mode="markers",
                                 name="mean min(1, p/q)", marker={"symbol": "diamond", "color": PALETTE[1]},
                                 hovertemplate="predicted %{x:.3f}: mean min(1, p/q) %{y:.3f}<extra></extra>"))
    return traces


def _round_lengths(drafts: pd.DataFrame) -> list:
    g = drafts.groupby("round")
    rounds = np.array(list(g.groups.keys()), dtype=float)
    drafted = g.size().to_numpy()
    accepted = g["verdict"].agg(lambda v: int((v == "accepted").sum())).to_numpy()
    gamma = g["gamma"].first().to_numpy(dtype=float)
    text = g["token_text"].agg(lambda t: show_token("".join(str(x) for x in t), ROUND_TEXT)).to_numpy()
    traces = [go.Bar(x=rounds, y=drafted, name="drafted (where the round stopped)", marker_color=PALETTE[2],
                     customdata=text, hovertemplate="round %{x}: %{y} drafted<br>%{customdata}<extra></extra>"),
              go.Scatter(x=rounds, y=accepted, mode="markers", name="accepted", marker={"color": PALETTE[3]},
                         hovertemplate="round %{x}: %{y} accepted<extra></extra>")]
    if np.isfinite(gamma).any():
        traces.append(go.Scatter(x=rounds, y=gamma, mode="lines", name="allowed (gamma)",
                                 line={"color": "#7f7f7f", "dash": "dot", "shape": "hv"},
                                 hovertemplate="round %{x}: up to %{y}<extra></extra>"))
    return traces


def _round_risk(drafts: pd.DataFrame, h: float | None) -> list:
    g = drafts.groupby("round")
    rounds = np.array(list(g.groups.keys()), dtype=float)
    prod = g["predicted"].agg(lambda p: float(np.nanprod(p.to_numpy(dtype=float)))).to_numpy()
    scored = g["predicted"].agg(lambda p: int(p.notna().sum())).to_numpy()
    traces = [go.Scatter(x=rounds, y=1.0 - prod, mode="lines+markers", name="1 − Π a^ at the stop",
                         line={"color": PALETTE[4]}, customdata=scored,
                         hovertemplate="round %{x}: 1 − Π a^ = %{y:.3f} over %{customdata} predicted "
                                       "tokens<extra></extra>")]
    if h is not None and len(rounds):
        traces.append(go.Scatter(x=[rounds.min(), rounds.max()], y=[h, h], mode="lines", name=f"h = {h:g}",
                                 line={"color": HIGHLIGHT, "dash": "dash"}, hoverinfo="skip"))
    return traces



def predicted_acceptance_figure(frame: pd.DataFrame, meta: dict | None = None,
                                num_bins: int = NUM_BINS) -> go.Figure | None:
    """Predicted against actual acceptance (calibration), drafted length per round and the predicted rejection
    chance at each stop (see the module docstring); None when the frame has no propose rows with `confidence`.
    `meta`: the run's metadata (its params' h draws the threshold)."""
    if frame is None or "kind" not in frame.columns:
        return None
    drafts = _drafts(frame)
    if drafts is None or not len(drafts):
        return None
    params = meta_params(meta)
    h = params.get("h")
    h = float(h) if isinstance(h, (int, float)) and not isinstance(h, bool) else None
    panels = [("Predicted vs actual acceptance (drafted tokens, binned)", "predicted acceptance a^",
               "actual acceptance", _calibration(drafts, num_bins)),
              ("Where each round stopped", "round", "tokens", _round_lengths(drafts)),
              ("Predicted chance of a rejection when the round stopped", "round", "1 − Π a^",
               _round_risk(drafts, h))]
    panels = [p for p in panels if p[3]]
    fig = make_subplots(rows=len(panels), cols=1, subplot_titles=[p[0] for p in panels], vertical_spacing=0.1)
    for i, (_, x_title, y_title, traces) in enumerate(panels, start=1):
        for trace in traces:
            fig.add_trace(trace, row=i, col=1)
        unit = y_title in ("actual acceptance", "1 − Π a^")
        fig.update_xaxes(title_text=x_title, row=i, col=1, range=[0, 1] if x_title.startswith("predicted") else None)
        fig.update_yaxes(title_text=y_title, row=i, col=1, range=[0, 1.05] if unit else None)
    fig.update_layout(barmode="overlay")
    return style(fig, "Predicted acceptance and draft lengths", height=120 + 300 * len(panels), legend_right=True)
