"""Mirostat v1 and v2: sampling with a feedback loop that holds the observed surprise (bits) at a target tau.

Paper: Basu, Ramachandran, Keskar, Varshney, "Mirostat: A Neural Text Decoding Algorithm that Directly Controls
Perplexity", ICLR 2021 (arXiv 2007.14966); reference implementation basusourya/mirostat `mirostat.py` (v1).
v2 is in the same official repository: its notebook `Mirostat_sampling_experiments.ipynb` ("Mirostat decoding for
scatter plot") keeps the tokens whose surprise is <= mu and measures the surprise under the untruncated
distribution, mu = 2 tau, learning rate 1 (it softmaxes the 1000 largest logits only, a negligible cut we leave out);
llama.cpp ships it as "Mirostat 2.0" (`llama_sampler_mirostat_v2_apply`, surprise from the truncated set).
Spec: docs/strategies.md#mirostat.

Each step (state per run: mu, initialised to 2*tau, in bits):
  p = softmax(logits / temperature)                       temperature first, as llama.cpp (1.0 = the paper)
  v1: s_hat = least-squares Zipf exponent through the origin of ln(p_i/p_{i+1}) against ln((i+1)/i) over the
          m most likely ranks (m-1 consecutive pairs; computed from log-probs, in float64)
      eps = s_hat - 1;  k = (eps * 2^mu / (1 - N^-eps))^(1/s_hat),  N = V (the logits width)
      k = round(k) + 1 (the reference's rounding), clamped to [1, V]; keep the k most likely tokens
  v2: keep every token with -log2 p_i <= mu (the longest such prefix of the sorted list), at least the top one
  sample X from the kept set renormalised (the run's seeded generator)
  S = -log2 p(X):  `full` = under the whole (temperature-scaled) distribution, as the reference;
                   `truncated` = under the kept set renormalised, as llama.cpp (always <= full)
  mu <- mu - eta * (S - tau)

Paper symbols -> config fields: tau -> `tau` (target surprise, bits), eta -> `eta` (learning rate), m -> `m`
(ranks in the Zipf fit), N -> the model's vocabulary (logits width), mu -> the state traced as `mu`/`mu_after`,
s_hat -> `s_hat`, k -> `k`. `version` picks v1 or v2, `surprise_from` where S is measured.

Defaults are the reference mirostat.py's for v1: tau = 3.0, eta = 1.0, m = 101 (its loop uses 100 pairs,
p_1..p_101), no temperature (1.0), surprise from the full distribution. llama.cpp's defaults for comparison:
tau = 5.0, eta = 0.1, m = 100 (99 pairs, the paper's sum over i = 1..m-1), temperature 0.8 (its sampler chain runs
temperature before mirostat), surprise from the truncated distribution, k rounded down (max(floor(k), 1)).
Where we differ from the reference on purpose: N is the true vocabulary size (the reference hard-codes 50000 for
GPT-2's 50257), k is clamped to [1, V] and computed in log space (2^mu overflows for large mu), eps -> 0 uses the
limit eps / (1 - N^-eps) -> 1/ln N instead of 0/0, the fit uses at most V ranks, and pairs whose smaller
probability is exactly 0 (a -inf logit) are left out of the fit. `surprise_from` defaults to `full` for v2 as well:
only then is the mean surprise against the model held at tau (with `truncated` mu drifts up and the realised
cross-entropy exceeds tau, docs/strategies.md#mirostat). As in both references mu is not bounded: when tau lies outside what
the context allows (below the surprise of the top token, or above that of sampling the whole distribution) mu winds
up or down without limit and the kept set sticks at 1 token or at all of them until the text moves back into range.
The mean of S over a window is exactly tau + (mu at its start - mu at its end) / (eta * length), which is what the
trace's mu columns show.

v1 of the paper's figures (`v1_rule = figure`): the notebook cell that made the repetition-vs-cross-entropy figure
("Mirostat sampling repetition analysis") differs from mirostat.py: the Zipf fit uses 99 pairs (p_1..p_100; `m` is
then 100 whatever it is set to), k = max(round(k), 1) (no +1), mu starts at 1.7 tau instead of 2 tau, and mu is
clamped at 0 after each update (max(mu, 0)). The default `script` is mirostat.py's rule above.

Trace (one `token` row per step, besides the base columns): `mu` (before the step), `mu_after`, `surprise` (S in
bits, from where `surprise_from` says), `error` (S - tau), `surprise_mean` (running mean of S), `k` (v1: tokens kept
from the Zipf analysis; v2: kept-set size), `s_hat` (v1 only), `cut_mass` (the probability mass truncation removed,
1 - sum of the kept p; ~0 means the loop is saturated at "keep everything"). `logprob` stays the model's untempered
ln p of the token and `score` is its ln p under the kept set renormalised (what was actually sampled from).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from declab.core.sampling import LN2, draw
from declab.core import Config, RunContext, RunGen, Strategy, param, register
from declab.core.loop import Choice, Selector, token_loop


@dataclass(frozen=True)
class MirostatConfig(Config):
    version: int = param(1, choices=(1, 2), help="1: the paper's Zipf-based top-k; 2: llama.cpp's 'Mirostat 2.0', "
                                                 "truncation by surprise (keep tokens with -log2 p <= mu).")
    tau: float = param(3.0, lo=0.0, hi=30.0, lo_open=True,
                       help="Target surprise in bits (the text's log2 perplexity). Reference 3.0; llama.cpp 5.0.")
    eta: float = param(1.0, lo=0.0, hi=10.0,
                       help="Learning rate of the mu update mu <- mu - eta*(S - tau). Reference 1.0; llama.cpp 0.1. "
                            "0 turns the feedback off (mu stays 2*tau).")
    m: int = param(101, lo=2, hi=100_000,
                   help="v1: ranks p_1..p_m in the least-squares Zipf fit (m-1 pairs). 101 = the reference's 100 "
                        "pairs; llama.cpp uses m=100 (99 pairs). Capped at the vocabulary size. Unused by v2.")
    temperature: float = param(1.0, lo=0.0, hi=100.0, lo_open=True,
                               help="Divide logits by this before mirostat (llama.cpp's order; the paper has none).")
    v1_rule: str = param("script", choices=("script", "figure"),
                         help="v1 only. script: the reference mirostat.py (m pairs as set, k = round(k) + 1, mu "
                              "starts at 2 tau). figure: the official notebook's code behind the paper's repetition "
                              "figure (99 pairs, k = max(round(k), 1), mu starts at 1.7 tau, mu clamped at >= 0).")
    surprise_from: str = param("full", choices=("full", "truncated"),
                               help="Where S = -log2 p(X) is measured: 'full' distribution (the reference) or the "
                                    "'truncated' kept set renormalised (llama.cpp; lets the true surprise exceed tau).")


# ------------------------------------------------------------------------------------------------ pure pieces
def zipf_exponent(sorted_logp: torch.Tensor) -> float:
    """Least-squares Zipf exponent through the origin: s_hat = sum t_i b_i / sum t_i^2 with t_i = ln((i+1)/i),
    b_i = ln p_i - ln p_{i+1}, i = 1..m-1, from the m largest log-probs sorted descending ([m], any float dtype;
    computed in float64). Pairs whose p_{i+1} is 0 are left out; NaN when no pair is left."""
    logp = sorted_logp.double()
    b = logp[:-1] - logp[1:]                                               # [m-1]
    i = torch.arange(1, logp.numel(), dtype=torch.float64)
    t = torch.log((i + 1) / i)                                             # [m-1]
    ok = torch.isfinite(b)
    b, t = torch.where(ok, b, 0.0), torch.where(ok, t, 0.0)
    den = float((t * t).sum())
    return float((t * b).sum()) / den if den > 0 else float("nan")


def zipf_k(s_hat: float, mu: float, n: int) -> float:
    """The paper's k = (eps * 2^mu / (1 - n^-eps))^(1/s_hat), eps = s_hat - 1, computed in log space (no overflow;
    eps -> 0 takes the limit eps/(1 - n^-eps) -> 1/ln n). Real-valued; the caller rounds and clamps."""
    if not math.isfinite(s_hat):
        return 1.0
    ln_n = math.log(n)
    eps = s_hat - 1.0
    x = eps * ln_n
    ln_ratio = -math.log(ln_n) if abs(x) < 1e-12 else math.log(eps / -math.expm1(-x))
    ln_k = (ln_ratio + mu * LN2) / max(s_hat, 1e-12)
    return math.exp(min(max(ln_k, -700.0), 700.0))


def reference_round(k: float, vocab_size: int, plus_one: bool = True) -> int:
    """The reference's integer k: round(k) + 1 (round half to even, as Python's round), clamped to [1, V];
    plus_one=False: the figure notebook's max(round(k), 1)."""
    return int(min(max(round(k) + (1 if plus_one else 0), 1), vocab_size))


FIGURE_RANKS = 100              # the figure notebook's estimate_s(prob_list[0:100]): 99 pairs
FIGURE_MU0 = 1.7                # its max_surprise = 1.7 * target_surprise


class Controller(Selector):
    """One run's mirostat state (mu and the running surprise) as a selector. Never shared between runs. `apply`
    measures the surprise and proposes the next mu; `accept` commits it (the feedback step of the paper)."""

    name = "mirostat"

    def __init__(self, cfg: MirostatConfig, vocab_size: int, generator: torch.Generator):
        self.cfg, self.vocab_size, self.generator = cfg, vocab_size, generator
        self.figure = cfg.version == 1 and cfg.v1_rule == "figure"
        self.ranks = min(FIGURE_RANKS if self.figure else cfg.m, vocab_size)
        self.reset()

    def reset(self) -> None:
        self.mu = self.mu_next = (FIGURE_MU0 if self.figure else 2.0) * self.cfg.tau
        self.total_surprise, self.steps = 0.0, 0

    def accept(self, token: int) -> None:
        self.mu = self.mu_next

    def select(self, logits: torch.Tensor, step: int = 0) -> tuple[int, float, dict]:
        """apply + accept in one call: (token, score, trace columns)."""
        choice = self.apply(logits, step)
        self.accept(choice.token)
        return choice.token, choice.score, choice.columns

    def apply(self, logits: torch.Tensor, step: int = 0) -> Choice:
        """logits [V] -> the token, its ln p under the kept set renormalised, trace columns."""
        cfg = self.cfg
        logits = logits.float()
        logp = torch.log_softmax(logits / cfg.temperature if cfg.temperature != 1.0 else logits, -1)   # [V]
        extra: dict = {}
        if cfg.version == 1:
            top = torch.topk(logp, self.ranks)                                 # sorted descending
            s_hat = zipf_exponent(top.values)                                 # host sync 1
            k = reference_round(zipf_k(s_hat, self.mu, self.vocab_size), self.vocab_size, not self.figure)
            if k <= self.ranks:
                kept_logp, kept_ids = top.values[:k], top.indices[:k]         # [k]
            elif k < self.vocab_size:
                kept_logp, kept_ids = torch.topk(logp, k)                     # [k]
            else:
                kept_logp, kept_ids = logp, None                              # k = V: nothing is cut
            pick = draw(kept_logp, self.generator)                            # host sync 2
            token = pick if kept_ids is None else int(kept_ids[pick])
            kept = logp.new_tensor(float(k))
            extra["s_hat"] = s_hat
        else:
            keep = (-logp / LN2) <= self.mu                                    # [V] surprise within mu
            keep.scatter_(0, logp.argmax().unsqueeze(0), True)                # keep >= 1 token (the top one)
            kept_ids = keep.nonzero().squeeze(1)                              # [k] ascending ids, host sync 1
            kept_logp = logp[kept_ids]                                        # [k]
            token = int(kept_ids[draw(kept_logp, self.generator)])            # host sync 2
            kept = logp.new_tensor(float(kept_ids.numel()))
        lp, lnorm, k = torch.stack([logp[token].double(), torch.logsumexp(kept_logp, -1).double(),
                                    kept.double()]).tolist()                  # host sync 3
        k = int(k)
        score = lp - lnorm                                                    # ln p under the kept set
        surprise = -(score if cfg.surprise_from == "truncated" else lp) / LN2
        error = surprise - cfg.tau
        mu_before = self.mu
        self.mu_next = mu_before - cfg.eta * error
        if self.figure:
            self.mu_next = max(self.mu_next, 0.0)                             # the figure notebook's clamp
        self.total_surprise += surprise
        self.steps += 1
        extra.update(k=k, kept=k, mu=mu_before, mu_after=self.mu_next, surprise=surprise, error=error,
                     surprise_mean=self.total_surprise / self.steps, cut_mass=max(0.0, -math.expm1(lnorm)))
        return Choice(token, score, extra)


@register
class Mirostat(Strategy):
    name = "mirostat"
    title = "Mirostat (v1 / v2): perplexity control"
    paper = ("Basu et al. 2021, Mirostat: A Neural Text Decoding Algorithm that Directly Controls Perplexity "
             "(ICLR; v1); llama.cpp's Mirostat 2.0 (v2)")
    explanation = ("Top-k and top-p cut the tail by a fixed rule, so the text's surprise drifts: a small cut lets it "
                   "fall until the text repeats itself (the boredom trap), a large one lets it rise until the text "
                   "stops making sense (the confusion trap). Mirostat steers instead. It keeps a budget mu (in bits) "
                   "that decides how many tokens may be sampled; after each token it measures the surprise "
                   "-log2 p of what it picked and nudges mu down when that was above the target tau and up when it "
                   "was below. v1 turns mu into a top-k through a Zipf fit of the distribution; v2 simply keeps the "
                   "tokens whose own surprise is at most mu. The running mean surprise settles at tau.")
    Config = MirostatConfig
    deterministic = False

    def run(self, ctx: RunContext, cfg: MirostatConfig) -> RunGen:
        controller = Controller(cfg, ctx.lm.vocab_size, ctx.generator)      # per-run state, never on the LM
        return (yield from token_loop(ctx, controller))
