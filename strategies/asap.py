"""ASAp: Adaptive Sampling with Approximate expected futures (grammar-aligned decoding).

Paper: Park, Wang, Berg-Kirkpatrick, Polikarpova, D'Antoni, "Grammar-Aligned Decoding", NeurIPS 2024
(arXiv 2405.21047); reference: ebmoon/transformers-GAD (`oracle/oracle_trie.py`,
`GrammarAlignedOracleLogitsProcessor`). Spec: docs/strategies.md#asap.

Goal: sample from Q(w) ∝ P(w) 1[w in L(G)], the model conditioned on the grammar. Exact left-to-right sampling
needs Q(t|u) ∝ P(t|u) EFG(u.t), where EFG(u) = sum_w P(w|u) 1[u.w in L] is the expected future grammaticality; GCD
replaces EFG(u.t) by the mask 1[u.t viable], which distorts Q (see gcd.py). ASAp keeps one prefix trie across
samples. Every expanded node u stores its allowed tokens t with P(t|u) (full-vocabulary softmax, unmasked) and
an over-approximation EFG~(u.t) that starts at 1 (optimistic) for children never visited. Each sample is one walk
from the root drawing t ∝ P(t|u) EFG~(u.t); when it expands a node, EFG~(u) <- sum_allowed P(t|u) EFG~(u.t) and
the change propagates to every ancestor. The first sample is exactly GCD's distribution; as prefixes get explored
EFG~ tightens towards EFG (it only decreases and never goes below it) and the sampling distribution converges to
Q. Where the tree is fully explored EFG~(root) = Z = sum_{w in L} P(w).

Paper symbols -> config fields: G -> `grammar` (a built-in; the CLI's --grammar-file or the app's editor take
precedence), the number of samples N -> `num_samples` (drawn one after another from the one trie; all returned in
the order drawn), P -> the model at `temperature` (1.0 = the paper; other values define P as the
temperature-scaled model, and Q relative to it), EFG~ -> the trace columns efg_before / efg_after / efg_child /
efg_root. `exact_max_nodes`: exact mode for small finite grammars (strategies/grammar/exact.py). No top-k / top-p:
they are not part of the algorithm (the paper samples at top_k 0, top_p 1).

Where we differ from the reference, on purpose:
- children are inserted all at once and EFG~ recomputed once per expansion (the reference recomputes after each
  insertion; docs/strategies.md#asap notes this);
- a revisited node reads its distribution from the trie instead of running the model (the matcher still accepts
  every token); the KV cache is cropped back to the prompt between samples and the tokens walked since the last
  forward are fed in one call when an unexpanded node is reached;
- max_new_tokens is a budget (EOS counted): a sample that runs out of it marks its last node dead (EFG~ = 0), so
  Q and EFG are relative to sentences that fit the budget, and exact mode enumerates that same set;
- P(t|u) is cached per node with a least-recently-used bound on the total
  (strategies.grammar.trie.TRIE_CACHE_ENTRIES); an evicted node is recomputed (one forward) on its next visit, its
  EFG~ and children are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from declab.core import Config, RunContext, RunGen, RunInputs, Strategy, param, register
from strategies.gcd import EXACT_HELP, GRAMMAR_HELP, SAMPLES_HELP
from strategies.grammar import (BUILTIN_GRAMMARS, BUILTIN_NAMES, DEFAULT_GRAMMAR, MAX_SAMPLES, Node, Rule,
                                prepare_grammar, run_grammar)


@dataclass(frozen=True)
class AsapConfig(Config):
    grammar: str = param(DEFAULT_GRAMMAR, choices=BUILTIN_NAMES, help=GRAMMAR_HELP)
    num_samples: int = param(1, lo=1, hi=MAX_SAMPLES, help=SAMPLES_HELP.replace("Independent samples",
                                                                                "Samples from one shared trie,"))
    temperature: float = param(1.0, lo=0.0, hi=100.0, lo_open=True,
                               help="P = softmax(logits / temperature); 1.0 = the paper.")
    exact_max_nodes: int = param(256, lo=0, hi=20_000, help=EXACT_HELP)


class AsapRule(Rule):
    """t ∝ P(t|u) EFG~(u.t): children never visited count 1, visited ones their current EFG~."""

    name = "asap"
    caches = True
    reports_efg = True

    def weights(self, node: Node) -> torch.Tensor | None:
        w = node.probs * node.child_efg if node.children else node.probs
        total = float(w.sum())
        return w / total if total > 0.0 else None


@register
class Asap(Strategy):
    name = "asap"
    title = "Grammar-aligned decoding (ASAp)"
    paper = "Park, Wang, Berg-Kirkpatrick, Polikarpova, D'Antoni 2024, Grammar-Aligned Decoding (NeurIPS)"
    explanation = ("Grammar-constrained decoding keeps outputs grammatical but distorts the model's distribution: "
                   "it cannot see that some grammatical-looking prefixes lead only to unlikely endings. ASAp "
                   "samples many times from one growing tree of prefixes and remembers, for each prefix, an upper "
                   "bound on the probability that the model's continuation will still be grammatical. It weights "
                   "each token by that bound, so over many samples its outputs follow the model's own preferences "
                   "among grammatical sentences.")
    Config = AsapConfig
    deterministic = False
    takes_grammar = True
    grammar_examples = BUILTIN_GRAMMARS

    def prepare(self, cfg: AsapConfig, inputs: RunInputs) -> RunInputs:
        return prepare_grammar(cfg, inputs)

    def run(self, ctx: RunContext, cfg: AsapConfig) -> RunGen:
        return (yield from run_grammar(ctx, cfg, AsapRule()))
