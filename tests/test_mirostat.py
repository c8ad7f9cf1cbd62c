"""Mirostat v1/v2 on the scripted fake model and on synthetic distributions: docs/strategies.md#mirostat property tests,
the reference's k and s_hat recomputed independently, trace identities, config validation, the figures."""

import math

import pandas as pd
import pytest
import torch

import viz
from declab.core.errors import UserError
from tests.fake import DEFAULT_VOCAB, FakeLM, hashed_logits
from declab.run import Run, RunRequest
from declab.core import get_strategy
from strategies.mirostat import Controller, MirostatConfig, zipf_exponent, zipf_k

LN2 = math.log(2.0)


@pytest.fixture(autouse=True)
def _fake_registry(fake_registry):
    yield


def run(lm, n=40, seed=0, prompt=" the cat", strategy="mirostat", **params):
    return Run(lm, RunRequest(model=lm.key, strategy=strategy, prompt=prompt, params=params, max_new_tokens=n,
                              seed=seed)).run_to_end()


def tokens_of(res) -> pd.DataFrame:
    return res.frame[res.frame.kind == "token"].reset_index(drop=True)


def no_eos_lm() -> FakeLM:
    """The default fake model with EOS (id 0) at -inf, so runs last their full length (and the Zipf fit meets a
    zero probability in its last rank)."""
    table = hashed_logits(len(DEFAULT_VOCAB))

    def fn(context):
        logits = table(context).clone()
        logits[0] = float("-inf")
        return logits
    return FakeLM(logits_fn=fn)


def controller(seed=0, vocab=1000, **params):
    return Controller(MirostatConfig(**params), vocab, torch.Generator().manual_seed(seed))


def zipf_logits(vocab: int, s: float, perm: torch.Tensor | None = None) -> torch.Tensor:
    logits = -s * torch.log(torch.arange(1, vocab + 1, dtype=torch.float64))
    return (logits if perm is None else logits[perm.argsort()]).float()


# ------------------------------------------------------------------------------------------------ reference pieces
def reference_s_hat(probs_sorted: list[float], pairs: int) -> float:
    """The reference mirostat.py's estimate_s, in plain Python on probabilities."""
    num = den = 0.0
    for i in range(pairs):
        b = probs_sorted[i] / probs_sorted[i + 1]
        t = (i + 2) / (i + 1)
        num += math.log(b) * math.log(t)
        den += math.log(t) ** 2
    return num / den


def reference_k(n: int, s: float, mu: float) -> int:
    """The reference's compute_k(n, s, mu) + 1, plus our clamp to [1, n]."""
    eps = s - 1
    k = ((eps * (2 ** mu)) / (1 - n ** (-eps))) ** (1 / s)
    return min(max(round(k) + 1, 1), n)


# ------------------------------------------------------------------------------------------------ 2.3 (a)
@pytest.mark.parametrize("s", [0.6, 1.0, 1.1, 1.5, 2.5])
def test_zipf_exponent_recovers_s_of_an_exact_zipf(s):
    logits = zipf_logits(5000, s)
    logp = torch.log_softmax(logits.double(), -1)
    assert zipf_exponent(logp[:101]) == pytest.approx(s, abs=1e-5)
    # through the selector, from float32 logits, shuffled vocabulary: the traced s_hat is the same
    perm = torch.randperm(5000, generator=torch.Generator().manual_seed(3))
    _, _, extra = controller(vocab=5000).select(zipf_logits(5000, s, perm))
    assert extra["s_hat"] == pytest.approx(s, abs=1e-5)


def test_zipf_exponent_uses_m_ranks_and_skips_zero_probabilities():
    logp = torch.log_softmax(zipf_logits(50, 1.3).double(), -1)
    logp[3:] += torch.linspace(0, -5, 47, dtype=torch.float64)   # not Zipf beyond rank 3
    assert zipf_exponent(logp[:3]) == pytest.approx(1.3, abs=1e-6)   # m = 3 ranks: 2 pairs, both exact
    assert zipf_exponent(logp[:10]) != pytest.approx(1.3, abs=1e-3)
    with_zero = torch.cat([logp[:3], torch.tensor([float("-inf")] * 4, dtype=torch.float64)])
    assert zipf_exponent(with_zero) == pytest.approx(1.3, abs=1e-6)
    assert math.isnan(zipf_exponent(torch.tensor([0.0, float("-inf")])))


def test_zipf_k_formula_limits_and_no_overflow():
    n = 49152
    for s, mu in [(1.3, 6.0), (0.8, 4.0), (2.0, -3.0), (1.05, 10.0)]:
        eps = s - 1
        assert zipf_k(s, mu, n) == pytest.approx(((eps * 2 ** mu) / (1 - n ** (-eps))) ** (1 / s), rel=1e-9)
    # eps -> 0: eps / (1 - n^-eps) -> 1 / ln n, continuous across s = 1
    assert zipf_k(1.0, 5.0, n) == pytest.approx(2 ** 5 / math.log(n), rel=1e-9)
    assert zipf_k(1.0 + 1e-9, 5.0, n) == pytest.approx(zipf_k(1.0, 5.0, n), rel=1e-6)
    assert math.isfinite(zipf_k(1.2, 5000.0, n)) and zipf_k(1.2, -5000.0, n) >= 0.0   # 2^mu would overflow


# ------------------------------------------------------------------------------------------------ v1 = the reference
@pytest.mark.parametrize("mu", [-2.0, 0.5, 3.0, 6.0, 9.0])
def test_v1_s_hat_and_k_equal_the_reference_computation(mu):
    gen = torch.Generator().manual_seed(11)
    vocab = 3000
    for _ in range(20):
        s = 0.7 + 1.3 * float(torch.rand((), generator=gen))
        logits = zipf_logits(vocab, s) + 0.3 * torch.randn(vocab, generator=gen)   # Zipf-like, not exact
        c = controller(vocab=vocab, version=1, tau=3.0)
        c.mu = mu
        token, score, extra = c.select(logits)
        probs = torch.softmax(logits.double(), -1).sort(descending=True).values.tolist()
        s_ref = reference_s_hat(probs, 100)
        assert extra["s_hat"] == pytest.approx(s_ref, abs=1e-5)
        assert extra["k"] == reference_k(vocab, s_ref, mu)
        # the sampled token is among the k most likely, and score is its log-prob renormalised over them
        logp = torch.log_softmax(logits.double(), -1)
        assert int((logp > logp[token]).sum()) < extra["k"]
        top = logp.sort(descending=True).values[: extra["k"]]
        assert score == pytest.approx(float(logp[token] - torch.logsumexp(top, 0)), abs=1e-5)


def test_v1_k_is_clamped_to_the_vocabulary():
    c = controller(vocab=32, version=1, tau=30.0)                  # mu = 60 bits: 2^mu is astronomically large
    logits = torch.randn(32, generator=torch.Generator().manual_seed(0))
    assert c.select(logits)[2]["k"] == 32
    c.mu = -200.0
    assert c.select(logits)[2]["k"] == 1


# ------------------------------------------------------------------------------------------------ 2.3 (b) feedback
def stationary_rows(steps: int, vocab: int = 2000, seed: int = 5):
    """A stationary Zipf-like toy LM: each step a Zipf row (s ~ U[1.1, 1.5]: greedy surprise ~1.4-2.6 bits, entropy
    ~4.3-7.3 bits, so tau = 2..5 is reachable) over a fresh random token order, with a little noise."""
    gen = torch.Generator().manual_seed(seed)
    base = -torch.log(torch.arange(1, vocab + 1, dtype=torch.float32))
    for _ in range(steps):
        s = 1.1 + 0.4 * float(torch.rand((), generator=gen))
        row = s * base + 0.2 * torch.randn(vocab, generator=gen)
        yield row[torch.randperm(vocab, generator=gen)]


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("tau", [2.0, 3.0, 5.0])
def test_running_mean_surprise_converges_to_tau(version, tau):
    c = controller(seed=version, vocab=2000, version=version, tau=tau)
    surprises, mus = [], []
    for row in stationary_rows(5000):
        token, _, extra = c.select(row)
        full = -float(torch.log_softmax(row, -1)[token]) / LN2
        assert extra["surprise"] == pytest.approx(full, abs=1e-4)            # surprise_from=full
        surprises.append(extra["surprise"])
        mus.append(extra["mu_after"])
    mean = sum(surprises) / len(surprises)
    assert abs(mean - tau) < 0.1, (version, tau, mean)
    # why: with eta = 1 the update telescopes, mean(S) - tau = (mu_0 - mu_T) / T, and mu_T stays bounded
    assert mean - tau == pytest.approx((2 * tau - mus[-1]) / len(surprises), abs=1e-9)


@pytest.mark.parametrize("version", [1, 2])
def test_truncated_surprise_lets_the_true_surprise_exceed_tau(version):
    """llama.cpp's choice: the controller sees the truncated (renormalised) surprise, which is never above the
    full one, so it holds *that* at tau and the surprise against the model ends above tau (docs/strategies.md#mirostat)."""
    tau = 3.0
    c = controller(seed=1, vocab=2000, version=version, tau=tau, surprise_from="truncated")
    seen, true = [], []
    for row in stationary_rows(3000):
        token, score, extra = c.select(row)
        full = -float(torch.log_softmax(row, -1)[token]) / LN2
        assert extra["surprise"] == pytest.approx(-score / LN2) and extra["surprise"] <= full + 1e-6
        seen.append(extra["surprise"])
        true.append(full)
    assert abs(sum(seen) / len(seen) - tau) < 0.1
    assert sum(true) / len(true) > tau + 0.2


# ------------------------------------------------------------------------------------------------ 2.3 (c) and (d)
def test_v2_with_mu_below_the_top_surprise_keeps_one_token_and_equals_greedy():
    lm = no_eos_lm()
    res = run(lm, n=40, version=2, tau=0.01)                       # mu = 0.02 bits < -log2 p_max at every step
    greedy = run(no_eos_lm(), n=40, strategy="greedy")
    tokens = tokens_of(res)
    assert len(tokens) == 40 and (tokens.k == 1).all()
    assert res.sequences[0].token_ids == greedy.sequences[0].token_ids
    assert (tokens.score == 0.0).all()                             # the kept set is one token, renormalised to p = 1
    c = controller(vocab=4, version=2, tau=1.0)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0])
    c.mu = -math.log2(float(torch.softmax(logits, -1)[0])) - 1e-3
    for _ in range(5):
        token, _, extra = c.select(logits)
        assert token == 0 and extra["k"] == 1
        c.mu = min(c.mu, extra["mu"])


def test_v2_truncates_in_bits_not_nats():
    """p = [0.8, 0.2] and mu = 2: -log2 0.2 = 2.32 > 2 cuts the second token; -ln 0.2 = 1.61 would keep it."""
    logits = torch.tensor([0.0, -1.386])
    for seed in range(50):
        c = controller(seed=seed, vocab=2, version=2, tau=1.0)       # mu = 2 tau = 2 bits
        token, score, extra = c.select(logits)
        assert extra["mu"] == 2.0 and extra["k"] == 1 and token == 0
    c = controller(vocab=2, version=2, tau=1.2)                     # mu = 2.4 bits >= 2.32: both kept
    assert c.select(logits)[2]["k"] == 2


def test_v2_kept_set_is_the_surprise_prefix():
    gen = torch.Generator().manual_seed(4)
    for _ in range(50):
        logits = 3 * torch.randn(200, generator=gen)
        c = controller(seed=1, vocab=200, version=2, tau=2.0)
        c.mu = float(torch.rand((), generator=gen)) * 8
        token, _, extra = c.select(logits)
        bits = -torch.log_softmax(logits, -1) / LN2
        expected = max(int((bits <= extra["mu"]).sum()), 1)
        assert extra["k"] == expected
        assert bits[token] <= extra["mu"] or extra["k"] == 1 and token == int(logits.argmax())


# ------------------------------------------------------------------------------------------------ trace and runs
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("surprise_from", ["full", "truncated"])
def test_trace_records_the_control_loop(version, surprise_from):
    tau, eta = 2.5, 0.7
    res = run(no_eos_lm(), n=30, seed=3, version=version, tau=tau, eta=eta, surprise_from=surprise_from)
    assert res.status == "ok"
    t = tokens_of(res)
    assert len(t) == 30
    expected_cols = {"mu", "mu_after", "surprise", "error", "surprise_mean", "k"} | ({"s_hat"} if version == 1 else set())
    assert expected_cols <= set(t.columns) and t[list(expected_cols)].notna().all().all()
    assert version == 1 or "s_hat" not in t.columns
    assert t.mu.iloc[0] == 2 * tau
    assert t.mu.iloc[1:].tolist() == pytest.approx(t.mu_after.iloc[:-1].tolist())
    assert t.mu_after.tolist() == pytest.approx((t.mu - eta * (t.surprise - tau)).tolist())
    assert t.error.tolist() == pytest.approx((t.surprise - tau).tolist())
    assert t.surprise_mean.tolist() == pytest.approx(t.surprise.expanding().mean().tolist())
    assert ((t.cut_mass >= 0) & (t.cut_mass < 1)).all()
    # cut mass = 1 - (kept mass) and p_kept(x) = p(x) / kept mass, so cut mass = 1 - exp(logprob - score)
    assert t.cut_mass.tolist() == pytest.approx((1 - (t.logprob - t.score).map(math.exp)).tolist(), abs=1e-5)
    full = -t.logprob / LN2                                          # logprob is the model's ln p (temperature 1)
    measured = full if surprise_from == "full" else -t.score / LN2
    assert t.surprise.tolist() == pytest.approx(measured.tolist(), abs=1e-5)
    assert ((t.k >= 1) & (t.k <= 32)).all() and (t.score <= 1e-6).all()
    assert res.meta["params"] == {"version": version, "tau": tau, "eta": eta, "m": 101, "temperature": 1.0,
                                  "v1_rule": "script", "surprise_from": surprise_from}


def test_every_token_comes_from_the_kept_set_and_logprob_stays_the_models():
    lm = no_eos_lm()
    for version in (1, 2):
        res = run(lm, n=40, seed=9, version=version, tau=1.5, temperature=0.7)
        t = tokens_of(res)
        ctx = lm.encode_prompt(" the cat", "raw")
        for _, row in t.iterrows():
            logits = lm.logits_fn(ctx)
            assert row.logprob == pytest.approx(float(torch.log_softmax(logits, -1)[row.token_id]), abs=1e-5)
            tempered = torch.log_softmax(logits / 0.7, -1)
            assert row.surprise == pytest.approx(-float(tempered[row.token_id]) / LN2, abs=1e-4)
            rank = int((tempered > tempered[row.token_id]).sum())
            assert rank < row.k
            if version == 2 and row.k > 1:
                assert row.surprise <= row.mu + 1e-6
            ctx.append(int(row.token_id))


def test_seeded_runs_repeat_and_state_is_per_run():
    a = run(no_eos_lm(), n=30, seed=1, version=1, tau=2.0)
    b = run(no_eos_lm(), n=30, seed=1, version=1, tau=2.0)
    c = run(no_eos_lm(), n=30, seed=2, version=1, tau=2.0)
    assert a.sequences[0].token_ids == b.sequences[0].token_ids != c.sequences[0].token_ids
    assert tokens_of(a).mu.tolist() == tokens_of(b).mu.tolist()
    assert tokens_of(b).mu.iloc[0] == 4.0                          # a new run starts again from 2 tau


def test_eta_zero_freezes_mu():
    t = tokens_of(run(no_eos_lm(), n=20, seed=0, version=2, tau=2.0, eta=0.0))
    assert (t.mu == 4.0).all() and (t.mu_after == 4.0).all()


def test_config_validation_messages():
    s = get_strategy("mirostat")
    cfg = s.make_config({"version": "2", "tau": "5", "eta": "0.1", "m": "100", "surprise_from": "truncated"})
    assert (cfg.version, cfg.tau, cfg.eta, cfg.m, cfg.surprise_from) == (2, 5.0, 0.1, 100, "truncated")
    cfg = s.make_config({})
    assert (cfg.version, cfg.tau, cfg.eta, cfg.m, cfg.temperature, cfg.surprise_from) == (1, 3.0, 1.0, 101, 1.0, "full")
    for params, text in [({"version": 3}, "version must be one of 1, 2"), ({"tau": 0.0}, "tau must be in (0.0, 30.0]"),
                         ({"eta": -1.0}, "eta must be in [0.0, 10.0]"), ({"m": 1}, "m must be in [2, 100000]"),
                         ({"temperature": 0.0}, "temperature must be in (0.0, 100.0]"),
                         ({"surprise_from": "model"}, "surprise_from must be one of full, truncated"),
                         ({"tau": "abc"}, "tau must be float"), ({"mu": 3}, "unknown parameter 'mu'")]:
        with pytest.raises(UserError, match=text.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                           .replace("]", r"\]")):
            s.make_config(params)


def test_cli_runs_mirostat_and_writes_the_trace(tmp_path, capsys):
    from declab.cli import main
    from declab.core.trace import read_meta, read_trace
    out_csv, out_json = tmp_path / "m.csv", tmp_path / "m.json"
    assert main(["run", "--strategy", "mirostat", "--set", "version=2", "--set", "tau=2", "--prompt", " the cat",
                 "--max-new-tokens", "12", "--seed", "3", "--csv", str(out_csv), "--json", str(out_json)]) == 0
    meta = read_meta(tmp_path / "m.meta.json")
    frame = read_trace(out_csv, meta["columns"])
    assert meta["params"]["version"] == 2 and meta["params"]["tau"] == 2.0
    assert {"mu", "mu_after", "surprise", "error", "k"} <= set(frame.columns)
    assert main(["run", "--strategy", "mirostat", "--set", "version=7", "--prompt", "x"]) == 2
    assert "version must be one of 1, 2" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ figures
def test_mechanism_figure_lights_up_on_a_real_trace():
    res = run(no_eos_lm(), n=25, seed=0, version=1, tau=2.0)
    figs = viz.figures_for(res.frame, res.meta)
    assert "Mirostat" in figs
    fig = figs["Mirostat"]
    names = [t.name for t in fig.data]
    assert names == ["μ before step", "μ after update", "observed surprise S_t", "running mean of S_t",
                     "k (tokens kept)"]
    t = tokens_of(res)
    assert list(fig.data[0].y) == pytest.approx(t.mu.tolist())
    assert list(fig.data[3].y) == pytest.approx(t.surprise_mean.tolist())
    assert [s.y0 for s in fig.layout.shapes] == [2.0]              # the tau line


def test_traps_figure_running_surprise_repetition_and_tau():
    from viz.mirostat import repeated_ngram_share, rolling_surprise, traps_figure
    lm = no_eos_lm()
    frames = {"mirostat v2 τ=2": run(lm, n=60, seed=0, version=2, tau=2.0).frame,
              "greedy": run(lm, n=60, strategy="greedy").frame,
              "<b>pure</b> sampling": run(lm, n=60, strategy="sample").frame}
    fig = traps_figure(frames, tau=2.0, window=8)
    names = [t.name for t in fig.data]
    assert names[:3] == ["mirostat v2 τ=2", "greedy", "&lt;b&gt;pure&lt;/b&gt; sampling"]   # escaped labels
    assert len(fig.data) == 6                                        # surprise and repetition per run
    assert [s.y0 for s in fig.layout.shapes] == [2.0]
    t = tokens_of(run(lm, n=60, seed=0, version=2, tau=2.0))
    expected = (-t.logprob / LN2).rolling(8, min_periods=1).mean()
    assert list(fig.data[0].y) == pytest.approx(expected.tolist())
    assert list(rolling_surprise(t, None)) == pytest.approx((-t.logprob / LN2).expanding().mean().tolist())
    share = repeated_ngram_share([1, 2, 3, 1, 2, 3, 1, 2], n=3)
    assert list(share) == pytest.approx([0, 0, 0, 0, 0, 1 / 6, 2 / 7, 3 / 8])
    assert traps_figure({}, tau=None).data == ()
