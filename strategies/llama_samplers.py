"""llama.cpp's samplers, one class each, on a candidate list like llama.cpp's `llama_token_data_array`.

Reference: llama.cpp src/llama-sampling.cpp (ggml-org/llama.cpp@0344068) and the chain that common/sampling.cpp
builds from `--samplers` (`common_sampler_init`). Spec: docs/strategies.md#sampler_chain.

The candidate list (`Cands`) holds token ids, logits, and a `present` flag per entry. llama.cpp shrinks its array
(`cur_p->size`); here an entry leaves by `present = False`, so shapes stay fixed and no stage needs the host (one
copy per step, made by the strategy). Some llama.cpp samplers set a logit to -inf but leave the token in the array
(top_n_sigma, temperature <= 0, a -inf logit bias): such a token stays `present`, has zero probability, and still
counts in the array size where llama.cpp counts it (dynamic temperature's maximum entropy ln(size)). Only top_k
compacts the list (to its k entries: a fixed size), so after top_k every stage works on k entries, as in llama.cpp.
`p0` carries the model's own probability of each entry (softmax of the raw logits), for the mass a stage kept.

Probabilities inside a stage are llama.cpp's: a softmax over the current candidates (the survivors of the earlier
stages), at the temperature applied so far. Ties at a cut (two tokens with the same logit or score) are broken by
position here and by llama.cpp's sort there; the kept set differs only in which of the tied tokens stays.

Each class: `apply(c) -> (c, stats)` (stats: 0-d tensors for the stage's trace row), `accept(token)` for the
samplers with state (penalties, DRY), `reset(prompt_ids)` before a run (llama.cpp's caller feeds the prompt
tokens to `accept`, so the windows include the prompt).
"""

from __future__ import annotations

import json
import math
import re
from collections import deque
from dataclasses import dataclass

import torch

from declab.core.errors import UserError

NEG_INF = float("-inf")
FLT_MAX = 3.4028234663852886e38

# canonical names of llama.cpp's `--samplers` (common_sampler_type_to_str), in its default order
DEFAULT_ORDER = ("penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature")
# llama.cpp's alternative spellings (common_sampler_types_from_names, allow_alt_names = true as for the CLI)
ALT_NAMES = {"top-k": "top_k", "top-p": "top_p", "top-n-sigma": "top_n_sigma", "nucleus": "top_p",
             "typical-p": "typ_p", "typical": "typ_p", "typ-p": "typ_p", "typ": "typ_p", "min-p": "min_p",
             "temp": "temperature"}
DEFAULT_BREAKERS = ("\n", ":", "\"", "*")      # common.h dry_sequence_breakers
MAX_BREAKER_CHARS = 40                         # llama_sampler_init_dry: MAX_CHAR_LEN
MAX_BREAKER_TAIL = 20                          # MAX_SEQ_LEN
TOP_P_HEAD = 256                               # llama_sampler_top_p_apply: the first partial sort when size > 1024


# ------------------------------------------------------------------------------------------------ parsing
def parse_samplers(text: str) -> tuple[str, ...]:
    """`--samplers` text ("top_k;temperature", llama.cpp's `;`-separated names; alt names accepted) -> canonical
    names. Unknown names and a sampler listed twice are refused with the legal names."""
    names = []
    for raw in str(text).split(";"):
        name = raw.strip().lower()
        if not name:
            continue
        canon = name if name in DEFAULT_ORDER else ALT_NAMES.get(name)
        if canon is None:
            raise UserError(f"sampler_chain: samplers: unknown sampler '{raw.strip()}'; legal names "
                            f"(';'-separated, each at most once): {', '.join(DEFAULT_ORDER)}")
        if canon in names:
            raise UserError(f"sampler_chain: samplers: '{canon}' is listed twice; each of "
                            f"{', '.join(DEFAULT_ORDER)} may appear at most once")
        names.append(canon)
    return tuple(names)


_BIAS_ITEM = re.compile(r"^\s*(\d+)\s*([+-])\s*(inf|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*$", re.IGNORECASE)


def parse_logit_bias(text: str) -> tuple[tuple[int, float], ...]:
    """llama.cpp's `--logit-bias TOKEN_ID(+/-)BIAS`, comma-separated: "15043+1,2-inf" -> ((15043, 1.0), (2, -inf))."""
    out = []
    for item in str(text).split(","):
        if not item.strip():
            continue
        m = _BIAS_ITEM.match(item)
        if m is None:
            raise UserError(f"sampler_chain: logit_bias: cannot read '{item.strip()}'; write TOKEN_ID+BIAS or "
                            f"TOKEN_ID-BIAS (a number or inf), comma-separated, e.g. 15043+1,2-inf")
        value = float(m.group(3))
        out.append((int(m.group(1)), value if m.group(2) == "+" else -value))
    return tuple(out)


def parse_breakers(text: str) -> tuple[str, ...]:
    """DRY sequence breakers as a JSON list of strings ('["\\n", ":"]'), or '' / 'none' for no breakers. As
    llama.cpp: empty strings are skipped, each is cut to 40 characters."""
    if str(text).strip().lower() in ("", "none"):
        return ()
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        items = None
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise UserError("sampler_chain: dry_sequence_breakers must be a JSON list of strings, e.g. "
                        "[\"\\n\", \":\", \"\\\"\", \"*\"], or none")
    return tuple(s[:MAX_BREAKER_CHARS] for s in items if s)


# ------------------------------------------------------------------------------------------------ candidates
@dataclass
class Cands:
    """llama.cpp's candidate array. ids [n] long, logits [n] float32, present [n] bool, p0 [n] (the model's own
    probability of each entry); `identity`: ids == arange(V) (the full vocabulary in id order); `dense`: every
    entry is present (known without looking: no stage has removed one yet), which spares the masking passes."""

    ids: torch.Tensor
    logits: torch.Tensor
    present: torch.Tensor
    p0: torch.Tensor
    identity: bool = False
    dense: bool = False

    @staticmethod
    def full(logits: torch.Tensor, p0: torch.Tensor) -> "Cands":
        V = logits.shape[-1]
        return Cands(torch.arange(V, device=logits.device), logits, torch.ones(V, dtype=torch.bool,
                                                                                device=logits.device), p0, True, True)

    def take(self, idx: torch.Tensor) -> "Cands":
        """The entries at positions idx [m], in that order."""
        return Cands(self.ids[idx], self.logits[idx], self.present[idx], self.p0[idx], False, self.dense)

    def replace(self, logits: torch.Tensor | None = None, present: torch.Tensor | None = None) -> "Cands":
        return Cands(self.ids, self.logits if logits is None else logits,
                     self.present if present is None else present, self.p0, self.identity,
                     self.dense and present is None)

    def masked(self) -> torch.Tensor:
        """Logits with absent entries at -inf. [n]"""
        return self.logits if self.dense else self.logits.masked_fill(~self.present, NEG_INF)

    def sort_key(self) -> torch.Tensor:
        """Descending-sort key: the logit, a present -inf entry just above every absent one (it is still in
        llama.cpp's array). [n]"""
        if self.dense:
            return self.logits
        return torch.where(self.present, self.logits.clamp(min=-FLT_MAX), NEG_INF)

    def probs(self) -> torch.Tensor:
        """llama_sampler_softmax_impl: softmax over the present entries (absent: 0). [n]"""
        return torch.softmax(self.masked(), -1).nan_to_num(0.0)

    def alive(self) -> torch.Tensor:
        """Entries with nonzero probability: present with a finite logit. [n] bool"""
        finite = self.logits > NEG_INF
        return finite if self.dense else self.present & finite

    def size(self) -> torch.Tensor:
        """cur_p->size: the present entries, -inf ones included. 0-d"""
        return self.present.sum()


def _until_first(cond: torch.Tensor) -> torch.Tensor:
    """Positions up to and including the first True of cond [n]; every position when there is none. [n] bool"""
    before = torch.cumsum(cond.to(torch.int32), 0) - cond.to(torch.int32)        # Trues strictly before i
    return before == 0


def _entropy_nats(p: torch.Tensor) -> torch.Tensor:
    """-sum p ln p over p > 0 (0 ln 0 = 0). p: [n] -> 0-d"""
    return -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum()


def _greedy_mask(c: Cands) -> Cands:
    """llama_sampler_temp_impl with temp <= 0: every logit but the (first) largest becomes -inf; all stay in."""
    first = c.masked().argmax()
    keep = torch.arange(c.logits.shape[0], device=c.logits.device) == first
    return c.replace(logits=c.logits.masked_fill(~keep, NEG_INF))


# ------------------------------------------------------------------------------------------------ samplers
class Sampler:
    name = "sampler"
    reweights = False      # True: changes logits only, never removes a token (the funnel's flat stages)

    def reset(self, prompt_ids: list[int]) -> None:
        pass

    def accept(self, token: int) -> None:
        pass

    def apply(self, c: Cands) -> tuple[Cands, dict]:  # pragma: no cover - interface
        raise NotImplementedError


class LogitBias(Sampler):
    """llama_sampler_logit_bias_apply: logit[token] += bias for each (token, bias) pair (-inf bans a token; the
    pair's token stays in the array with zero probability). Added first in llama.cpp's chain, before `--samplers`.
    transformers' `SequenceBiasLogitsProcessor` also biases multi-token sequences and runs inside its fixed
    processor order; a single-token bias is the same."""

    name = "logit_bias"
    reweights = True

    def __init__(self, pairs, vocab_size: int, device):
        self.bias = torch.zeros(vocab_size, device=device)                          # [V]
        if pairs:
            ids = torch.tensor([t for t, _ in pairs], dtype=torch.long, device=device)
            self.bias.index_add_(0, ids, torch.tensor([b for _, b in pairs], device=device))

    def apply(self, c):
        return c.replace(logits=c.logits + (self.bias if c.identity else self.bias[c.ids])), {}


class Penalties(Sampler):
    """llama_sampler_penalties: c(v) = how often v occurs among the last `penalty_last_n` accepted tokens (the
    prompt included; -1 = all of them, 0 = off). For every v with c(v) > 0, in this order:
        logit = logit * repeat_penalty   if logit <= 0   else   logit / repeat_penalty
        logit -= c(v) * frequency_penalty + presence_penalty
    Off when repeat 1, frequency 0 and presence 0. transformers' `RepetitionPenaltyLogitsProcessor` (CTRL) divides
    or multiplies the same way but over every distinct token of the whole input (prompt and generation, no window),
    has no frequency or presence term, sends logit 0 to the divide branch (llama.cpp multiplies: the same value),
    and runs before its warpers at a fixed place."""

    name = "penalties"
    reweights = True

    def __init__(self, last_n: int, repeat: float, freq: float, present: float, vocab_size: int, device):
        self.last_n, self.repeat, self.freq, self.present_pen = last_n, repeat, freq, present
        self.off = last_n == 0 or (repeat == 1.0 and freq == 0.0 and present == 0.0)
        self.counts = torch.zeros(vocab_size, device=device)                          # [V] c(v)
        self.window: deque[int] = deque()

    def reset(self, prompt_ids):
        self.counts.zero_()
        self.window.clear()
        for t in prompt_ids:
            self.accept(t)

    def accept(self, token):
        if self.off:                                    # nothing would ever read the window
            return
        self.counts[token] += 1
        if self.last_n > 0 and len(self.window) >= self.last_n:
            self.counts[self.window.popleft()] -= 1
        self.window.append(int(token))

    def apply(self, c):
        if self.off:
            return c, {}
        cnt = self.counts if c.identity else self.counts[c.ids]                       # [n]
        l = c.logits
        pen = torch.where(l <= 0, l * self.repeat, l / self.repeat) - cnt * self.freq - self.present_pen
        return c.replace(logits=torch.where(cnt > 0, pen, l)), {"n_penalised": (cnt > 0).sum()}


class Dry(Sampler):
    """llama_sampler_dry_apply (DRY, ported by llama.cpp from koboldcpp PR 982). Over the last `dry_penalty_last_n`
    accepted tokens (prompt included; -1 = all, 0 = off), with N = their number (nothing when N <= allowed length):
      1. rep_limit = the tokens after the most recent sequence breaker (a head token whose tail tokens follow it);
         nothing when rep_limit < dry_allowed_length;
      2. reversed Z-algorithm: count[j] = min(rep_limit, length of the longest common suffix of the context and the
         context ending at position j);
      3. every j with count[j] >= allowed proposes the token after j with L = count[j]; each token keeps its largest L;
      4. logit(v) -= dry_multiplier * dry_base ^ (L(v) - dry_allowed_length), the exponent capped at
         88.7228391 / ln(dry_base); single-token breakers are never penalised.
    Breakers (strings): a vocabulary token whose text contains one is a single-token breaker; a token whose text
    ends in a proper prefix of one is a head, its tail the tokenised rest (at most 20 tokens). Off when the
    multiplier is 0. Not in transformers; text-generation-webui's DRY uses single-token breakers only and stops a
    match at a breaker."""

    name = "dry"
    reweights = True

    def __init__(self, multiplier: float, base: float, allowed: int, last_n: int, breakers: dict, vocab_size: int,
                 device):
        self.multiplier, self.base, self.allowed, self.last_n = multiplier, base, allowed, last_n
        self.breakers = breakers                       # head token -> list of tail tuples (() = single-token)
        self.off = multiplier == 0.0 or base < 1.0 or last_n == 0
        self.vocab_size, self.device = vocab_size, device
        self.history: deque[int] = deque(maxlen=None if last_n < 0 else max(last_n, 1))

    def reset(self, prompt_ids):
        self.history.clear()
        for t in prompt_ids:
            self.accept(t)

    def accept(self, token):
        if not self.off:
            self.history.append(int(token))

    def max_repeats(self) -> dict[int, int]:
        """Steps 1-3 on the host token history: token -> L (the longest repeat it would extend)."""
        last = list(self.history)
        n = len(last)
        if n <= self.allowed:
            return {}
        rat = last[::-1]                               # rat[i] = the i-th most recent token
        rep_limit = n
        for i in range(n):                             # step 1: the most recent breaker
            tails = self.breakers.get(rat[i])
            if tails is None:
                continue
            longest = -1
            for tail in tails:
                seq_len = len(tail)
                if longest < seq_len <= i and all(tail[o] == rat[i - o - 1] for o in range(seq_len)):
                    longest = seq_len
            if longest >= 0:
                rep_limit = i - longest
                break
        if rep_limit < self.allowed:
            return {}
        count = [0] * n                                # step 2: reversed Z-algorithm (llama.cpp's indices)
        lst = n - 1
        rt = lt = 0
        for k in range(1, n):
            if k > rt:
                m = 0
                while m + k < n and rat[m] == rat[m + k]:
                    m += 1
                count[lst - k] = min(m, rep_limit)
                if m > 0:
                    lt, rt = k, k + m - 1
            else:
                p = k - lt
                right_part_len = rt - k + 1
                if count[lst - p] < right_part_len:
                    count[lst - k] = min(count[lst - p], rep_limit)
                else:
                    i = rt + 1
                    while i < n and rat[i] == rat[i - k]:
                        i += 1
                    count[lst - k] = min(i - k, rep_limit)
                    lt, rt = k, i - 1
        best: dict[int, int] = {}                      # step 3
        for i in range(n - 1):
            L = count[i]
            if L >= self.allowed:
                tok = rat[n - 2 - i]
                if best.get(tok, -1) < L:
                    best[tok] = L
        return best

    def apply(self, c):
        if self.off:
            return c, {}
        best = self.max_repeats()
        max_exp = int(88.7228391 / math.log(self.base)) if self.base > 1.000001 else 0
        toks, pens = [], []
        for tok, L in best.items():
            if () in self.breakers.get(tok, ()):       # step 4: single-token breakers are never penalised
                continue
            e = L - self.allowed
            if max_exp > 0 and e > max_exp:
                e = max_exp
            toks.append(tok)
            pens.append(self.multiplier * self.base ** e)
        if not toks:
            return c, {"n_penalised": torch.zeros((), device=c.logits.device)}
        dense = torch.zeros(self.vocab_size, device=c.logits.device)                  # [V]
        dense[torch.tensor(toks, device=dense.device)] = torch.tensor(pens, device=dense.device)
        return (c.replace(logits=c.logits - (dense if c.identity else dense[c.ids])),
                {"n_penalised": torch.tensor(float(len(toks)), device=dense.device)})


def dry_breakers(texts: list[str], tokenizer, breakers: tuple[str, ...]) -> dict[int, list[tuple]]:
    """get_overlapping_token_sequences for each breaker string: head token id -> list of tail token tuples
    (() = the token contains the whole breaker). texts[id] is each token's text; tokenizer encodes a tail."""
    out: dict[int, list[tuple]] = {}
    for s in breakers:
        for tid, word in enumerate(texts):
            if s in word:
                out.setdefault(tid, [])
                if () not in out[tid]:
                    out[tid].append(())
                continue
            pos = word.find(s[0])
            while pos != -1:
                i = 1
                match = True
                while i < len(s) and i + pos < len(word):
                    if word[pos + i] != s[i]:
                        match = False
                        break
                    i += 1
                if match:
                    tail = tuple(_encode(tokenizer, s[i:]))[:MAX_BREAKER_TAIL]
                    if tail not in out.setdefault(tid, []):
                        out[tid].append(tail)
                pos = word.find(s[0], pos + 1)
    return out


def _encode(tokenizer, text: str) -> list[int]:
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:                                   # a tokenizer without the keyword (the test fake)
        return list(tokenizer.encode(text))


class TopNSigma(Sampler):
    """llama_sampler_top_n_sigma_apply (Tang et al., "Top-nσ", arXiv 2411.07641): over the finite logits, max,
    mean and population standard deviation σ; every logit < max - n·σ becomes -inf (the token stays in the array).
    n <= 0: off (llama.cpp's default -1; 0 was greedy before llama.cpp PR 13345). Not in transformers."""

    name = "top_n_sigma"

    def __init__(self, n: float):
        self.n = n

    def apply(self, c):
        if self.n <= 0:
            return c, {}
        valid = c.present & (c.logits > NEG_INF)                                     # [n]
        l = torch.where(valid, c.logits, torch.zeros_like(c.logits))
        count = valid.sum().clamp(min=1)
        mx = torch.where(valid, c.logits, NEG_INF).max()
        mean = l.sum() / count
        sigma = (torch.where(valid, (c.logits - mean) ** 2, torch.zeros_like(l)).sum() / count).sqrt()
        drop = c.present & (c.logits < mx - self.n * sigma)
        return c.replace(logits=c.logits.masked_fill(drop, NEG_INF)), {"sigma": sigma}


class TopK(Sampler):
    """llama_sampler_top_k_impl: keep the k largest logits (k = min(k, size)), sorted; k <= 0: off. llama.cpp's
    default is 40 (transformers' `generate` default 50, its TopKLogitsWarper keeps every token tied with the k-th;
    here, as llama.cpp, exactly k). The only stage that shrinks the list: later stages work on k entries."""

    name = "top_k"

    def __init__(self, k: int):
        self.k = k

    def apply(self, c):
        n = c.ids.shape[0]
        if self.k <= 0 or self.k >= n:
            return c, {}
        return c.take(torch.topk(c.sort_key(), self.k).indices), {}


class TopP(Sampler):
    """llama_sampler_top_p_apply (nucleus, Holtzman et al. 2020): softmax over the candidates, sorted by logit
    descending; keep the first i+1 where i is the first index with cumulative p >= top_p and i+1 >= min_keep
    (every candidate when none is). top_p >= 1: off; top_p = 0 keeps one token. Partial sort as llama.cpp: above
    1024 candidates the 256 most likely are tried first, the rest sorted only when they are not enough.
    transformers' TopPLogitsWarper sorts ascending and drops tokens whose cumulative mass is <= 1 - top_p over
    the whole warped row (after temperature: llama.cpp's default order cuts before temperature, at T = 1)."""

    name = "top_p"

    def __init__(self, p: float, min_keep: int):
        self.p, self.min_keep = p, min_keep

    def _keep(self, c: Cands, order: torch.Tensor) -> torch.Tensor:
        p = c.probs()[order]                                                         # [m] sorted descending
        cum = torch.cumsum(p, 0)
        pos = torch.arange(1, order.shape[0] + 1, device=p.device)
        return cum, (cum >= self.p) & (pos >= self.min_keep)

    def apply(self, c):
        if self.p >= 1.0:
            return c, {}
        n = c.ids.shape[0]
        key = c.sort_key()
        if n > 1024:                                    # host check, only when no top_k ran before (n = V)
            order = torch.topk(key, min(TOP_P_HEAD, n)).indices
            _, cond = self._keep(c, order)
            if bool(cond.any()):
                out = c.take(order)
                return out.replace(present=out.present & _until_first(cond)), {}
        order = torch.sort(key, descending=True, stable=True).indices
        _, cond = self._keep(c, order)
        out = c.take(order)
        return out.replace(present=out.present & _until_first(cond)), {}


class MinP(Sampler):
    """llama_sampler_min_p_apply (Nguyen et al. 2024): keep the candidates with logit >= max logit + ln(min_p),
    i.e. p >= min_p · p_max over the current candidates; when fewer than max(1, min_keep) pass, the max(1, min_keep)
    most likely. min_p <= 0: off. transformers' MinPLogitsWarper tests the same ratio on the warped row (after its
    temperature; llama.cpp's default order runs min_p before temperature, at T = 1)."""

    name = "min_p"

    def __init__(self, p: float, min_keep: int):
        self.p, self.min_keep = p, min_keep

    def apply(self, c):
        if self.p <= 0.0:
            return c, {}
        key = c.masked()
        min_logit = key.max() + torch.tensor(self.p, dtype=torch.float32).log().to(key.device)
        keep = c.present & (c.logits >= min_logit)
        top = torch.topk(c.sort_key(), min(max(1, self.min_keep), key.shape[0])).indices
        keep[top] = True
        return c.replace(present=c.present & keep), {}


class Typical(Sampler):
    """llama_sampler_typical_apply (Meister et al., "Locally Typical Sampling", arXiv 2202.00666): p and the
    entropy H (nats) over the current candidates; sort by |-ln p - H| ascending; keep the first i+1 where i is the
    first index whose cumulative p > typical_p (strictly) and i >= min_keep - 1. typical_p >= 1: off.
    transformers' TypicalLogitsWarper works on the whole warped row, keeps the tokens with cumulative mass < τ plus
    the boundary one (ties at the boundary score kept), and keeps at least one token. Where a candidate has p = 0
    (a -inf logit still in the array) llama.cpp's entropy would be NaN; here 0·ln 0 = 0."""

    name = "typ_p"

    def __init__(self, p: float, min_keep: int):
        self.p, self.min_keep = p, min_keep

    def apply(self, c):
        if self.p >= 1.0:
            return c, {}
        p = c.probs()                                                                # [n]
        h = _entropy_nats(p)
        score = torch.where(p > 0, (-p.log() - h).abs(), torch.full_like(p, float("inf")))
        order = torch.sort(score, stable=True).indices                               # ascending
        cum = torch.cumsum(p[order], 0)
        i = torch.arange(order.shape[0], device=p.device)
        cond = (cum > self.p) & (i >= self.min_keep - 1)
        out = c.take(order)
        return out.replace(present=out.present & _until_first(cond)), {"entropy_nats": h}


class Xtc(Sampler):
    """llama_sample_xtc_apply (exclude top choices, p-e-w): with probability xtc_probability (one uniform draw from
    the run's seeded generator), among the candidates with p >= xtc_threshold (p over the current candidates)
    remove all but the least probable, when at least two qualify and at least min_keep candidates remain. Off when
    xtc_probability <= 0 or xtc_threshold > 0.5. llama.cpp skips the draw when fewer than 2 candidates are left;
    here the draw is made whenever XTC is on (the same distribution, another random stream). Not in transformers."""

    name = "xtc"

    def __init__(self, probability: float, threshold: float, min_keep: int, generator: torch.Generator):
        self.probability, self.threshold, self.min_keep, self.generator = probability, threshold, min_keep, generator

    def apply(self, c):
        if self.probability <= 0.0 or self.threshold > 0.5:
            return c, {}
        u = torch.rand((), generator=self.generator, device=self.generator.device)
        size = c.size()
        p = c.probs()                                                                # [n]
        ge = c.present & (p >= self.threshold)
        pos_last = (ge.sum() - 1).clamp(min=0)
        least = torch.where(ge, p, torch.full_like(p, 2.0)).argmin()
        remove = ge & (torch.arange(p.shape[0], device=p.device) != least)
        fire = (u.to(p.device) <= self.probability) & (size >= 2) & (pos_last > 0) & (size - pos_last >= self.min_keep)
        return c.replace(present=c.present & ~(remove & fire)), {"xtc_fired": fire}


class Temperature(Sampler):
    """llama_sampler_temp_ext_apply (what `temperature` in `--samplers` builds). dynatemp_range δ > 0 (dynamic
    temperature, kalomaze): T_min = max(0, T - δ), T_max = T + δ, H (nats) over the current candidates,
    H_max = ln(size), T_dyn = T_min + (T_max - T_min)·(H / H_max)^dynatemp_exponent, then logits / T_dyn (a no-op with
    at most one candidate). δ = 0: logits / T. A temperature <= 0 (T, or T_dyn) keeps only the largest logit
    (llama_sampler_temp_impl): llama.cpp's greedy. transformers' TemperatureLogitsWarper divides the full row first
    and refuses T <= 0 (greedy is do_sample=False); it has no dynamic temperature."""

    name = "temperature"

    def __init__(self, temp: float, delta: float, exponent: float):
        self.temp, self.delta, self.exponent = temp, delta, exponent

    def apply(self, c):
        if self.delta <= 0:
            if self.temp <= 0:
                return _greedy_mask(c), {"t_dyn": c.logits.new_tensor(0.0)}
            return c.replace(logits=c.logits / self.temp), {}
        lo, hi = max(0.0, self.temp - self.delta), self.temp + self.delta
        size = c.size()
        h_max = size.clamp(min=2).float().log()
        h = _entropy_nats(c.probs())
        h_norm = h / h_max
        t_dyn = lo + (hi - lo) * h_norm.pow(self.exponent)
        scaled = torch.where(t_dyn > 0, c.logits / t_dyn.clamp(min=1e-30), _greedy_mask(c).logits)
        single = size <= 1
        return (c.replace(logits=torch.where(single, c.logits, scaled)),
                {"t_dyn": torch.where(single, c.logits.new_tensor(self.temp), t_dyn), "h_norm": h_norm})


def draw(c: Cands, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """llama_sampler_dist_apply: softmax over the candidates, one uniform draw from the run's generator, inverse CDF
    (float64). Returns (position [] long, ln p of that entry []), both on the device (no host copy here)."""
    p = c.probs()                                                                    # [n]
    cdf = p.double().cumsum(0)
    u = torch.rand(1, generator=generator, dtype=torch.float64, device=generator.device).to(cdf.device) * cdf[-1]
    pos = torch.searchsorted(cdf, u, right=True).clamp_max(cdf.shape[0] - 1)[0]
    return pos, p[pos].log()
