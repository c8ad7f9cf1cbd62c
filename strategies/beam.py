"""Beam search: keep the num_beams best partial sequences by cumulative log-probability, token for token as the
BeamSearchScorer beam search of transformers 4.36-4.56 (the one-group case of diverse beam search;
engine in strategies/beams.py, documented in strategies/diverse_beam.py).

No single paper (a classic of speech recognition and MT); semantics from the HF reference (docs/strategies.md#beam).
Config fields: `num_beams` (B), `length_penalty` (α: finished scores are sum / gen_len**α, prompt excluded),
`early_stopping` (True / False / "never", as in HF), `num_return_sequences` (0 = all num_beams), returned best first
with HF's `sequences_scores` as `score` and the plain log-likelihood as `loglik`.

It is `diverse_beam` with num_beam_groups=1 and diversity_penalty=0, so the engine, the trace (candidate / token /
finish rows, one branch per beam slot) and the exactness details are documented there. HF 4.50-4.56 rewrote plain
beam search in vectorised form; it agrees with this one except in edge cases (see strategies/diverse_beam.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from declab.core import Config, RunContext, RunGen, Strategy, param, register
from strategies.beams import (EARLY_STOPPING, EARLY_STOPPING_HELP, MAX_BEAMS, check_common, early_stopping_value,
                              group_beam_search, normalise_early_stopping)


@dataclass(frozen=True)
class BeamConfig(Config):
    num_beams: int = param(4, lo=2, hi=MAX_BEAMS, help="B: partial sequences kept at every step (1 would be greedy)")
    length_penalty: float = param(1.0, lo=-10.0, hi=10.0, help="α: finished scores are sum / gen_len**α "
                                  "(> 0 favours longer, < 0 shorter sequences)")
    early_stopping: str = param("false", choices=EARLY_STOPPING, help=EARLY_STOPPING_HELP)
    num_return_sequences: int = param(0, lo=0, hi=MAX_BEAMS, help="sequences returned, best first (0 = num_beams)")

    def __post_init__(self):
        normalise_early_stopping(self)
        super().__post_init__()

    def check(self) -> None:
        check_common(self.strategy_name(), self.num_beams, self.num_return_sequences)


@register
class Beam(Strategy):
    name = "beam"
    title = "Beam search"
    paper = "Classic beam search; semantics of transformers 4.36-4.56 (BeamSearchScorer)"
    explanation = ("Instead of committing to one token per step like greedy, beam search keeps the B most probable "
                   "partial sequences. At every step it extends each by every token, scores the extensions by their "
                   "total log-probability, and keeps the best B. Sequences that end are set aside with their score "
                   "divided by their length (length_penalty), and the best finished ones are returned. It finds more "
                   "probable texts than greedy, but the beams tend to be near copies of each other.")
    Config = BeamConfig

    def run(self, ctx: RunContext, cfg: BeamConfig) -> RunGen:
        return (yield from group_beam_search(
            ctx, num_beams=cfg.num_beams, num_beam_groups=1, diversity_penalty=0.0,
            length_penalty=cfg.length_penalty, early_stopping=early_stopping_value(cfg.early_stopping),
            num_return_sequences=cfg.num_return_sequences or cfg.num_beams))
