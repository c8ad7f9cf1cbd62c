"""Shared engine of the grammar strategies `gcd` and `asap` (docs/strategies.md#gcd, #asap), one concern per module:

  builtin    the built-in grammars (grammars/*.ebnf), the grammar input and its check (`prepare_grammar`)
  mask       xgrammar: compiled grammars (a small LRU), a run's matcher and bitmask, `parses`
  probs      P(t|u) of the allowed tokens and GCD's distribution over them (the sampler's and exact mode's)
  trie       the prefix trie with expected-future-grammaticality (EFG~) bookkeeping and its distribution cache
  loop       the sampling loop both strategies run (`run_grammar`, with a `Rule`), its trace rows and metrics
  exact      exact enumeration of small finite grammars (`exact_distribution`)
  kl_curves  KL(empirical || target) against the number of samples, and the explored-support target

Imports run one way (no cycles): loop imports the others, exact imports mask and probs, mask imports builtin;
builtin, probs, trie and kl_curves import none of them.
This package re-exports the names the strategies, the tests and bench/grammar.py use. Settings read at run time
live in their module (patch `strategies.grammar.trie.TRIE_CACHE_ENTRIES`, not a copy here).
"""

from strategies.grammar.builtin import (BUILTIN_GRAMMARS, BUILTIN_NAMES, DEFAULT_GRAMMAR, GRAMMAR_DIR,
                                        MAX_GRAMMAR_CHARS, check_grammar_text, prepare_grammar, resolve_grammar)
from strategies.grammar.mask import GrammarMask, compiled_grammar, parses
from strategies.grammar.probs import allowed_probs, gcd_probs
from strategies.grammar.trie import Node, Trie
from strategies.grammar.exact import ExactResult, exact_distribution, language_prefixes
from strategies.grammar.kl_curves import explored_target, kl, kl_curve, sample_grid
from strategies.grammar.loop import MAX_SAMPLES, GrammarRun, Rule, SampleResult, draw_index, run_grammar

__all__ = [
    "BUILTIN_GRAMMARS", "BUILTIN_NAMES", "DEFAULT_GRAMMAR", "GRAMMAR_DIR", "MAX_GRAMMAR_CHARS", "check_grammar_text",
    "prepare_grammar", "resolve_grammar",
    "GrammarMask", "compiled_grammar", "parses",
    "allowed_probs", "gcd_probs",
    "Node", "Trie",
    "ExactResult", "exact_distribution", "language_prefixes",
    "explored_target", "kl", "kl_curve", "sample_grid",
    "MAX_SAMPLES", "GrammarRun", "Rule", "SampleResult", "draw_index", "run_grammar",
]
