"""Ancestral sampling with temperature, top-k, nucleus (top-p) and min-p truncation.

Sources: temperature sampling; top-k (Fan et al. 2018, "Hierarchical Neural Story Generation"); nucleus sampling
(Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration", p = top_p); min-p (Nguyen et al. 2024,
"Turning Up the Heat: Min-p Sampling", p_base = min_p). Warpers run in transformers' order: temperature, top-k,
top-p, min-p; then one draw from the run's seeded generator, so a seed reproduces a run exactly.

Trace: `logprob` is the model's unwarped log-probability of the chosen token, `score` its log-probability under the
warped distribution actually sampled from, `k` the number of tokens left after truncation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from declab.core.sampling import sample_or_argmax
from declab.core import Config, RunContext, RunGen, Strategy, param, register
from declab.core.loop import Choice, Selector, token_loop


@dataclass(frozen=True)
class SampleConfig(Config):
    temperature: float = param(1.0, lo=0.0, hi=100.0, lo_open=True, help="Divide logits by this before softmax.")
    top_k: int = param(0, lo=0, hi=1_000_000, help="Keep only the k most likely tokens (0 = off).")
    top_p: float = param(1.0, lo=0.0, hi=1.0, lo_open=True, help="Nucleus: keep the smallest set with mass >= p.")
    min_p: float = param(0.0, lo=0.0, hi=1.0, help="Keep tokens with p >= min_p * p_max (0 = off).")


@register
class Sample(Strategy):
    name = "sample"
    title = "Sampling (temperature / top-k / top-p / min-p)"
    paper = "Holtzman et al. 2020, The Curious Case of Neural Text Degeneration (nucleus); Nguyen et al. 2024 (min-p)"
    explanation = ("Instead of always taking the top token, draw one at random in proportion to its probability. "
                   "Temperature sharpens (<1) or flattens (>1) the distribution; top-k, top-p and min-p cut off the "
                   "unreliable tail first. Sampling gives varied text, and the seed makes a run repeatable.")
    Config = SampleConfig
    deterministic = False

    def run(self, ctx: RunContext, cfg: SampleConfig) -> RunGen:
        return (yield from token_loop(ctx, Warped(cfg, ctx.generator)))


class Warped(Selector):
    """Warp (temperature -> top-k -> top-p -> min-p) and draw; `k` = tokens left after truncation."""

    name = "sample"

    def __init__(self, cfg: SampleConfig, generator: torch.Generator):
        self.cfg, self.generator = cfg, generator

    def apply(self, logits, step):
        cfg = self.cfg
        token, warped = sample_or_argmax(logits, self.generator, cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p)
        kept = int(torch.isfinite(warped).sum())
        return Choice(token, float(warped.log_softmax(-1)[token]), {"k": kept})
