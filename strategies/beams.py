"""Shared beam bookkeeping: the n-best list of finished hypotheses and the stopping rule of transformers 4.x.

`BeamHypotheses` reproduces `transformers.generation.beam_search.BeamHypotheses` of 4.36-4.56 (the version that
excludes the prompt from the length): scores are plain Python floats (float32 sums converted with `.item()`),
normalised as `sum_logprobs / generated_len ** length_penalty`, kept in insertion order with the worst evicted, and
`is_done` applies the `early_stopping` rule (True / False / "never"). `pool_ranking` is the final pooled ranking of
BeamSearchScorer.finalize (stable ascending sort, then pop from the end), so ties resolve exactly as there.
Any strategy that keeps an n-best list of finished beams (beam, diverse_beam, ...) can reuse these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Hypothesis:
    """A finished beam: generated ids (prompt and EOS excluded), normalised score and what made it."""

    token_ids: list[int]
    score: float                      # cum_score / gen_len ** length_penalty (what the ranking uses)
    cum_score: float                  # cumulative score, penalties included (float32 value)
    gen_len: int                      # generated length used in the normalisation (EOS counted when eos)
    extra: dict = field(default_factory=dict)   # loglik, penalty, group, eos, trace row ...


class BeamHypotheses:
    """n-best list of one (batch item, group), capacity `num_beams` (the group size S)."""

    def __init__(self, num_beams: int, length_penalty: float, early_stopping: bool | str, max_length: int | None):
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.max_length = max_length          # prompt + new tokens (only used by early_stopping="never")
        self.beams: list[Hypothesis] = []
        self.worst_score = 1e9

    def __len__(self) -> int:
        return len(self.beams)

    def add(self, hyp: Hypothesis) -> bool:
        """Offer a hypothesis (its `score` already normalised); returns whether it entered the list."""
        score = hyp.score
        if len(self) < self.num_beams or score > self.worst_score:
            self.beams.append(hyp)
            if len(self) > self.num_beams:
                ranked = sorted((h.score, i) for i, h in enumerate(self.beams))
                evicted = self.beams[ranked[0][1]]
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
                evicted.extra["evicted"] = True
            else:
                self.worst_score = min(score, self.worst_score)
            return True
        return False

    def is_done(self, best_sum_logprobs: float, cur_len: int, prompt_len: int) -> bool:
        """True when no running beam can beat the worst kept hypothesis (HF's heuristic). cur_len counts the prompt
        plus the tokens after this step."""
        if len(self) < self.num_beams:
            return False
        if self.early_stopping is True:
            return True
        if self.early_stopping is False or self.length_penalty <= 0.0:
            best = best_sum_logprobs / (cur_len - prompt_len) ** self.length_penalty
        else:                                  # "never" with a positive length penalty: the longest possible
            best = best_sum_logprobs / (self.max_length - prompt_len) ** self.length_penalty
        return self.worst_score >= best


def normalised(cum_score: float, gen_len: int, length_penalty: float) -> float:
    """HF's length normalisation, in Python double as in BeamHypotheses.add."""
    return cum_score / (gen_len ** length_penalty)


def pool_ranking(lists: list[BeamHypotheses], n: int) -> list[Hypothesis]:
    """The best `n` hypotheses pooled over `lists` (groups), best first: Python's stable ascending sort by score,
    then pop from the end, as BeamSearchScorer.finalize does (ties: the later one in pooled order wins)."""
    pooled: list[Any] = [h for lst in lists for h in lst.beams]
    ranked = sorted(pooled, key=lambda h: h.score)
    return [ranked.pop() for _ in range(min(n, len(ranked)))]
