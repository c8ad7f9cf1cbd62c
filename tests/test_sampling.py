import math

import pytest
import torch
from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from declab.core.sampling import draw, entropy_bits, make_generator, warp


def test_entropy_is_in_bits():
    logp = torch.log(torch.tensor([0.5, 0.25, 0.25, 0.0]))
    assert float(entropy_bits(logp)) == pytest.approx(1.5)
    assert float(entropy_bits(torch.log(torch.full((8,), 1 / 8)))) == pytest.approx(3.0)


@pytest.mark.parametrize("temperature, top_k, top_p, min_p", [
    (1.0, 0, 1.0, 0.0), (0.7, 0, 1.0, 0.0), (1.0, 5, 1.0, 0.0), (1.0, 0, 0.9, 0.0), (1.3, 0, 0.5, 0.0),
    (1.0, 0, 1.0, 0.1), (0.8, 20, 0.95, 0.05)])
def test_warpers_match_transformers(temperature, top_k, top_p, min_p):
    torch.manual_seed(0)
    logits = torch.randn(3, 200) * 3
    expected = logits.clone()
    ids = torch.zeros(3, 1, dtype=torch.long)
    if temperature != 1.0:
        expected = TemperatureLogitsWarper(temperature)(ids, expected)
    if top_k:
        expected = TopKLogitsWarper(top_k)(ids, expected)
    if top_p < 1.0:
        expected = TopPLogitsWarper(top_p)(ids, expected)
    if min_p:
        expected = MinPLogitsWarper(min_p)(ids, expected)
    got = warp(logits, temperature, top_k, top_p, min_p)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    assert torch.allclose(got[~torch.isinf(got)], expected[~torch.isinf(expected)])


def test_draw_follows_the_distribution_and_is_seeded():
    p = torch.tensor([0.6, 0.3, 0.1, 0.0])
    g = make_generator(5, "cpu")
    counts = torch.zeros(4)
    for _ in range(20000):
        counts[draw(p.log(), g)] += 1
    freq = counts / counts.sum()
    assert counts[3] == 0
    assert torch.allclose(freq, p, atol=0.015)
    a = [draw(torch.zeros(50), make_generator(9, "cpu")) for _ in range(3)]
    assert len(set(a)) == 1 and not math.isnan(a[0])


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.95, 0.999])
@pytest.mark.parametrize("scale", [1.0, 4.0, 12.0])
def test_top_p_on_a_full_size_vocabulary_matches_transformers(top_p, scale):
    """Vocabulary-sized rows take the head-only path when the 1024 most likely tokens hold > top_p, the full sort
    otherwise (flat rows, scale 1); both must give transformers' mask exactly."""
    torch.manual_seed(int(scale * 10))
    logits = torch.randn(2, 49152) * scale
    expected = TopPLogitsWarper(top_p)(torch.zeros(2, 1, dtype=torch.long), logits.clone())
    got = warp(logits, top_p=top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))


def test_draw_follows_the_distribution_and_never_draws_a_removed_token():
    logits = torch.tensor([2.0, 1.0, float("-inf"), 0.0, float("-inf")])
    g = make_generator(0, "cpu")
    counts = torch.bincount(torch.tensor([draw(logits, g) for _ in range(20000)]), minlength=5).float() / 20000
    assert counts[2] == 0 and counts[4] == 0
    assert torch.allclose(counts, logits.softmax(-1), atol=0.015)
