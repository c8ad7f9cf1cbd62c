"""Shared pieces of the two-model strategies (ead, speculative): the second model, per-model KV caches that catch
up on tokens they missed, the speculative acceptance test, and the metrics both report.

Second model. A strategy declares its role (`roles = ("draft",)`, ...) and, through `needs(cfg)`, the key its
parameters name (speculative `draft`, ead `small`, contrastive `amateur`; `named_model` reads such a value). The
engine's plan and resolver (declab/run/) load it, check that it shares the tokenizer, and hand it over as
`ctx.model(role)`; strategies never load models.

Caches. Each model keeps its own cache and the token ids it holds (`ModelState`). `advance(seq)` crops the cache to
the longest prefix it shares with `seq` (never all of it: the last token is always fed, so its logits come out),
feeds the rest in one forward (a catch-up prefill when more than one token is missing) and returns the logits.
Caches of the two models are never mixed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from declab.core.sampling import draw_from, entropy_bits, warp

SECOND_MODEL_DEFAULTS = ("model", "pair", "")     # parameter values meaning "the second model beside the model"


# ------------------------------------------------------------------------------------------------ second model
def named_model(value: str) -> str | None:
    """A model key named in a parameter, or None when the value means the paired second model."""
    value = (value or "").strip()
    return None if value in SECOND_MODEL_DEFAULTS else value


DRAFTER_ADVICE = (
    "Which drafter: when the answer reuses the prompt's own text (quote, repeat, rename in, edit, correct or "
    "reformat a given text or code), use speculative with draft = prompt_lookup and num_draft_tokens 16 to 24: on "
    "16 such prompts on a 2-core CPU that was 3.8-4.0x faster than plain greedy end to end (4.6-4.8x for the "
    "decoding alone), with exactly the same tokens. On open-ended chat there is little to copy and no drafter paid "
    "on that CPU (best: spec_tree with drafter token_recycling, 1.0x; the trained heads medusa, hydra, eagle, kangaroo "
    "0.75-0.9x; the embedded model draft 0.5x): use greedy there. Measured by bench/speculative_cpu.py; the table is "
    "in README.md.")


def model_params(lm) -> int | None:
    """Parameters of a model (tied weights counted once); None for a model without torch weights (fake)."""
    model = getattr(lm, "model", None)
    if model is None or not hasattr(model, "parameters"):
        return getattr(lm, "num_params", None)
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total


# ------------------------------------------------------------------------------------------------ caches
class ModelState:
    """One model's KV cache and the ids it holds. Per run (never stored on the shared LM)."""

    def __init__(self, lm, name: str):
        self.lm, self.name = lm, name
        self.cache = None
        self.ids: list[int] = []         # token ids whose keys/values are in the cache
        self.verified = 0                # ids[:verified] equal the sequence given last time (it only grows)
        self.last_keep = 0               # cache length kept by the last advance (what was fed came after it)
        self.forwards = 0
        self.tokens_fed = 0
        self.fwd_ms = 0.0
        self.fed_hidden = None           # (first position, [T, H] states) of what sync_prefix fed last, when asked

    def advance(self, seq: list[int], extra: list[int] | tuple = (), all_logits: bool = False, hidden: bool = False):
        """Sync the cache to `seq` and feed what it lacks plus `extra` in one forward. `seq` only grows from call
        to call (tokens are appended, never rewritten), so only the part after the last call is compared.
        Returns (StepOut, fed) where fed = number of tokens of `seq` fed (1 normally; more = catch-up); with
        hidden=True StepOut.hidden [1, T, H] holds the last-layer states of the T fed positions, the first at
        position `last_keep`."""
        keep = min(common_prefix(self.ids, seq, min(self.verified, len(self.ids), len(seq))), len(seq) - 1)
        if self.cache is None or keep == 0:
            self.cache, self.ids, keep = None, [], 0
        elif keep < len(self.ids):
            self.lm.crop(self.cache, keep)
            del self.ids[keep:]
        self.last_keep = keep
        feed = list(seq[keep:]) + list(extra)
        if self.cache is None:
            out = self.lm.prefill(feed, all_logits=all_logits, hidden=hidden)
        else:
            out = self.lm.step([feed], self.cache, all_logits=all_logits, hidden=hidden)
        self.cache = out.cache
        self.ids.extend(feed)
        self.verified = len(seq)
        self.forwards += 1
        self.tokens_fed += len(feed)
        self.fwd_ms += out.fwd_ms
        return out, len(seq) - keep


# ------------------------------------------------------------------------------------------------ model drafter
@dataclass
class Proposal:
    token: int
    q: torch.Tensor | None       # [V] warped draft distribution the token was drawn from; None = point mass
    q_token: float               # q(token)
    confidence: float | None     # predicted acceptance: the drafter's probability of the token, or the trained
                                 # head's a_j (None until the draft has read the token)
    logprob: float | None = None  # unwarped draft log-prob
    entropy: float | None = None
    ms: float = 0.0


class ModelDrafter:
    """A smaller same-tokenizer LM with its own KV cache. With `head` (SpecDec++'s trained acceptance head, an
    object with p_accept(states [..., H]) -> [...]), each draft forward after the first also returns the draft's
    post-norm state of the token it read, and that token's confidence becomes the head's a_j."""

    def __init__(self, lm, cfg, generator: torch.Generator, eos_ids, head=None):
        self.state = ModelState(lm, "draft")
        self.name = lm.key
        self.cfg, self.generator, self.eos_ids = cfg, generator, eos_ids
        self.head = head

    def propose(self, seq: list[int], gamma: int, keep_going) -> tuple[list[Proposal], int]:
        """Up to gamma tokens; keep_going(confidences so far) may stop early. Returns (proposals, catch-up).
        With a head, confidences are [a_1 .. a_{n-1}, None]: draft forward j+1 (which read token j) gives a_j."""
        cfg, lm, head = self.cfg, self.state.lm, self.head
        t0 = lm.clock_ms()
        out, fed = self.state.advance(seq)
        props: list[Proposal] = []
        for i in range(gamma):
            if head is not None and i > 0:                      # the state after reading token i (1-based)
                props[-1].confidence = float(head.p_accept(out.hidden[0, -1]))     # hidden [1, 1, H] -> a_i
            logits = out.logits[0]                                                  # [V]
            logp = logits.log_softmax(-1)
            if cfg.temperature == 0:
                token = int(logits.argmax())
                q, q_tok = None, float(logp[token].exp())        # greedy: q is the point mass; q_tok for the trace
                conf = q_tok
            else:
                q = probs(logits, cfg.temperature, cfg.top_k, cfg.top_p)
                token = draw_from(q, self.generator)
                q_tok = conf = float(q[token])
            if head is not None:
                conf = None                                     # a_i comes from the next forward's state
            t1 = lm.clock_ms()
            props.append(Proposal(token, q, q_tok, conf, float(logp[token]), float(entropy_bits(logp)), t1 - t0))
            t0 = t1
            if token in self.eos_ids or i + 1 == gamma or not keep_going([p.confidence for p in props]):
                break
            out = lm.step([[token]], self.state.cache, hidden=head is not None)
            self.state.cache = out.cache
            self.state.ids.append(token)
            self.state.forwards += 1
            self.state.tokens_fed += 1
        return props, fed - 1

    def observe(self, seq: list[int]) -> None:
        pass



def common_prefix(a: list[int], b: list[int], start: int = 0) -> int:
    """Length of the common prefix of a and b, given that a[:start] == b[:start]."""
    n = min(len(a), len(b))
    i = start
    while i < n and a[i] == b[i]:
        i += 1
    return i


# ------------------------------------------------------------------------------------------------ acceptance
def probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The warped distribution both models sample from (identical warpers on p and q). temperature 0 = greedy
    (a point mass on the argmax)."""
    if temperature == 0:
        return torch.zeros_like(logits).scatter(-1, logits.argmax(-1, keepdim=True), 1.0)
    return warp(logits, temperature, top_k, top_p).softmax(-1)


def accept_probability(p: torch.Tensor, q: torch.Tensor, token: int) -> float:
    """min(1, p(x)/q(x)) for a token x drawn from q (Leviathan et al. 2023, Alg. 1)."""
    qx = float(q[token])
    return 1.0 if qx <= 0 else min(1.0, float(p[token]) / qx)


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)): what to sample from after a rejection. Falls back to p when the difference has no mass
    (only possible through rounding, since a rejection implies p(x) < q(x) somewhere)."""
    r = (p - q).clamp_min(0)
    s = float(r.sum())
    return r / s if s > 1e-12 else p


def speculative_step(p: torch.Tensor, q: torch.Tensor, token: int, generator: torch.Generator):
    """One position of speculative sampling: accept `token` (drawn from q) with probability min(1, p/q), else draw
    from the residual. Returns (accepted, emitted token, u)."""
    u = float(torch.rand((), generator=generator, device=p.device))
    if u < accept_probability(p, q, token):
        return True, token, u
    return False, draw_from(residual(p, q), generator), u


def expected_tokens_per_round(alpha: float, gamma: int) -> float:
    """(1 - alpha^(gamma+1)) / (1 - alpha): expected tokens per round under i.i.d. acceptance alpha (Leviathan)."""
    if alpha >= 1.0:
        return float(gamma + 1)
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


def expected_speedup(alpha: float, gamma: int, c: float) -> float:
    """(1 - alpha^(gamma+1)) / ((1 - alpha)(gamma c + 1)): expected wall-time improvement (Leviathan), c = cost of
    one draft step / cost of one target step."""
    return expected_tokens_per_round(alpha, gamma) / (gamma * c + 1)


@dataclass
class Timer:
    """Accumulates ms between start/stop calls on the LM's (CUDA-synchronised) clock."""

    lm: object
    ms: float = 0.0
    _t0: float = math.nan

    def start(self) -> None:
        self._t0 = self.lm.clock_ms()

    def stop(self) -> float:
        dt = self.lm.clock_ms() - self._t0
        self.ms += dt
        return dt


def target_only_ms(lm, prompt_ids: list[int], num_tokens: int, stop=None) -> float | None:
    """Wall time (ms) of plain target decoding of `num_tokens` tokens after the prompt (prefill included, argmax
    feedback; the cost does not depend on which tokens come out). None when stopped."""
    t0 = lm.clock_ms()
    out = lm.prefill(prompt_ids)
    for _ in range(max(0, num_tokens - 1)):
        if stop is not None and stop.is_set():
            return None
        out = lm.step([[int(out.logits[0].argmax())]], out.cache)
    int(out.logits[0].argmax())
    return lm.clock_ms() - t0


def record_speedup(ctx, metrics, emitted: int, spec_ms: float, measure: bool) -> None:
    """Set metrics.spec_ms and, when `measure`, time target-only decoding of the same `emitted` tokens now (same
    run, same machine state) for metrics.target_only_ms and metrics.speedup = target_only_ms / spec_ms, computed
    from the rounded times so the three stored numbers agree."""
    metrics.spec_ms = round(spec_ms, 2)
    if measure and emitted and not ctx.stop.is_set():
        base_ms = target_only_ms(ctx.lm, ctx.prompt_ids, emitted, ctx.stop)
        if base_ms is not None:
            metrics.target_only_ms = round(base_ms, 2)
            metrics.speedup = round(metrics.target_only_ms / max(metrics.spec_ms, 0.01), 4)
