"""Strategy parameters: `param(...)` fields with their legal range, the validating `Config` base, text parsing.

A strategy's config is a frozen dataclass whose fields are declared with `param(default, lo=, hi=, choices=,
help=)`; constructing it validates every field once, with a one-line message that gives the legal range.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from declab.core.errors import UserError


def param(default, *, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False, choices=None, help: str = "",
          legal: str = ""):
    """A config field with its legal range (inclusive unless *_open) or choices, and help text for the UI/CLI.
    `legal`: for a free-form text field, the legal values in words (shown as its range; the config's `check`
    enforces them)."""
    meta = {"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open, "choices": choices, "help": help,
            "legal": legal}
    if isinstance(default, (list, dict)):
        raise TypeError("use a tuple default")
    return field(default=default, metadata=meta)


def range_text(meta: dict) -> str:
    if meta.get("legal"):
        return meta["legal"]
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
