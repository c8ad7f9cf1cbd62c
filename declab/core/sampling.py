"""Sampling helpers shared by every strategy: entropy, logits processors and warpers, seeded draws.

The warpers follow transformers' order and semantics (temperature, top-h, top-k, top-p, min-p, typical, epsilon,
eta, as `generate` applies them in transformers 5.23), so a strategy that says "top_p=0.9" means what a
transformers user expects. The two processors that need the context (CTRL repetition penalty, no-repeat n-grams)
run before them, as in `generate`. Removed tokens get -inf; every warper sees the full row with -inf for the
tokens already removed, and each one's off value returns its input untouched.
"""

from __future__ import annotations

import math

import torch

LN2 = math.log(2.0)


def entropy_bits(logp: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in bits of the distribution(s) given as log-probs. logp: [..., V] -> [...]."""
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1) / LN2


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits if temperature == 1.0 else logits / temperature


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the top_k largest logits per row (0 = off). logits: [..., V]."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]            # [..., 1]
    return logits.masked_fill(logits < kth, float("-inf"))


NUCLEUS_HEAD = 1024   # top_p first looks at this many most likely tokens (a full sort of 49k logits is ~5 ms on CPU)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter as in transformers' TopPLogitsWarper: drop the low tail whose mass is <= 1 - top_p,
    always keeping the most likely token (1.0 = off).

    transformers sorts the whole row ascending and removes a token when the cumulative mass up to it is <= 1 - top_p.
    When the NUCLEUS_HEAD most likely tokens already hold more than top_p (+1e-4, so rounding cannot move the
    boundary into the tail), everything below them is removed anyway, so only the head is sorted: the same rule
    with the tail's mass as the starting sum. Otherwise the full sort runs."""
    if top_p >= 1.0:
        return logits
    V = logits.shape[-1]
    if V > 4 * NUCLEUS_HEAD:
        probs = logits.float().softmax(-1)                                   # [..., V]
        head_p, head_i = probs.topk(NUCLEUS_HEAD, dim=-1)                     # [..., K] descending
        tail = 1.0 - head_p.sum(-1, keepdim=True)                            # [..., 1]
        if bool((tail < 1.0 - top_p - 1e-4).all()):
            cum = tail + head_p.flip(-1).cumsum(-1)                          # [..., K] ascending cumulative mass
            keep_asc = cum > (1.0 - top_p)
            keep_asc[..., -1] = True                                         # the most likely token stays
            keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, head_i, keep_asc.flip(-1))
            return logits.masked_fill(~keep, float("-inf"))
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)   # [..., V] ascending
    cum = sorted_logits.softmax(-1).cumsum(-1)                            # [..., V]
    remove_sorted = cum <= (1.0 - top_p)
    remove_sorted[..., -1] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens with p >= min_p * p_max (0 = off), as transformers' MinPLogitsWarper."""
    if min_p <= 0.0:
        return logits
    p = logits.softmax(-1)                                                # [..., V]
    threshold = min_p * p.max(-1, keepdim=True).values                    # [..., 1]
    return logits.masked_fill(p < threshold, float("-inf"))


TOP_H_N = 100     # transformers' TopHLogitsWarper.top_n: only the 100 most likely tokens can survive top-h


def top_h_filter(logits: torch.Tensor, top_h: float) -> torch.Tensor:
    """Top-H ("Top-H Decoding: Adapting the Creativity and Coherence with Bounded Entropy in Text Generation",
    NeurIPS 2025, arXiv 2509.02510), as transformers' TopHLogitsWarper (0 = off; transformers' legal range
    (0, 1]). Over the TOP_H_N = 100 most likely tokens, renormalised to q: tau = top_h * H(q); keep tokens in
    decreasing order while the running sum of -q ln q is <= tau, the most likely token always. Tokens outside those
    100 are removed. logits: [..., V]."""
    if top_h <= 0.0:
        return logits
    n = min(TOP_H_N, logits.shape[-1])
    top_logits, top_idx = torch.topk(logits, n, dim=-1, largest=True, sorted=True)   # [..., n] descending
    q_logits = top_logits - top_logits.logsumexp(-1, keepdim=True)                  # [..., n] ln q
    q = q_logits.softmax(-1)                                                        # [..., n]
    h = -(q_logits.clamp(min=torch.finfo(q_logits.dtype).min) * q).sum(-1)          # [...] H(q), nats
    tau = (h * top_h).unsqueeze(-1)                                                 # [..., 1]
    cum = torch.cumsum(-q * torch.log(q), dim=-1)                                   # [..., n]
    select = cum <= tau
    select[..., 0] = True
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, top_idx, select)  # [..., V]
    return logits.masked_fill(~keep, float("-inf"))


def typical_filter(logits: torch.Tensor, typical_p: float) -> torch.Tensor:
    """Locally typical sampling (Meister et al. 2022, arXiv 2202.00666), as transformers' TypicalLogitsWarper
    (1 = off). With p and H over the whole row: s(v) = |-ln p(v) - H|; sort by s ascending; last = #{cumulative
    mass < typical_p}; remove tokens with s > s[last] (ties at the boundary stay), keeping the first one.
    logits: [..., V]."""
    if typical_p >= 1.0:
        return logits
    logp = logits.log_softmax(-1)                                                   # [..., V]
    ent = -(logp * logp.exp()).nansum(-1, keepdim=True)                              # [..., 1] H, nats
    shifted = torch.abs(-logp - ent)                                                # [..., V] s(v)
    sorted_s, order = torch.sort(shifted, descending=False)                         # [..., V]
    cum = logits.gather(-1, order).softmax(-1).cumsum(-1)                           # [..., V]
    last = (cum < typical_p).sum(-1, keepdim=True).clamp_(max=logits.shape[-1] - 1)  # [..., 1]
    remove_sorted = sorted_s > sorted_s.gather(-1, last)
    remove_sorted[..., :1] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def epsilon_filter(logits: torch.Tensor, epsilon: float) -> torch.Tensor:
    """epsilon-sampling (Hewitt et al. 2022, "Truncation Sampling as Language Model Desmoothing", arXiv
    2210.15191), as transformers' EpsilonLogitsWarper (0 = off): remove p(v) < epsilon, except the most likely
    token(s). logits: [..., V]."""
    if epsilon <= 0.0:
        return logits
    remove = (logits.softmax(-1) < epsilon) & (logits < logits.amax(-1, keepdim=True))
    return logits.masked_fill(remove, float("-inf"))


def eta_filter(logits: torch.Tensor, epsilon: float) -> torch.Tensor:
    """eta-sampling (Hewitt et al. 2022), as transformers' EtaLogitsWarper (0 = off): eta = min(epsilon,
    sqrt(epsilon) * exp(-H)), H the entropy of the whole row in nats; remove p(v) < eta, except the most likely
    token(s). H is computed as torch's Categorical(logits=...).entropy(), which transformers calls.
    logits: [..., V]."""
    if epsilon <= 0.0:
        return logits
    eps = torch.tensor(epsilon, device=logits.device)                               # float32, as transformers
    lnp = logits - logits.logsumexp(-1, keepdim=True)                               # [..., V]
    h = -(lnp.clamp(min=torch.finfo(lnp.dtype).min) * lnp.softmax(-1)).sum(-1)       # [...]
    eta = torch.min(eps, torch.sqrt(eps) * torch.exp(-h))[..., None]                # [..., 1]
    remove = (logits.softmax(-1) < eta) & (logits < logits.amax(-1, keepdim=True))
    return logits.masked_fill(remove, float("-inf"))


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019, arXiv 1909.05858), as transformers'
    RepetitionPenaltyLogitsProcessor (1 = off): every token that occurs in the context (prompt and generated ids,
    each once however often it occurs) gets l * penalty if l < 0, else l / penalty. seen: [V] bool mask of the
    context's ids (`context_mask`). logits: [..., V]."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)          # [..., V]
    return torch.where(seen, penalised, logits)


def context_mask(ids, vocab_size: int, device) -> torch.Tensor:
    """[V] bool: True for the ids that occur in `ids` (ids >= V, which the logits cannot produce, are ignored)."""
    seen = torch.zeros(vocab_size + 1, dtype=torch.bool, device=device)             # spare slot for ids >= V
    if len(ids):
        seen[torch.tensor(list(ids), dtype=torch.long, device=device).clamp(max=vocab_size)] = True
    return seen[:vocab_size]


class NgramBlocker:
    """No-repeat n-grams, as transformers' NoRepeatNGramLogitsProcessor: with n = ngram_size, a token that would
    complete an n-gram already present in the context (prompt included) is banned. Fed incrementally (`add` each
    accepted id): `follow[prefix]` is the set of tokens that followed each (n-1)-gram, so a step costs one dict
    lookup, not a scan of the context."""

    def __init__(self, ngram_size: int, ids=()):
        self.n = ngram_size
        self.ids: list[int] = []
        self.follow: dict[tuple, set] = {}
        for t in ids:
            self.add(int(t))

    def add(self, token: int) -> None:
        self.ids.append(token)
        if len(self.ids) >= self.n:
            prefix = tuple(self.ids[len(self.ids) - self.n: -1])
            self.follow.setdefault(prefix, set()).add(token)

    def banned(self) -> list[int]:
        """The ids banned at the next position (sorted)."""
        if len(self.ids) < self.n:
            return []
        return sorted(self.follow.get(tuple(self.ids[len(self.ids) + 1 - self.n:]), ()))


def ban_tokens(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """logits [..., V] with the given ids at -inf (ids >= V are ignored)."""
    ids = [t for t in ids if t < logits.shape[-1]]
    if not ids:
        return logits
    return logits.index_fill(-1, torch.tensor(ids, dtype=torch.long, device=logits.device), float("-inf"))


def warp(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
         min_p: float = 0.0, *, top_h: float = 0.0, typical_p: float = 1.0, epsilon: float = 0.0,
         eta: float = 0.0) -> torch.Tensor:
    """temperature -> top-h -> top-k -> top-p -> min-p -> typical -> epsilon -> eta, transformers' order
    (generation/utils.py `_get_logits_processor`). Each stage at its off value returns its input."""
    logits = apply_temperature(logits, temperature)
    logits = top_h_filter(logits, top_h)
    logits = top_k_filter(logits, top_k)
    logits = top_p_filter(logits, top_p)
    logits = min_p_filter(logits, min_p)
    logits = typical_filter(logits, typical_p)
    logits = epsilon_filter(logits, epsilon)
    return eta_filter(logits, eta)


def kept_count(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The trace's `kept`: how many tokens have nonzero probability in softmax(logits) [..., V] -> [...] int64, left
    on the device (fold it into a host copy the caller makes anyway). temperature 0 is `sample_or_argmax`'s argmax:
    one token, whatever the row."""
    if temperature == 0:
        return torch.ones(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return (logits.softmax(-1) > 0).sum(-1)


def sample_or_argmax(logits: torch.Tensor, generator: torch.Generator, temperature: float = 1.0, top_k: int = 0,
                     top_p: float = 1.0, min_p: float = 0.0) -> tuple[int, torch.Tensor]:
    """The one rule every strategy with a temperature uses: temperature 0 takes the argmax (ties to the lowest id,
    as torch.argmax and transformers' greedy search); otherwise warp (temperature -> top-k -> top-p -> min-p) and
    draw once from the run's generator. logits: [V]. Returns (token, the logits the token came from [V]: the warped
    ones, or the input itself for the argmax), so callers read the score or the kept set from one place."""
    if temperature == 0:
        return int(logits.argmax()), logits
    warped = warp(logits, temperature, top_k, top_p, min_p)                  # [V]
    return draw(warped, generator), warped


def draw(logits: torch.Tensor, generator: torch.Generator) -> int:
    """One token from softmax(logits) [V], using the run's seeded generator (never the global RNG)."""
    return draw_from(logits.softmax(-1), generator)


def draw_from(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One index from the (possibly unnormalised) non-negative weights probs [V], by inverse CDF: one uniform from
    the run's generator against the float64 cumulative sum (10x cheaper than torch.multinomial on a 49k row here;
    zero-weight entries are never drawn)."""
    cdf = probs.double().cumsum(-1)                                       # [V]
    u = torch.rand(1, generator=generator, dtype=torch.float64, device=probs.device) * cdf[-1]   # [1]
    return int(torch.searchsorted(cdf, u, right=True).clamp_max(cdf.shape[-1] - 1))


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g
