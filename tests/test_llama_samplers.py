"""llama.cpp's samplers (strategies/llama_samplers.py) against the cases of llama.cpp's own tests/test-sampling.cpp
(ggml-org/llama.cpp; each test names the upstream function and its call), plus the hand cases of
docs/strategies.md#sampler_chain (the DRY repeat counts of llama.cpp's comment, dynamic temperature at its ends,
top-nσ's invariance under temperature, chain order).

Upstream's `sampler_tester` builds the candidates as logit = ln(p) for the given p, applies the sampler (and,
where the upstream test does, the `dist` sampler, which renormalises), and checks the array's p within 1e-5. The
array's order is llama.cpp's (sorted by some samplers); here each expected value is matched to its token id."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from declab.core.errors import UserError
from strategies.llama_samplers import (Cands, Dry, MinP, Penalties, Temperature, TopK, TopNSigma, TopP, Typical,
                                       Xtc, draw, dry_breakers, parse_breakers, parse_logit_bias, parse_samplers)


def cands(probs) -> Cands:
    p = torch.tensor(probs, dtype=torch.float32)
    return Cands.full(p.log(), p)


def apply(c: Cands, *samplers) -> Cands:
    for s in samplers:
        c, _ = s.apply(c)
    return c


def dist_probs(c: Cands, n: int) -> list[float]:
    """What upstream's dist sampler leaves: p over the candidates, by token id (0 where removed)."""
    out = [0.0] * n
    for tid, p, alive in zip(c.ids.tolist(), c.probs().tolist(), c.alive().tolist()):
        if alive:
            out[tid] = p
    return out


def kept_ids(c: Cands) -> set[int]:
    return {int(t) for t, a in zip(c.ids.tolist(), c.alive().tolist()) if a}


def check(c: Cands, expected_by_id: dict[int, float], n: int) -> None:
    got = dist_probs(c, n)
    want = [expected_by_id.get(i, 0.0) for i in range(n)]
    assert got == pytest.approx(want, abs=1e-5), (got, want)


P4 = [0.1, 0.2, 0.3, 0.4]


# ------------------------------------------------------------------------------------------------ test_temp / _ext
@pytest.mark.parametrize("temp, expected", [(1.0, {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4}), (0.0, {3: 1.0})])
def test_upstream_test_temp(temp, expected):
    """test_temp({0.1, 0.2, 0.3, 0.4}, ..., 1.0) and (..., {0, 0, 0, 1}, 0.0): temperature 0 keeps the largest."""
    check(apply(cands(P4), Temperature(temp, 0.0, 1.0)), expected, 4)


@pytest.mark.parametrize("temp, expected", [(1.0, {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4}), (0.0, {3: 1.0})])
def test_upstream_test_temp_ext(temp, expected):
    """test_temp_ext(P4, ..., temp, delta 0, exponent 1): temp-ext without a range is plain temperature."""
    check(apply(cands(P4), Temperature(temp, 0.0, 1.0)), expected, 4)


# ------------------------------------------------------------------------------------------------ test_top_k
@pytest.mark.parametrize("k, expected", [
    (1, {3: 1.0}),
    (3, {3: 0.44444, 2: 0.33333, 1: 0.22222}),
    (4, {3: 0.4, 2: 0.3, 1: 0.2, 0: 0.1}),
    (0, {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4}),
])
def test_upstream_test_top_k(k, expected):
    """test_top_k(P4, ..., k) for k = 1, 3, 4, 0 (0 = off)."""
    check(apply(cands(P4), TopK(k)), expected, 4)


# ------------------------------------------------------------------------------------------------ test_top_p
@pytest.mark.parametrize("p, expected", [
    (0.0, {3: 1.0}),
    (0.7, {3: 0.571429, 2: 0.428571}),
    (0.8, {3: 0.44444, 2: 0.33333, 1: 0.22222}),
    (1.0, {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4}),
])
def test_upstream_test_top_p(p, expected):
    """test_top_p(P4, ..., p) with min_keep 0, for p = 0, 0.7, 0.8, 1."""
    check(apply(cands(P4), TopP(p, 0)), expected, 4)


# ------------------------------------------------------------------------------------------------ test_min_p
@pytest.mark.parametrize("p, expected", [
    (0.00, {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4}),
    (0.24, {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4}),
    (0.26, {1: 0.2 / 0.9, 2: 0.3 / 0.9, 3: 0.4 / 0.9}),
    (0.49, {1: 0.2 / 0.9, 2: 0.3 / 0.9, 3: 0.4 / 0.9}),
    (0.51, {2: 0.3 / 0.7, 3: 0.4 / 0.7}),
    (0.74, {2: 0.3 / 0.7, 3: 0.4 / 0.7}),
    (0.76, {3: 1.0}),
    (1.00, {3: 1.0}),
    (1.05, {3: 1.0}),
])
def test_upstream_test_min_p(p, expected):
    """test_min_p(P4, ..., p) with min_keep 0 for the nine upstream p values (1.05: nothing passes, the top stays)."""
    check(apply(cands(P4), MinP(p, 0)), expected, 4)


# ------------------------------------------------------------------------------------------------ test_xtc
@pytest.mark.parametrize("threshold, kept", [(0.09, {3}), (0.19, {2, 3}), (0.29, {1, 2, 3}), (0.39, {0, 1, 2, 3})])
def test_upstream_test_xtc(threshold, kept):
    """test_xtc({0.4, 0.3, 0.2, 0.1}, ..., 0.99, t): "XTC should" remove all but the least likely of the tokens
    >= t (t = 0.09, 0.19, 0.29), "XTC should not" when only one qualifies (0.39). Upstream leaves p unnormalised
    (no dist after it): the kept tokens keep their input p. Seed 0's first draw here is <= 0.99, as upstream's."""
    g = torch.Generator().manual_seed(0)
    assert float(torch.rand((), generator=torch.Generator().manual_seed(0))) <= 0.99
    c_in = cands([0.4, 0.3, 0.2, 0.1])
    c, stats = Xtc(0.99, threshold, 0, g).apply(c_in)
    assert kept_ids(c) == kept
    assert bool(stats["xtc_fired"]) == (len(kept) < 4)
    p_in = c_in.probs().tolist()
    check(c, {i: p_in[i] / sum(p_in[j] for j in kept) for i in kept}, 4)


def test_xtc_fires_with_its_probability_from_the_run_generator():
    """One uniform draw per step from the run's generator: over 4000 steps it fires on ~xtc_probability of them,
    and the same seed fires on the same steps."""
    def fires(seed):
        g = torch.Generator().manual_seed(seed)
        s = Xtc(0.3, 0.1, 0, g)
        return [bool(s.apply(cands([0.4, 0.3, 0.2, 0.1]))[1]["xtc_fired"]) for _ in range(4000)]
    a = fires(5)
    assert abs(sum(a) / len(a) - 0.3) < 0.03
    assert a == fires(5) and a != fires(6)


def test_xtc_is_off_above_threshold_half_and_respects_min_keep():
    g = torch.Generator().manual_seed(0)
    assert kept_ids(apply(cands([0.4, 0.3, 0.2, 0.1]), Xtc(1.0, 0.51, 0, g))) == {0, 1, 2, 3}
    # three tokens >= 0.15 would leave 2 candidates: min_keep 3 forbids it
    assert kept_ids(apply(cands([0.4, 0.3, 0.2, 0.1]), Xtc(1.0, 0.15, 3, g))) == {0, 1, 2, 3}
    assert kept_ids(apply(cands([0.4, 0.3, 0.2, 0.1]), Xtc(1.0, 0.15, 2, g))) == {2, 3}


# ------------------------------------------------------------------------------------------------ test_typical
@pytest.mark.parametrize("probs, kept", [([0.97, 0.01, 0.01, 0.01], {0}), ([0.4, 0.2, 0.2, 0.2], {1, 2, 3})])
def test_upstream_test_typical(probs, kept):
    """test_typical({0.97, 0.01, 0.01, 0.01}, {0.97}, 0.5) and ({0.4, 0.2, 0.2, 0.2}, {0.2, 0.2, 0.2}, 0.5): the
    kept tokens with their (unnormalised, no dist upstream) input p."""
    c = apply(cands(probs), Typical(0.5, 0))
    assert kept_ids(c) == kept
    check(c, {i: probs[i] / sum(probs[j] for j in kept) for i in kept}, 4)


def test_typical_cut_is_strict_and_in_nats():
    """llama.cpp keeps up to the first cumulative p > τ (strictly): with τ = 0.4 on {0.4, 0.2, 0.2, 0.2} the
    three 0.2 tokens (closest to H in nats) give 0.2, 0.4 (not > 0.4), 0.6: all three stay; τ = 0.39 keeps two."""
    assert len(kept_ids(apply(cands([0.4, 0.2, 0.2, 0.2]), Typical(0.4, 0)))) == 3
    assert len(kept_ids(apply(cands([0.4, 0.2, 0.2, 0.2]), Typical(0.39, 0)))) == 2
    _, stats = Typical(0.5, 0).apply(cands([0.4, 0.2, 0.2, 0.2]))
    assert float(stats["entropy_nats"]) == pytest.approx(-(0.4 * math.log(0.4) + 0.6 * math.log(0.2)), abs=1e-6)


# ------------------------------------------------------------------------------------------------ test_penalties
P5 = [0.2] * 5


@pytest.mark.parametrize("last, expected, rep, freq, pres", [
    ([0], {1: 0.25, 2: 0.25, 3: 0.25, 4: 0.25}, 50.0, 0.0, 0.0),
    ([0, 1, 2], {3: 0.5, 4: 0.5}, 50.0, 0.0, 0.0),
    ([0, 1, 2, 0, 0], {3: 0.5, 4: 0.5}, 50.0, 0.0, 0.0),
    ([0], {0: 0.000011, 1: 0.249997, 2: 0.249997, 3: 0.249997, 4: 0.249997}, 1.0, 5.0, 5.0),
    ([0, 1, 2], {0: 0.000023, 1: 0.000023, 2: 0.000023, 3: 0.499966, 4: 0.499966}, 1.0, 5.0, 5.0),
    ([0, 1, 2, 0, 0], {0: 0.0, 1: 0.000023, 2: 0.000023, 3: 0.499977, 4: 0.499977}, 1.0, 5.0, 5.0),
])
def test_upstream_test_penalties(last, expected, rep, freq, pres):
    """test_penalties({0.2 x 5}, last_tokens, expected, repeat, freq, present) for the six upstream cases; the
    window is the accepted tokens (penalty_last_n = their number), then dist."""
    s = Penalties(len(last), rep, freq, pres, 5, "cpu")
    s.reset([])
    for t in last:
        s.accept(t)
    check(apply(cands(P5), s), expected, 5)


def test_penalties_window_forgets_and_order_is_repeat_then_frequency_then_presence():
    s = Penalties(2, 2.0, 0.5, 0.25, 4, "cpu")
    s.reset([0, 1, 1])                       # the prompt feeds the window; it keeps the last 2: {1: 2}
    c, _ = s.apply(Cands.full(torch.tensor([1.0, 3.0, -2.0, 0.0]), torch.full((4,), 0.25)))
    assert c.logits.tolist() == pytest.approx([1.0, 3.0 / 2.0 - 2 * 0.5 - 0.25, -2.0, 0.0])
    s.accept(2)                              # window {1, 2}
    c, _ = s.apply(Cands.full(torch.tensor([1.0, 3.0, -2.0, 0.0]), torch.full((4,), 0.25)))
    assert c.logits.tolist() == pytest.approx([1.0, 1.5 - 0.5 - 0.25, -4.0 - 0.5 - 0.25, 0.0])


# ------------------------------------------------------------------------------------------------ test_dry
def dry(mult, base, allowed, last_n, breakers, last, n):
    s = Dry(mult, base, allowed, last_n, {b[0]: [tuple(b[1:])] for b in breakers}, n, "cpu")
    s.reset([])
    for t in last:
        s.accept(t)
    return s


@pytest.mark.parametrize("probs, last, expected, mult, base, allowed, last_n, breakers", [
    ([0.25] * 4, [0, 1], [0.25] * 4, 1.0, 1.1, 2, 4, []),
    ([0.25] * 4, [0, 1, 2, 0, 1], [0.296923, 0.296923, 0.109232, 0.296923], 1.0, 1.1, 2, 5, []),
    ([0.2] * 5, [0, 1, 3, 4, 0, 1], [0.2] * 5, 1.0, 1.1, 2, 6, [[3]]),
    ([0.2] * 5, [0, 1, 2, 0, 1], [0.241818, 0.241818, 0.032727, 0.241818, 0.241818], 2.0, 1.1, 2, 5, []),
    ([0.2] * 5, [0, 1, 2, 3, 4, 0, 1], [0.2] * 5, 1.0, 1.1, 4, 7, []),
])
def test_upstream_test_dry(probs, last, expected, mult, base, allowed, last_n, breakers):
    """test_dry(probs, last_tokens, expected, multiplier, base, allowed_length, penalty_last_n, seq_breakers) for
    the five upstream cases (token-sequence breakers as llama_sampler_init_dry_testing takes them), then dist."""
    n = len(probs)
    check(apply(cands(probs), dry(mult, base, allowed, last_n, breakers, last, n)), dict(enumerate(expected)), n)


def test_dry_repeat_lengths_of_the_llama_cpp_comment():
    """llama_sampler_dry_apply's comment: context a b c c b c y a b c has repeat counts 0 0 3 1 0 2 0 0 0 0, so with
    allowed length 2, c (L = 3) gets multiplier * 1.75^1, y (L = 2) multiplier * 1.75^0, b (L = 1) nothing."""
    a, b, c, y = 0, 1, 2, 3
    s = dry(0.8, 1.75, 2, -1, [], [a, b, c, c, b, c, y, a, b, c], 4)
    assert s.max_repeats() == {c: 3, y: 2}
    out, stats = s.apply(Cands.full(torch.zeros(4), torch.full((4,), 0.25)))
    assert out.logits.tolist() == pytest.approx([0.0, 0.0, -0.8 * 1.75, -0.8])
    assert int(stats["n_penalised"]) == 2


def test_dry_multi_token_breaker_limits_the_repeat_and_caps_the_exponent():
    """rep_limit = the tokens after the most recent breaker (head 5, tail 6): the suffix 5 6 3 repeats 3 long
    without it; with it only 1 token may count (nothing at allowed length 2, L = 1 at allowed length 1)."""
    ctx = [5, 6, 3, 9, 5, 6, 3]
    assert dry(1.0, 2.0, 2, -1, [], ctx, 10).max_repeats() == {9: 3}
    assert dry(1.0, 2.0, 2, -1, [[5, 6]], ctx, 10).max_repeats() == {}
    assert dry(1.0, 2.0, 1, -1, [[5, 6]], ctx, 10).max_repeats() == {9: 1}
    assert dry(1.0, 2.0, 2, 3, [], ctx, 10).max_repeats() == {}          # a window of 3 holds no repeat
    big = dry(1.0, 1e30, 1, -1, [], [1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2], 8)
    out, _ = big.apply(Cands.full(torch.zeros(8), torch.full((8,), 0.125)))
    assert math.isfinite(float(out.logits[3])) and float(out.logits[3]) < -1e29   # exponent capped, no overflow


def test_dry_breakers_from_strings_over_a_vocabulary():
    """get_overlapping_token_sequences: a token containing the breaker is a single-token breaker; a token ending in
    a prefix of it is a head with the tokenised rest as its tail."""
    class Tok:
        def encode(self, text):
            return {"bc": [8], "c": [9]}[text]
    texts = ["x", "a:", "q", "za", "zab", ":"]
    out = dry_breakers(texts, Tok(), (":", "abc"))
    assert out[1] == [()] and out[5] == [()]
    assert out[3] == [(8,)] and out[4] == [(9,)]
    assert 0 not in out and 2 not in out


# ------------------------------------------------------------------------------------------------ test_top_n_sigma
@pytest.mark.parametrize("n, expected", [(1.0, {2: 0.428571, 3: 0.571429}), (0.0, dict(enumerate(P4))),
                                         (3.0, dict(enumerate(P4)))])
def test_upstream_test_top_n_sigma(n, expected):
    """test_top_n_sigma(P4, ..., n) for n = 1, 0 (a no-op since llama.cpp PR 13345), 3."""
    check(apply(cands(P4), TopNSigma(n)), expected, 4)


def test_top_n_sigma_kept_set_does_not_change_with_temperature():
    logits = torch.randn(2000, generator=torch.Generator().manual_seed(3)) * 2
    base = kept_ids(TopNSigma(1.5).apply(Cands.full(logits, logits.softmax(-1)))[0])
    for t in (0.3, 0.7, 2.0):
        z = logits / t
        assert kept_ids(TopNSigma(1.5).apply(Cands.full(z, logits.softmax(-1)))[0]) == base


# ------------------------------------------------------------------------------------------------ dynatemp
def test_dynamic_temperature_at_zero_and_full_entropy():
    """temp-ext with range δ: a uniform row (H = H_max) gets T + δ, one token holding all the mass (H = 0) T - δ;
    H_max = ln(size) counts a -inf entry still in the array."""
    _, st = Temperature(1.0, 0.5, 1.0).apply(cands([0.25] * 4))
    assert float(st["t_dyn"]) == pytest.approx(1.5) and float(st["h_norm"]) == pytest.approx(1.0)
    one = Cands.full(torch.tensor([2.0, float("-inf"), float("-inf")]), torch.tensor([1.0, 0.0, 0.0]))
    _, st = Temperature(1.0, 0.5, 1.0).apply(one)
    assert float(st["t_dyn"]) == pytest.approx(0.5)
    p = [0.5, 0.3, 0.2]
    h = -sum(x * math.log(x) for x in p) / math.log(3)
    c, st = Temperature(0.8, 0.3, 2.0).apply(cands(p))
    t = 0.5 + 0.6 * h ** 2
    assert float(st["t_dyn"]) == pytest.approx(t, rel=1e-5)
    assert c.logits.tolist() == pytest.approx([math.log(x) / t for x in p], rel=1e-5)


def test_dynatemp_depends_on_the_chain_order():
    """top_k -> temperature measures H over the k survivors (H_max = ln k); temperature -> top_k over the vocabulary."""
    logits = torch.randn(500, generator=torch.Generator().manual_seed(1))
    full = Cands.full(logits, logits.softmax(-1))
    a = apply(full, TopK(10), Temperature(1.0, 0.8, 1.0))
    b = apply(full, Temperature(1.0, 0.8, 1.0), TopK(10))
    assert kept_ids(a) == kept_ids(b)
    pa, pb = dist_probs(a, 500), dist_probs(b, 500)
    assert max(abs(x - y) for x, y in zip(pa, pb)) > 1e-3


# ------------------------------------------------------------------------------------------------ test_sampler_queue
def f32(x):
    return np.float32(x)


def queue_expect(n_vocab, seq, top_k, top_p, min_p, sizes):
    """test_sampler_queue's expected sizes and smallest kept id after each sampler (float32 as upstream)."""
    min_token_id = 0
    for s, size in zip(seq, sizes):
        if s == "k":
            expected_size = min(size, top_k)
            min_token_id = max(min_token_id, n_vocab - top_k)
        elif s == "p":
            divisor = n_vocab * (n_vocab - 1) // 2 - min_token_id * (min_token_id - 1) // 2
            target = int(math.ceil(f32(f32(top_p) * f32(divisor))))
            min_token_id, expected_size, cumsum = n_vocab, 0, 0
            while True:
                min_token_id -= 1
                expected_size += 1
                cumsum += min_token_id
                if cumsum >= target:
                    break
            if min_token_id == 1:
                min_token_id -= 1
                expected_size += 1
        else:
            expected_size = int(math.ceil(f32(f32(f32(1.0) - f32(min_p)) * f32(n_vocab))))
            expected_size = min(max(expected_size, 1), size)
            min_token_id = int(math.floor(f32(f32(min_p) * f32(n_vocab))))
            min_token_id = min(max(min_token_id, 1, n_vocab - size), n_vocab - 1)
        yield expected_size, min_token_id


@pytest.mark.parametrize("seq, top_k, top_p, min_p", [
    ("k", 10000, 1.0, 1.0), ("k", 1, 1.0, 1.0), ("p", 10000, 1.0, 1.0), ("p", 10000, 0.0, 1.0),
    ("m", 10000, 1.0, 1.0), ("m", 10000, 1.0, 1e-12),
    ("k", 100, 1.0, 1.0), ("p", 10000, 0.0003, 1.0), ("p", 10000, 0.8, 1.0), ("m", 10000, 1.0, 9997.9 / 9999.0),
    ("m", 10000, 1.0, 0.1),
    ("kp", 100, 0.8, 0.1), ("km", 100, 0.8, 0.1), ("pk", 100, 0.8, 0.1), ("pm", 100, 0.8, 0.1),
    ("mk", 100, 0.8, 0.1), ("mp", 100, 0.8, 9997.9 / 9999.0), ("mp", 100, 0.8, 0.1),
    ("kpm", 100, 0.8, 0.1), ("kmp", 100, 0.8, 0.1), ("pkm", 100, 0.8, 0.1), ("pmk", 100, 0.8, 0.1),
    ("mkp", 100, 0.8, 0.1), ("mpk", 100, 0.8, 0.1),
])
def test_upstream_test_sampler_queue(seq, top_k, top_p, min_p):
    """test_sampler_queue(10000, seq, top_k, top_p, min_p) for all 24 upstream chains: logits ln(id) over 10000
    ids (id 0 at -inf), top_p and min_p with min_keep 1; after each sampler the kept ids are exactly
    [min_token_id, 9999] with upstream's expected size."""
    n = 10000
    logits = torch.log(torch.arange(n, dtype=torch.float32))
    c = Cands.full(logits, logits.softmax(-1))
    sizes = []
    make = {"k": lambda: TopK(top_k), "p": lambda: TopP(top_p, 1), "m": lambda: MinP(min_p, 1)}
    for s in seq:
        c, _ = make[s]().apply(c)
        sizes.append(int(c.present.sum()))
        expected_size, min_token_id = list(queue_expect(n, seq[:len(sizes)], top_k, top_p, min_p, sizes))[-1]
        ids = {int(t) for t, pr in zip(c.ids.tolist(), c.present.tolist()) if pr}
        assert sizes[-1] == expected_size, (s, sizes)
        assert ids == set(range(min_token_id, n)), (s, min(ids), min_token_id)


# ------------------------------------------------------------------------------------------------ dist, parsing
def test_dist_draws_only_kept_tokens_in_proportion():
    c = apply(cands([0.1, 0.2, 0.3, 0.4]), TopK(3))
    g = torch.Generator().manual_seed(0)
    counts = [0] * 4
    for _ in range(6000):
        pos, lp = draw(c, g)
        counts[int(c.ids[pos])] += 1
    assert counts[0] == 0
    for tid, p in ((1, 2 / 9), (2, 3 / 9), (3, 4 / 9)):
        assert abs(counts[tid] / 6000 - p) < 0.025


def test_parsing_refuses_bad_text_with_the_legal_values():
    assert parse_samplers("top-k; temp") == ("top_k", "temperature")
    assert parse_samplers("penalties;dry;top_n_sigma;top_k;typ_p;top_p;min_p;xtc;temperature")[3] == "top_k"
    with pytest.raises(UserError, match="unknown sampler 'mirostat'.*penalties, dry, top_n_sigma"):
        parse_samplers("top_k;mirostat")
    with pytest.raises(UserError, match="'top_p' is listed twice"):
        parse_samplers("top_p;top_k;nucleus")
    assert parse_logit_bias("15043+1, 2-inf,7+0.5e1") == ((15043, 1.0), (2, float("-inf")), (7, 5.0))
    with pytest.raises(UserError, match="TOKEN_ID\\+BIAS"):
        parse_logit_bias("15043:1")
    assert parse_breakers('["\\n", "", ":"]') == ("\n", ":")
    assert parse_breakers("none") == ()
    with pytest.raises(UserError, match="JSON list of strings"):
        parse_breakers("[1, 2]")


def brute_force_dry(ctx: list[int], allowed: int, breakers: dict) -> dict[int, int]:
    """DRY's L(v) from its definition, O(n^2): rep_limit = tokens after the most recent breaker occurrence (head
    plus its tail); for every earlier end position j, the common suffix length of ctx[:j+1] and ctx (capped at
    rep_limit, never reaching back past the start); the token after j gets the largest such length >= allowed."""
    n = len(ctx)
    if n <= allowed:
        return {}
    rep_limit = n
    for i in range(n):                          # i tokens from the end
        pos = n - 1 - i
        if ctx[pos] in breakers:
            tails = [t for t in breakers[ctx[pos]] if len(t) <= i and list(t) == ctx[pos + 1:pos + 1 + len(t)]]
            if tails:
                rep_limit = i - max(len(t) for t in tails)
                break
    if rep_limit < allowed:
        return {}
    best: dict[int, int] = {}
    for j in range(n - 1):
        m = 0
        while m <= j and ctx[j - m] == ctx[n - 1 - m]:
            m += 1
        m = min(m, rep_limit)
        if m >= allowed and best.get(ctx[j + 1], -1) < m:
            best[ctx[j + 1]] = m
    return best


def test_dry_z_algorithm_equals_the_definition_on_random_contexts():
    """The reversed Z-algorithm port against the O(n^2) definition on 400 random contexts over small alphabets
    (many repeats), with and without single- and multi-token breakers."""
    rng = np.random.default_rng(0)
    for trial in range(400):
        ctx = rng.integers(0, 2 + trial % 4, size=int(rng.integers(1, 40))).tolist()
        allowed = int(rng.integers(1, 4))
        breakers = {} if trial % 3 == 0 else ({5: [()]} if trial % 3 == 1 else {0: [(1,)]})
        if trial % 3 == 1:
            ctx = [5 if rng.random() < 0.1 else t for t in ctx]
        s = Dry(1.0, 1.75, allowed, -1, breakers, 8, "cpu")
        s.reset(ctx)
        assert s.max_repeats() == brute_force_dry(ctx, allowed, breakers), (ctx, allowed, breakers)
