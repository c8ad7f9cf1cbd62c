"""Ancestral sampling with transformers' logits processors: repetition penalty, no-repeat n-grams, temperature,
top-h, top-k, top-p, min-p, typical, epsilon and eta truncation.

Sources: temperature sampling; top-k (Fan et al. 2018, "Hierarchical Neural Story Generation"); nucleus sampling
(Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration", p = top_p); min-p (Nguyen et al. 2024,
"Turning Up the Heat: Min-p Sampling", p_base = min_p); locally typical sampling (Meister et al. 2022, arXiv
2202.00666, tau = typical_p); epsilon- and eta-sampling (Hewitt et al. 2022, "Truncation Sampling as Language Model
Desmoothing", arXiv 2210.15191, epsilon = epsilon_cutoff / eta_cutoff); Top-H (arXiv 2509.02510, alpha = top_h;
transformers 5.23 has it as TopHLogitsWarper); CTRL's repetition penalty (Keskar et al. 2019, arXiv 1909.05858,
theta = repetition_penalty); no-repeat n-grams (fairseq's, n = no_repeat_ngram_size).

Each step runs transformers' processors in the order `generate(do_sample=True)` applies them (transformers 5.23,
generation/utils.py `_get_logits_processor`): repetition_penalty -> no_repeat_ngram_size on the raw logits (both
look at the prompt and the generated ids: the selector keeps them, fed by `accept`), then temperature -> top_h ->
top_k -> top_p -> min_p -> typical_p -> epsilon_cutoff -> eta_cutoff, then one draw from the run's seeded generator,
so a seed reproduces a run exactly. Every parameter's off value (the default) skips its stage.

Trace: `logprob` is the model's unwarped log-probability of the chosen token, `score` its log-probability under the
warped distribution actually sampled from, `k` the number of tokens left after truncation (finite logits), `kept`
the number with nonzero probability in that distribution.

Spec: docs/strategies.md#sample
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from declab.core import Config, RunContext, RunGen, Strategy, param, register
from declab.core.errors import UserError
from declab.core.loop import Choice, Selector, token_loop
from declab.core.sampling import NgramBlocker, ban_tokens, context_mask, draw_from, repetition_penalty, warp


@dataclass(frozen=True)
class SampleConfig(Config):
    temperature: float = param(1.0, lo=0.0, hi=100.0, lo_open=True, help="Divide logits by this before softmax.")
    top_k: int = param(0, lo=0, hi=1_000_000, help="Keep only the k most likely tokens (0 = off).")
    top_p: float = param(1.0, lo=0.0, hi=1.0, lo_open=True, help="Nucleus: keep the smallest set with mass >= p.")
    min_p: float = param(0.0, lo=0.0, hi=1.0, help="Keep tokens with p >= min_p * p_max (0 = off).")
    top_h: float = param(0.0, lo=0.0, hi=1.0,
                         help="Top-H: among the 100 most likely tokens, keep the most likely ones while their "
                              "entropy sum stays <= top_h * H (0 = off; transformers' range (0, 1]).")
    typical_p: float = param(1.0, lo=0.0, hi=1.0, lo_open=True,
                             help="Locally typical: keep the tokens whose surprise is closest to the entropy, up to "
                                  "this mass (1 = off).")
    epsilon_cutoff: float = param(0.0, lo=0.0, hi=1.0, hi_open=True,
                                  help="epsilon-sampling: remove tokens with p < epsilon (0 = off; 3e-4 is typical).")
    eta_cutoff: float = param(0.0, lo=0.0, hi=1.0, hi_open=True,
                              help="eta-sampling: remove p < min(eta, sqrt(eta) * exp(-H)) (0 = off; 3e-4..4e-3 "
                                   "by model size).")
    repetition_penalty: float = param(1.0, lo=0.0, lo_open=True, hi_open=True,
                                      help="CTRL penalty on every token already in the prompt or the output: "
                                           "logit / theta if positive, * theta if negative (1 = off; ~1.2 "
                                           "suggested).")
    no_repeat_ngram_size: int = param(0, lo=0, hi_open=True,
                                      help="Ban any token that would repeat an n-gram of this size already in "
                                           "the prompt or the output (0 = off).")


@register
class Sample(Strategy):
    name = "sample"
    title = "Sampling (temperature / top-k / top-p / min-p / typical / epsilon / eta / top-h / penalties)"
    paper = ("Holtzman et al. 2020, The Curious Case of Neural Text Degeneration (nucleus); Nguyen et al. 2024 "
             "(min-p); Meister et al. 2022 (typical); Hewitt et al. 2022 (epsilon, eta); Keskar et al. 2019 "
             "(repetition penalty)")
    explanation = ("Instead of always taking the top token, draw one at random in proportion to its probability. "
                   "Temperature sharpens (<1) or flattens (>1) the distribution; top-k, top-p, min-p, typical, "
                   "epsilon, eta and top-h cut off the unreliable tail first, each by its own rule, and the "
                   "repetition penalty and n-gram ban push the model away from what it already said. Sampling gives "
                   "varied text, and the seed makes a run repeatable.")
    Config = SampleConfig
    deterministic = False

    def run(self, ctx: RunContext, cfg: SampleConfig) -> RunGen:
        return (yield from token_loop(ctx, Warped(cfg, ctx.generator, ctx.prompt_ids, ctx.lm.vocab_size,
                                                  ctx.lm.device)))


class Warped(Selector):
    """Process (repetition penalty, no-repeat n-grams), warp (temperature -> top-h -> top-k -> top-p -> min-p ->
    typical -> epsilon -> eta) and draw. The context the two processors read is the prompt plus every accepted
    token: a [V] mask of the ids seen (repetition penalty) and an n-gram index (no-repeat), each kept only when its
    parameter is on."""

    name = "sample"

    def __init__(self, cfg: SampleConfig, generator: torch.Generator, prompt_ids=(), vocab_size: int = 0,
                 device="cpu"):
        self.cfg, self.generator = cfg, generator
        self.prompt_ids, self.vocab_size, self.device = list(prompt_ids), vocab_size, device
        self.reset()

    def reset(self) -> None:
        cfg = self.cfg
        self.seen = (context_mask(self.prompt_ids, self.vocab_size, self.device)              # [V] bool
                     if cfg.repetition_penalty != 1.0 else None)
        self.ngrams = NgramBlocker(cfg.no_repeat_ngram_size, self.prompt_ids) if cfg.no_repeat_ngram_size else None

    def accept(self, token: int) -> None:
        if self.seen is not None and token < self.vocab_size:
            self.seen[token] = True
        if self.ngrams is not None:
            self.ngrams.add(token)

    def apply(self, logits, step):
        cfg = self.cfg
        if self.seen is not None:
            logits = repetition_penalty(logits, self.seen, cfg.repetition_penalty)           # [V]
        if self.ngrams is not None:
            banned = self.ngrams.banned()
            if sum(t < logits.shape[-1] for t in banned) >= logits.shape[-1]:
                raise UserError(f"sample: no_repeat_ngram_size={cfg.no_repeat_ngram_size} bans every token at "
                                f"step {step}; use a larger size or 0 (off)")
            logits = ban_tokens(logits, banned)                                              # [V]
        warped = warp(logits, cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p, top_h=cfg.top_h,
                      typical_p=cfg.typical_p, epsilon=cfg.epsilon_cutoff, eta=cfg.eta_cutoff)   # [V]
        probs = warped.softmax(-1)                                                           # [V]
        token = draw_from(probs, self.generator)
        # score, k and kept stay on the device: the loop folds them into its one host copy of the step
        return Choice(token, warped.log_softmax(-1)[token], {"k": torch.isfinite(warped).sum(),
                                                             "kept": (probs > 0).sum()})
