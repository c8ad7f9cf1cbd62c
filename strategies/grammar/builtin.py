"""The built-in grammars, and the grammar input of gcd and asap.

Grammar input, in order of precedence:
  1. the run's grammar input (`RunInputs.grammar`): EBNF/GBNF text (the CLI's `--grammar-file`, the app's editor);
  2. the config field `grammar`: the name of a built-in grammar (files in strategies/grammar/grammars/*.ebnf;
     default json).
The text is checked once before decoding starts (`prepare_grammar`, the strategies' `prepare` hook, which the
engine's plan runs before any model is loaded): a grammar that does not compile is a UserError with xgrammar's line
and column.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path

import xgrammar as xg

from declab.core import RunInputs
from declab.core.errors import UserError

GRAMMAR_DIR = Path(__file__).resolve().parent / "grammars"
DEFAULT_GRAMMAR = "json"
MAX_GRAMMAR_CHARS = 100_000


class _BuiltinGrammars(Mapping):
    """name -> EBNF text of grammars/*.ebnf, read on first use (nothing runs at import time)."""

    _texts: dict[str, str] | None = None

    def _load(self) -> dict[str, str]:
        if self._texts is None:
            order = BUILTIN_NAMES
            files = {p.stem: p for p in GRAMMAR_DIR.glob("*.ebnf")}
            names = [n for n in order if n in files] + sorted(set(files) - set(order))
            self._texts = {n: files[n].read_text(encoding="utf-8") for n in names}
        return self._texts

    def __getitem__(self, name: str) -> str:
        return self._load()[name]

    def __iter__(self):
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())


BUILTIN_NAMES = ("binary_len_3", "binary_len_5", "arithmetic", "json", "sql_select", "sygus_string")
BUILTIN_GRAMMARS = _BuiltinGrammars()


def resolve_grammar(cfg, text: str | None) -> tuple[str, str]:
    """(label, text): the grammar text given (label: the built-in it equals, else 'custom'), else the built-in
    named by cfg.grammar."""
    if text is not None:
        if not isinstance(text, str):
            raise UserError(f"grammar must be EBNF text, got {type(text).__name__}")
        same = [n for n in BUILTIN_GRAMMARS if BUILTIN_GRAMMARS[n].strip() == text.strip()]
        return (same[0] if same else "custom"), text
    return cfg.grammar, BUILTIN_GRAMMARS[cfg.grammar]


def xgrammar_message(e: Exception) -> str:
    """xgrammar's error without its '[time] /path/file.cc:NNN: ' prefix, on one line."""
    msg = str(e).strip()
    m = re.search(r"(EBNF (?:parser|lexer) error.*)", msg, re.S)
    msg = m.group(1) if m else re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", msg)
    return " ".join(msg.split())


def check_grammar_text(text: str) -> None:
    """Parse the EBNF without a tokenizer (milliseconds); raise UserError with the position of the error."""
    if not text.strip():
        raise UserError("grammar is empty; give EBNF text with a `root ::= ...` rule, or a built-in grammar name")
    if len(text) > MAX_GRAMMAR_CHARS:
        raise UserError(f"grammar has {len(text)} characters; the limit is {MAX_GRAMMAR_CHARS}")
    try:
        xg.Grammar.from_ebnf(text)
    except Exception as e:  # xgrammar raises RuntimeError with the line and column
        raise UserError(f"grammar does not compile: {xgrammar_message(e)}") from None


def prepare_grammar(cfg, inputs: RunInputs) -> RunInputs:
    """`Strategy.prepare` of gcd and asap (before any model is loaded, once per run): the grammar text (given, or
    the built-in's), parsed once; the inputs carry the text and its name from here on."""
    label, text = resolve_grammar(cfg, inputs.grammar)
    check_grammar_text(text)
    return dataclasses.replace(inputs, grammar=text, grammar_name=label)
