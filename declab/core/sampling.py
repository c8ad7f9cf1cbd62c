"""Sampling helpers shared by every strategy: entropy, logits warpers, seeded draws.

The warpers follow transformers' order and semantics (temperature, top-k, top-p, min-p), so a strategy that says
"top_p=0.9" means what a transformers user expects. Removed tokens get -inf.
"""

from __future__ import annotations

import math

import torch

LN2 = math.log(2.0)


def entropy_bits(logp: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in bits of the distribution(s) given as log-probs. logp: [..., V] -> [...]."""
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1) / LN2


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits if temperature == 1.0 else logits / temperature


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the top_k largest logits per row (0 = off). logits: [..., V]."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]            # [..., 1]
    return logits.masked_fill(logits < kth, float("-inf"))


NUCLEUS_HEAD = 1024   # top_p first looks at this many most likely tokens (a full sort of 49k logits is ~5 ms on CPU)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter as in transformers' TopPLogitsWarper: drop the low tail whose mass is <= 1 - top_p,
    always keeping the most likely token (1.0 = off).

    transformers sorts the whole row ascending and removes a token when the cumulative mass up to it is <= 1 - top_p.
    When the NUCLEUS_HEAD most likely tokens already hold more than top_p (+1e-4, so rounding cannot move the
    boundary into the tail), everything below them is removed anyway, so only the head is sorted: the same rule
    with the tail's mass as the starting sum. Otherwise the full sort runs."""
    if top_p >= 1.0:
        return logits
    V = logits.shape[-1]
    if V > 4 * NUCLEUS_HEAD:
        probs = logits.float().softmax(-1)                                   # [..., V]
        head_p, head_i = probs.topk(NUCLEUS_HEAD, dim=-1)                     # [..., K] descending
        tail = 1.0 - head_p.sum(-1, keepdim=True)                            # [..., 1]
        if bool((tail < 1.0 - top_p - 1e-4).all()):
            cum = tail + head_p.flip(-1).cumsum(-1)                          # [..., K] ascending cumulative mass
            keep_asc = cum > (1.0 - top_p)
            keep_asc[..., -1] = True                                         # the most likely token stays
            keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, head_i, keep_asc.flip(-1))
            return logits.masked_fill(~keep, float("-inf"))
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)   # [..., V] ascending
    cum = sorted_logits.softmax(-1).cumsum(-1)                            # [..., V]
    remove_sorted = cum <= (1.0 - top_p)
    remove_sorted[..., -1] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens with p >= min_p * p_max (0 = off), as transformers' MinPLogitsWarper."""
    if min_p <= 0.0:
        return logits
    p = logits.softmax(-1)                                                # [..., V]
    threshold = min_p * p.max(-1, keepdim=True).values                    # [..., 1]
    return logits.masked_fill(p < threshold, float("-inf"))


def warp(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
         min_p: float = 0.0) -> torch.Tensor:
    """temperature -> top-k -> top-p -> min-p, transformers' order."""
    logits = apply_temperature(logits, temperature)
    logits = top_k_filter(logits, top_k)
    logits = top_p_filter(logits, top_p)
    return min_p_filter(logits, min_p)


def sample_or_argmax(logits: torch.Tensor, generator: torch.Generator, temperature: float = 1.0, top_k: int = 0,
                     top_p: float = 1.0, min_p: float = 0.0) -> tuple[int, torch.Tensor]:
    """The one rule every strategy with a temperature uses: temperature 0 takes the argmax (ties to the lowest id,
    as torch.argmax and transformers' greedy search); otherwise warp (temperature -> top-k -> top-p -> min-p) and
    draw once from the run's generator. logits: [V]. Returns (token, the logits the token came from [V]: the warped
    ones, or the input itself for the argmax), so callers read the score or the kept set from one place."""
    if temperature == 0:
        return int(logits.argmax()), logits
    warped = warp(logits, temperature, top_k, top_p, min_p)                  # [V]
    return draw(warped, generator), warped


def draw(logits: torch.Tensor, generator: torch.Generator) -> int:
    """One token from softmax(logits) [V], using the run's seeded generator (never the global RNG)."""
    return draw_from(logits.softmax(-1), generator)


def draw_from(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One index from the (possibly unnormalised) non-negative weights probs [V], by inverse CDF: one uniform from
    the run's generator against the float64 cumulative sum (10x cheaper than torch.multinomial on a 49k row here;
    zero-weight entries are never drawn)."""
    cdf = probs.double().cumsum(-1)                                       # [V]
    u = torch.rand(1, generator=generator, dtype=torch.float64, device=probs.device) * cdf[-1]   # [1]
    return int(torch.searchsorted(cdf, u, right=True).clamp_max(cdf.shape[-1] - 1))


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g
