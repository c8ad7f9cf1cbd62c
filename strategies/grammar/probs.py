"""The probabilities the sampler and exact mode share: P(t|u) of the allowed tokens, and GCD's distribution."""

from __future__ import annotations

import torch

from declab.core.sampling import top_k_filter, top_p_filter


def allowed_probs(logits: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """P(t|u) of the allowed ids: the full-vocabulary softmax of logits / temperature, unmasked, in float64. [A].
    (One function for the sampler and for exact mode, so both see the same numbers.)"""
    logits = logits.double()
    logp = torch.log_softmax(logits if temperature == 1.0 else logits / temperature, -1)
    return logp[ids].exp()


def gcd_probs(probs: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """GCD's next-token distribution over the allowed set: P renormalised, after top-k / top-p (transformers'
    order; on the allowed set this equals warping the masked full-vocabulary logits). [A] float64."""
    logits = probs.log()
    if top_k:
        logits = top_k_filter(logits, top_k)
    if top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    return torch.softmax(logits, -1)
