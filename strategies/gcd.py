"""Grammar-constrained decoding (GCD): at every step mask the tokens the grammar does not allow, sample from the rest.

The standard way to force a model's output into a context-free language (llama.cpp grammars, Outlines,
transformers-cfg, xgrammar): u -> allowed(u) from an incremental parser, logits of every other token -> -inf,
then the usual temperature / top-k / top-p and one draw. Every output is a viable prefix of the grammar, and a
complete sentence once the model picks EOS.

The catch (Park et al., "Grammar-Aligned Decoding", NeurIPS 2024, arXiv 2405.21047; docs/strategies.md#gcd):
GCD samples t with probability P(t|u) 1[u.t viable] / sum_allowed P, which is the exact grammar-conditioned
distribution Q(w) ∝ P(w) 1[w in L] only when every viable prefix has expected future grammaticality 0 or 1. On
the paper's toy {000, 100, 101, 110, 111}, after "0" the mask forces "000" whatever the model thinks of it, so
GCD over-samples "000" by the whole mass of P(0...). `asap` corrects this; run both with num_samples > 1 on
binary_len_3 / binary_len_5 and the KL view shows GCD's bias staying put while ASAp's goes to 0.

Paper symbols -> config fields: the grammar G -> `grammar` (a built-in; the CLI's --grammar-file or the app's editor
take precedence), the number of samples N -> `num_samples` (drawn independently, one after another, every one
returned in the order drawn), temperature / top-k / top-p as in `sample` (applied after the mask, transformers'
order; top-k and top-p act on the allowed set). `exact_max_nodes`: exact mode for small finite grammars (see
strategies/grammar/exact.py). The loop, trace columns, exact mode and KL rows are shared with asap and documented
in the package strategies/grammar/ (the loop and the trace columns in loop.py); gcd keeps no cached distributions
(each step is one forward and one mask, as plain GCD), and `masked_mass` is the probability the mask removed:
1 - sum over allowed tokens of P(t|u) (temperature-scaled, before top-k / top-p).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from declab.core import Config, RunContext, RunGen, RunInputs, Strategy, param, register
from strategies.grammar import (BUILTIN_GRAMMARS, BUILTIN_NAMES, DEFAULT_GRAMMAR, MAX_SAMPLES, Node, Rule,
                                prepare_grammar, gcd_probs, run_grammar)

GRAMMAR_HELP = ("Built-in grammar used when no grammar text is given (--grammar-file or the app's editor take "
                "precedence): " + ", ".join(BUILTIN_NAMES) + ".")
SAMPLES_HELP = f"Independent samples drawn one after another (all returned, in order); at most {MAX_SAMPLES}."
EXACT_HELP = ("Exact mode: when every grammatical token sequence within max new tokens fits in a trie of at most "
              "this many prefixes, score them all with the model and report KL to the exact grammar-conditioned "
              "distribution; otherwise (or 0) the paper's explored-support approximation.")


@dataclass(frozen=True)
class GcdConfig(Config):
    grammar: str = param(DEFAULT_GRAMMAR, choices=BUILTIN_NAMES, help=GRAMMAR_HELP)
    num_samples: int = param(1, lo=1, hi=MAX_SAMPLES, help=SAMPLES_HELP)
    temperature: float = param(1.0, lo=0.0, hi=100.0, lo_open=True, help="Divide logits by this before softmax.")
    top_k: int = param(0, lo=0, hi=1_000_000, help="Keep only the k most likely allowed tokens (0 = off).")
    top_p: float = param(1.0, lo=0.0, hi=1.0, lo_open=True,
                         help="Nucleus over the allowed tokens: keep the smallest set with mass >= p.")
    exact_max_nodes: int = param(256, lo=0, hi=20_000, help=EXACT_HELP)


class GcdRule(Rule):
    name = "gcd"
    is_gcd = True
    caches = False

    def __init__(self, cfg: GcdConfig):
        self.top_k, self.top_p = cfg.top_k, cfg.top_p

    def weights(self, node: Node) -> torch.Tensor | None:
        if float(node.probs.sum()) <= 0.0:
            return None
        return gcd_probs(node.probs, self.top_k, self.top_p)


@register
class Gcd(Strategy):
    name = "gcd"
    title = "Grammar-constrained decoding (GCD)"
    paper = "Grammar-constrained decoding (llama.cpp grammars, Outlines, xgrammar); its bias: Park et al. 2024"
    explanation = ("At every step a parser says which tokens can continue a sentence of the grammar; every other "
                   "token is masked out and the model samples from what is left. The output always fits the "
                   "grammar, but the sampling is distorted: a prefix that looks fine to the parser can lead to "
                   "continuations the model finds very unlikely, and GCD is then forced down that path anyway.")
    Config = GcdConfig
    deterministic = False
    takes_grammar = True
    grammar_examples = BUILTIN_GRAMMARS

    def prepare(self, cfg: GcdConfig, inputs: RunInputs) -> RunInputs:
        return prepare_grammar(cfg, inputs)

    def run(self, ctx: RunContext, cfg: GcdConfig) -> RunGen:
        return (yield from run_grammar(ctx, cfg, GcdRule(cfg)))
