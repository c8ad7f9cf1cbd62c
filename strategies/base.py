"""Strategy interfaces, parameter specs with validation, and the registry.

A strategy is a module with a frozen config dataclass (fields declared with `param(...)`, validated once on
construction with messages that give the legal range) and a `Strategy` subclass whose `run(ctx, cfg)` is a
generator: it yields `Progress` after each step (so the UI can stream and a Stop button can end it), writes
trace rows through `ctx.trace`, and returns the final ranked `Sequence` list.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generator

import torch

from declab.errors import UserError

MAX_NEW_TOKENS = 4096


# ------------------------------------------------------------------------------------------------ parameters
def param(default, *, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False, choices=None, help: str = ""):
    """A config field with its legal range (inclusive unless *_open) or choices, and help text for the UI/CLI."""
    meta = {"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open, "choices": choices, "help": help}
    if isinstance(default, (list, dict)):
        raise TypeError("use a tuple default")
    return field(default=default, metadata=meta)


def range_text(meta: dict) -> str:
    if meta.get("choices"):
        return "one of " + ", ".join(str(c) for c in meta["choices"])
    lo, hi = meta.get("lo"), meta.get("hi")
    left = "(" if meta.get("lo_open") else "["
    right = ")" if meta.get("hi_open") else "]"
    return f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"


@dataclass(frozen=True)
class Config:
    """Base for strategy configs: validates every `param` field on construction."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            check_value(self.strategy_name(), f, getattr(self, f.name))
        self.check()

    def check(self) -> None:
        """Cross-field rules; raise UserError with the legal range."""

    @classmethod
    def strategy_name(cls) -> str:
        return getattr(cls, "_strategy", cls.__name__)


def check_value(strategy: str, f: dataclasses.Field, value) -> None:
    meta = f.metadata
    where = f"{strategy}: {f.name}"
    if meta.get("choices") is not None:
        if value not in meta["choices"]:
            raise UserError(f"{where} must be {range_text(meta)}, got {value!r}")
        return
    if isinstance(f.default, bool):
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false, got {value!r}")
        return
    if isinstance(f.default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise UserError(f"{where} must be a number in {range_text(meta)}, got {value!r}")
        if isinstance(f.default, int) and not isinstance(value, int):
            raise UserError(f"{where} must be an integer in {range_text(meta)}, got {value!r}")
        lo, hi = meta.get("lo"), meta.get("hi")
        if (lo is not None and (value < lo or (meta.get("lo_open") and value == lo))) or \
           (hi is not None and (value > hi or (meta.get("hi_open") and value == hi))):
            raise UserError(f"{where} must be in {range_text(meta)}, got {value}")


def parse_value(strategy: str, f: dataclasses.Field, text: str):
    """CLI/app text -> the field's type (validation happens in the config)."""
    default = f.default
    where = f"{strategy}: {f.name}"
    try:
        if isinstance(default, bool):
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, tuple):
            return tuple(float(x) for x in text.replace(",", " ").split())
    except ValueError:
        kind = "true or false" if isinstance(default, bool) else type(default).__name__
        raise UserError(f"{where} must be {kind} in {range_text(f.metadata)}, got {text!r}") from None
    if f.metadata.get("choices") and isinstance(f.metadata["choices"][0], int):
        try:
            return int(text)
        except ValueError:
            pass
    return text


# ------------------------------------------------------------------------------------------------ run types
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
    """Everything one run needs; per-run state lives here, never on the shared LM."""

    lm: Any                          # declab.lm.LM
    prompt_ids: list[int]
    max_new_tokens: int
    seed: int
    generator: torch.Generator
    trace: Any                       # declab.trace.Trace
    stop: threading.Event = field(default_factory=threading.Event)
    num_alternatives: int = 5        # top alternatives recorded per token as `candidate` rows
    extras: dict = field(default_factory=dict)   # grammar text, lame prompt, second model ...
    metrics: dict = field(default_factory=dict)  # strategy-measured run metrics, merged into the run's metrics


RunGen = Generator[Progress, None, list[Sequence]]


class Strategy:
    """Subclass per strategy. Class attributes describe it for `declab list`, the app form and the Teach page."""

    name: ClassVar[str]
    title: ClassVar[str]
    paper: ClassVar[str] = ""
    explanation: ClassVar[str] = ""       # a short card for students
    Config: ClassVar[type[Config]]
    deterministic: ClassVar[bool] = True

    def run(self, ctx: RunContext, cfg) -> RunGen:  # pragma: no cover - interface
        raise NotImplementedError

    # ---------------------------------------------------------------------------------- config helpers
    def params(self) -> list[dict]:
        """Every parameter with type, default, range and help (for `declab list` and the app form)."""
        out = []
        for f in dataclasses.fields(self.Config):
            m = f.metadata
            out.append({"name": f.name, "type": type(f.default).__name__, "default": f.default,
                        "range": range_text(m), "lo": m.get("lo"), "hi": m.get("hi"), "lo_open": m.get("lo_open"),
                        "hi_open": m.get("hi_open"), "choices": m.get("choices"), "help": m.get("help", "")})
        return out

    def make_config(self, params: dict | None = None):
        """Build and validate the config from a dict of values or strings (CLI `--set` / app widgets)."""
        fields = {f.name: f for f in dataclasses.fields(self.Config)}
        values = {}
        for name, value in (params or {}).items():
            if name not in fields:
                raise UserError(f"{self.name}: unknown parameter '{name}'; parameters: {', '.join(fields) or 'none'}")
            values[name] = parse_value(self.name, fields[name], value) if isinstance(value, str) else value
        return self.Config(**values)


# ------------------------------------------------------------------------------------------------ registry
STRATEGIES: dict[str, Strategy] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    cls.Config._strategy = cls.name
    STRATEGIES[cls.name] = cls()
    return cls


def get_strategy(name: str) -> Strategy:
    import strategies  # noqa: F401  (registers every strategy module)
    if name not in STRATEGIES:
        raise UserError(f"unknown strategy '{name}'; known strategies: {', '.join(STRATEGIES)}")
    return STRATEGIES[name]
