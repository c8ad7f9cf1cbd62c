"""SpecDec++'s acceptance head under speculative adaptive=specdec (docs/strategies.md#speculative; Huang et al.,
"SpecDec++: Boosting Speculative Decoding via Adaptive Candidate Lengths", arXiv 2405.19715): the stop rule fed the
exact a_i is the oracle's; h -> 1 drafts K_max per round, h -> 0 drafts K_min; on the embedded pair the trained head
runs, greedy output equals target greedy, the head file loads and predicts probabilities, and the viz figure builds
from a real run's trace."""

from __future__ import annotations

import math

import plotly.graph_objects as go
import pandas as pd
import pytest
import torch

from declab.models.acceptance import AcceptanceHead, acceptance_path, load_acceptance_head
from declab.run import Run, RunRequest
from strategies.speculative import SPECDEC_MIN_DRAFT, acceptance_head_for, specdec_keep_going, specdec_length
from tests.fake import FakeLM, drafted_logits, hashed_logits, no_eos
from viz.acceptance import predicted_acceptance_figure

K_MAX = 6


class ToyHead:
    """A 'head' that knows the exact a of every token: the fake draft's state of a token is its row of `embed`, so
    the token is read back from the state and its a looked up."""

    def __init__(self, draft: FakeLM, a: torch.Tensor):
        self.embed, self.a = draft.embed, a                                      # [V, H], [V]

    def p_accept(self, states: torch.Tensor) -> torch.Tensor:                   # [..., H] -> [...]
        ids = torch.cdist(states.reshape(-1, states.shape[-1]).float(), self.embed).argmin(-1)   # [N]
        return self.a[ids].reshape(states.shape[:-1])


def toy_a(V: int) -> torch.Tensor:
    """Known per-token acceptances in [0.5, 0.99]."""
    return 0.5 + 0.49 * torch.rand(V, generator=torch.Generator().manual_seed(3))


def fake_pair():
    V = len(FakeLM().vocab)
    return FakeLM(no_eos(hashed_logits(V))), FakeLM(no_eos(drafted_logits(V, 1.0)), key="fake-draft")


def spec_run(lm, draft, n=40, **params):
    params = dict({"adaptive": "specdec", "max_draft_tokens": K_MAX, "measure_speedup": False}, **params)
    return Run(lm, RunRequest(model=lm.key, strategy="speculative", prompt=" the cat", params=params,
                              max_new_tokens=n, seed=0), models={"draft": draft}).run_to_end()


@pytest.fixture
def toy(monkeypatch, fake_registry):
    target, draft = fake_pair()
    a = toy_a(draft.vocab_size)
    monkeypatch.setattr("strategies.speculative.acceptance_head_for",
                        lambda t, d: ToyHead(d, a) if d is draft else None)
    return target, draft, a


def rounds(frame: pd.DataFrame):
    return frame[frame.kind == "propose"].groupby("round")


# ------------------------------------------------------------------------------------------- (a) oracle rule
def test_stop_rule_by_hand():
    # a = 0.9, 0.8, 0.5: after token 2 the risk is 1 - 0.9 = 0.1, after 3 it is 1 - 0.72 = 0.28, after 4 0.64
    a = [0.9, 0.8, 0.5, 0.9, 0.9]
    assert specdec_length(a, h=0.05, k_max=8) == 2          # K_min: token 1 is never judged alone
    assert specdec_length(a, h=0.2, k_max=8) == 3
    assert specdec_length(a, h=0.5, k_max=8) == 4
    assert specdec_length(a, h=0.5, k_max=3) == 3           # K_max caps
    assert specdec_length([0.1], h=0.01, k_max=1) == 1      # K_max wins over K_min
    assert specdec_keep_going([], 1, 0.0) and not specdec_keep_going([0.99], SPECDEC_MIN_DRAFT, 0.0)


def test_a_head_fed_the_exact_a_reproduces_the_oracle_stop_rule(toy):
    target, draft, a = toy
    h = 0.6
    res = spec_run(target, draft, n=60, h=h)
    assert res.meta["metrics"]["acceptance_predictor"] == "trained head"
    for r, rows in rounds(res.frame):
        tokens = rows["token_id"].astype(int).tolist()
        exact = [float(a[t]) for t in tokens]
        allowed = int(rows["gamma"].iloc[0])
        assert len(tokens) == specdec_length(exact, h, allowed), (r, exact)
        conf = rows["confidence"].tolist()                  # the trace carries a_j; the last token has none
        assert conf[:-1] == pytest.approx(exact[:-1]) and pd.isna(conf[-1])


# ------------------------------------------------------------------------------------------- (b) h limits
def test_h_to_one_drafts_k_max_and_h_to_zero_drafts_k_min(toy):
    target, draft, _ = toy
    n = 40
    for h, want in ((1.0, K_MAX), (1e-9, SPECDEC_MIN_DRAFT)):
        res = spec_run(target, draft, n=n, h=h)
        for _, rows in rounds(res.frame):
            allowed = int(rows["gamma"].iloc[0])                # min(K_max, tokens left - 1)
            assert len(rows) == min(want, allowed), (h, len(rows), allowed)
        assert res.meta["metrics"]["mean_draft_length"] == pytest.approx(want, abs=1.0)


def test_without_a_head_the_draft_confidence_proxy_runs(fake_registry):
    target, draft = fake_pair()
    assert load_acceptance_head(target, draft) is None and acceptance_head_for(target, draft) is None
    res = spec_run(target, draft, n=30, h=0.6)
    assert res.meta["metrics"]["acceptance_predictor"] == "draft confidence"
    assert res.frame[res.frame.kind == "propose"]["confidence"].notna().all()
    off = spec_run(target, draft, n=10, adaptive="off")
    assert "acceptance_predictor" not in off.meta["metrics"]


# ------------------------------------------------------------------------------------------- embedded pair
@pytest.fixture(scope="module")
def real_runs(real_lm, draft_lm):
    prompt = "Explain why the sky is blue."

    def go_(strategy, **params):
        return Run(real_lm, RunRequest(model=real_lm.key, strategy=strategy, prompt=prompt, prompt_format="chat",
                                       params=params, max_new_tokens=32, second_model=draft_lm.key),
                   models={"draft": draft_lm}).run_to_end()
    return go_("greedy"), go_("speculative", adaptive="specdec", h=0.7, measure_speedup=False)


@pytest.mark.model
def test_greedy_specdec_with_the_trained_head_equals_target_greedy(real_lm, draft_lm, real_runs):
    assert isinstance(acceptance_head_for(real_lm, draft_lm), AcceptanceHead), \
        "the embedded target should hand out its acceptance head: LM.acceptance_head(draft) in declab/models/lm.py"
    ref, res = real_runs
    assert res.sequences[0].token_ids == ref.sequences[0].token_ids
    m = res.meta["metrics"]
    assert m["acceptance_predictor"] == "trained head" and m["drafter"] == "smollm2-135m-draft"
    for _, rows in rounds(res.frame):
        conf = rows["confidence"].tolist()
        assert all(0.0 <= c <= 1.0 for c in conf[:-1]) and pd.isna(conf[-1])
        assert len(rows) >= min(SPECDEC_MIN_DRAFT, int(rows["gamma"].iloc[0]))


@pytest.mark.model
def test_the_head_file_loads_and_predicts_probabilities(real_lm, draft_lm, fake_lm):
    path = acceptance_path(real_lm, draft_lm)
    assert path is not None and path.stat().st_size <= 10_000_000
    head, info = load_acceptance_head(real_lm, draft_lm)
    assert isinstance(head, AcceptanceHead) and head.num_layers == 3
    assert head.hidden_size == draft_lm.model.config.hidden_size
    assert info["recipe"]["weight_mismatch"] == 6 and info["recipe"]["mixing_ratio"] == 0.15
    assert load_acceptance_head(real_lm, draft_lm)[0] is head                  # loaded once
    states = torch.randn(5, 7, head.hidden_size, generator=torch.Generator().manual_seed(0))
    p = head.p_accept(states)
    assert p.shape == (5, 7) and bool(((p >= 0) & (p <= 1)).all())
    held = info["held_out"]
    assert 0 < held["mean_pred"] < 1 and held["auc"] > 0.5 and held["bce_debiased"] < held["bce_constant"]
    assert load_acceptance_head(real_lm, fake_lm) is None                     # no head for another draft


@pytest.mark.model
def test_the_viz_figure_builds_from_a_real_run(real_runs):
    _, res = real_runs
    fig = predicted_acceptance_figure(res.frame, res.meta)
    assert isinstance(fig, go.Figure)
    names = {t.name for t in fig.data}
    assert {"accepted share (verified drafts)", "drafted (where the round stopped)", "h = 0.7"} <= names
    bars = next(t for t in fig.data if t.name.startswith("drafted"))
    assert sum(bars.y) == res.meta["metrics"]["drafted"]


def test_the_viz_escapes_token_text_and_skips_frames_without_drafts():
    frame = pd.DataFrame({"kind": ["propose", "propose", "accept", "reject"], "round": [0, 0, 0, 0],
                          "draft_pos": [1, 2, 1, 2], "confidence": [0.9, math.nan, None, None], "gamma": [4] * 4,
                          "token_text": ["<script>alert(1)</script>", "<b>x", "a", "b"],
                          "verdict": [None, None, "accepted", "rejected"], "step": [0, 1, 0, 1]})
    fig = predicted_acceptance_figure(frame)
    text = fig.to_json()
    assert "<script>" not in text and "<b>x" not in text and "&lt;script&gt;" in text
    assert predicted_acceptance_figure(frame[frame.kind != "propose"]) is None
    assert predicted_acceptance_figure(pd.DataFrame({"kind": ["token"]})) is None
