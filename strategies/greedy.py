"""Greedy decoding: always take the most likely next token, x_t = argmax_v p(v | x_<t).

No paper; the baseline every other strategy is compared against. Ties break to the lowest token id (torch.argmax),
as in transformers' greedy search, so our output equals `generate(do_sample=False)` token for token.
Trace score: the chosen token's log-probability (natural log). No parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

from declab.core import Config, RunContext, RunGen, Strategy, register
from declab.core.loop import Choice, Selector, token_loop


@dataclass(frozen=True)
class GreedyConfig(Config):
    pass


@register
class Greedy(Strategy):
    name = "greedy"
    title = "Greedy"
    paper = "Baseline: argmax of the model's next-token distribution"
    explanation = ("At every step the model gives a probability to every token in its vocabulary; greedy decoding "
                   "simply takes the most likely one. It is fast and deterministic, but it never explores: one early "
                   "choice fixes the rest, and on open-ended prompts it often falls into repetition loops.")
    Config = GreedyConfig

    def run(self, ctx: RunContext, cfg: GreedyConfig) -> RunGen:
        return (yield from token_loop(ctx, Argmax()))


class Argmax(Selector):
    name = "greedy"

    def apply(self, logits, step):
        token = int(logits.argmax())
        return Choice(token, float(logits.log_softmax(-1)[token]))
