"""What a strategy's `run(ctx, cfg)` receives and yields: the run context, its inputs, progress and sequences."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Generator

import torch

from declab.core.errors import UserError

MAX_NEW_TOKENS = 4096
ROLES = ("draft", "small", "amateur")      # second models a strategy can ask for, by what they do in it


@dataclass(frozen=True)
class RunInputs:
    """The run's inputs besides the parameters, checked and completed before any model is loaded
    (`Strategy.prepare`): the prompt text and its resolved format, a grammar, a lame prompt."""

    prompt: str = ""
    prompt_format: str = "raw"               # raw | chat, resolved from the model entry when not given
    grammar: str | None = None               # EBNF text: given by the user, or a built-in's text (grammar strategies)
    grammar_name: str | None = None          # the built-in grammar the text equals, else "custom"
    lame_prompt: str | None = None           # uscd: the lame prompt given by the user (None = derived)


@dataclass
class Sequence:
    """One returned sequence: generated ids only (no prompt, EOS excluded), its text and the strategy's score."""

    token_ids: list[int]
    text: str = ""
    score: float = 0.0
    extra: dict = field(default_factory=dict)


@dataclass
class Progress:
    """Yielded after each step: the step index and the current best sequence's generated ids."""

    step: int
    token_ids: list[int]


@dataclass
class RunContext:
    """Everything one run needs; per-run state lives here, never on the shared LM.

    `lm` is the run's model (the target / expert / large model); `models` holds the second models the strategy's
    `needs(cfg)` asked for, loaded by the engine's resolver and keyed by role (draft / small / amateur). A strategy
    never loads a model itself. `metrics` is the strategy's own metrics object (a `StrategyMetrics` dataclass from
    declab.core.metrics), set as the run goes so a stopped run keeps what it measured."""

    lm: Any                          # declab.models.lm.LM (or a test double with the same surface)
    prompt_ids: list[int]
    max_new_tokens: int
    seed: int
    generator: torch.Generator
    trace: Any                       # declab.core.trace.Trace
    stop: threading.Event = field(default_factory=threading.Event)
    num_alternatives: int = 5        # top alternatives recorded per token as `candidate` rows
    inputs: RunInputs = field(default_factory=RunInputs)
    models: dict[str, Any] = field(default_factory=dict)
    metrics: Any = None              # a StrategyMetrics instance, or None

    def model(self, role: str):
        """The second model loaded for `role` (draft / small / amateur)."""
        lm = self.models.get(role)
        if lm is None:
            raise UserError(f"this run has no {role} model: the engine resolves the models a strategy's needs() "
                            f"names before the run starts")
        return lm


RunGen = Generator[Progress, None, list[Sequence]]
