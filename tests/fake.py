"""A scripted fake LM with the same surface as `declab.lm.LM`, for fast exact tests and for app tests.

Its next-token logits are a pure function of the context: by default a fixed pseudo-random function of the last
two token ids (so runs are deterministic and diverse), or any `logits_fn(context_ids) -> [V]` a test scripts.
Its tokenizer is a longest-match over a small vocabulary that includes hostile strings (`<script>`, `=1+1`,
quotes, commas, newlines) so escaping and CSV export are exercised by every run.

models.yaml entries with `source: {fake: NAME}` load it (tests point `DECLAB_MODELS` at such a file): importing
this module registers the `fake` source kind with declab's loader (tests/conftest.py imports it; a subprocess gets
it through `DECLAB_PLUGINS=tests.fake`). `DECLAB_FAKE_DELAY` (seconds per forward) slows it for UI tests.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

import torch

from declab.models.loading import register_source
from declab.models.lm import StepOut
from declab.models.registry import ModelSpec

DEFAULT_VOCAB = ("</s>", " the", " cat", " sat", " on", " mat", " a", " dog", " ran", ".", ",", " and", "\n",
                 " <script>alert(1)</script>", " =1+1", ' "quoted"', " -x", " @me", " café", " 🙂", "\t", " is",
                 " big", " red", " blue", " it", " was", " very", "!", " x", " y", " z")


@dataclass
class FakeCache:
    ids: torch.Tensor                    # [B, L] every position seen so far
    mask: torch.Tensor | None = None     # [B, L] 0 = left padding (rows of different lengths), None = no padding

    def get_seq_length(self) -> int:
        return int(self.ids.shape[1])


def hashed_logits(vocab_size: int, scale: float = 3.0) -> Callable[[list[int]], torch.Tensor]:
    """Default script: logits depend on the last two ids through a fixed seeded table."""
    table = torch.randn(vocab_size + 1, vocab_size + 1, vocab_size, generator=torch.Generator().manual_seed(1234))

    def fn(context: list[int]) -> torch.Tensor:
        a = context[-2] if len(context) > 1 else vocab_size
        b = context[-1] if context else vocab_size
        return table[a, b] * scale
    return fn


def drafted_logits(vocab_size: int, noise: float = 1.0) -> Callable[[list[int]], torch.Tensor]:
    """A fake same-tokenizer "small model": the default script plus a fixed seeded perturbation, so it agrees with
    the default fake on most (not all) next tokens (two-model strategies: speculative, ead)."""
    base = hashed_logits(vocab_size)
    table = torch.randn(vocab_size + 1, vocab_size, generator=torch.Generator().manual_seed(4321))

    def fn(context: list[int]) -> torch.Tensor:
        b = context[-1] if context else vocab_size
        return base(context) + noise * table[b]
    return fn


def no_eos(fn: Callable[[list[int]], torch.Tensor], logit: float = float("-inf")
           ) -> Callable[[list[int]], torch.Tensor]:
    """The script fn with EOS (id 0) given this logit (default: impossible), so runs go to their token limit."""
    def f(context: list[int]) -> torch.Tensor:
        out = fn(context).clone()
        out[0] = logit
        return out
    return f


FAKE_SCRIPTS = {"default": hashed_logits, "draft": drafted_logits}    # models.yaml `source: {fake: NAME}`


class FakeTokenizer:
    chat_template = "<user>{text}<assistant>"

    def __init__(self, vocab: tuple[str, ...]):
        self.vocab = vocab
        self.by_length = sorted(range(len(vocab)), key=lambda i: -len(vocab[i]))
        self.eos_token_id = 0

    def encode(self, text: str) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            for t in self.by_length:
                s = self.vocab[t]
                if t != 0 and s and text.startswith(s, i):
                    ids.append(t)
                    i += len(s)
                    break
            else:
                i += 1                    # characters outside the vocabulary are dropped
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(self.vocab[i] for i in ids if not (skip_special_tokens and i == 0))


class FakeLM:
    """Drop-in for LM in tests: same methods, CPU, float32, exact."""

    def __init__(self, logits_fn: Callable[[list[int]], torch.Tensor] | None = None,
                 vocab: tuple[str, ...] = DEFAULT_VOCAB, key: str = "fake", spec: ModelSpec | None = None,
                 hidden_size: int = 16, delay_s: float = 0.0):
        self.vocab = vocab
        self.vocab_size = len(vocab)
        self.tokenizer = FakeTokenizer(vocab)
        self.key = key
        self.spec = spec or ModelSpec(key=key, source={"fake": "default"}, chat=False, context_length=512,
                                      description="scripted fake model")
        self.logits_fn = logits_fn or FAKE_SCRIPTS.get(self.spec.source.get("fake"), hashed_logits)(self.vocab_size)
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.quantization = "none"
        self.eos_ids = frozenset({0})
        self.delay_s = delay_s           # per forward, to let UI tests see streaming / stop
        self.embed = torch.randn(self.vocab_size, hidden_size, generator=torch.Generator().manual_seed(7))
        self.forwards = 0                # number of forward calls (tests count passes)
        # Input embedding table for the `inputs_embeds` path (superposed decoding): a fixed signed permutation
        # [V, V], so an embedding e = m·E is inverted exactly (m = e·Eᵀ) and a strategy that skipped the table would
        # feed the wrong mixture. `embed` above stays the hidden-state table (contrastive search).
        perm = torch.randperm(self.vocab_size, generator=torch.Generator().manual_seed(11))
        sign = torch.where(torch.rand(self.vocab_size, generator=torch.Generator().manual_seed(12)) < 0.5, -1.0, 1.0)
        self.input_embed = torch.zeros(self.vocab_size, self.vocab_size)
        self.input_embed[torch.arange(self.vocab_size), perm] = sign
        self.mixtures: list[torch.Tensor] = []   # every mixture m [V] fed through inputs_embeds (tests read them)

    # -- timing, same as LM
    def sync(self) -> None:
        pass

    def clock_ms(self) -> float:
        return time.perf_counter() * 1000.0

    def as_ids(self, ids) -> torch.Tensor:
        t = torch.as_tensor(ids, dtype=torch.long)
        return t[None, :] if t.dim() == 1 else t

    def new_cache(self) -> FakeCache:
        return FakeCache(torch.zeros(1, 0, dtype=torch.long))

    def _forward(self, cache: FakeCache, ids: torch.Tensor, hidden: bool, all_logits: bool,
                 attention_mask=None) -> StepOut:
        t0 = self.clock_ms()
        if attention_mask is not None:           # padded rows: the script sees only the unmasked context
            return self._forward_masked(cache, ids, hidden, all_logits, torch.as_tensor(attention_mask).bool(), t0)
        self.forwards += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        if cache.ids.shape[1] == 0 and cache.ids.shape[0] != ids.shape[0]:
            cache.ids = cache.ids.expand(ids.shape[0], 0)
        base = cache.ids                                                   # [B, L]
        cache.ids = torch.cat([base, ids], dim=1)                          # [B, L+T]
        B, T = ids.shape
        rows = [[self.logits_fn(cache.ids[b, : base.shape[1] + t + 1].tolist()).float() for t in range(T)]
                for b in range(B)]
        logits = torch.stack([torch.stack(r) for r in rows])               # [B, T, V]
        h = self.embed[ids] if hidden else None                            # [B, T, H]
        return StepOut(logits=logits if all_logits else logits[:, -1, :], cache=cache, hidden=h,
                       fwd_ms=self.clock_ms() - t0)

    def _forward_masked(self, cache: FakeCache, ids: torch.Tensor, hidden: bool, all_logits: bool,
                        mask: torch.Tensor, t0: float) -> StepOut:
        """Like _forward for left-padded rows: mask [B, L+T] covers the cache and the new ids (0 = padding)."""
        self.forwards += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        L = cache.ids.shape[1]
        base = cache.ids if L else cache.ids.expand(ids.shape[0], 0)
        cache.ids = torch.cat([base, ids], dim=1)                          # [B, L+T]
        cache.mask = mask
        B, T = ids.shape
        rows = [[self.logits_fn(cache.ids[b, : L + t + 1][mask[b, : L + t + 1]].tolist()).float() for t in range(T)]
                for b in range(B)]
        logits = torch.stack([torch.stack(r) for r in rows])               # [B, T, V]
        h = self.embed[ids] if hidden else None
        return StepOut(logits=logits if all_logits else logits[:, -1, :], cache=cache, hidden=h,
                       fwd_ms=self.clock_ms() - t0)

    def prefill(self, ids, hidden: bool = False, all_logits: bool = False, attention_mask=None,
                position_ids=None, max_len: int | None = None) -> StepOut:
        return self._forward(self.new_cache(), self.as_ids(ids), hidden, all_logits, attention_mask)

    def step(self, ids, cache: FakeCache, hidden: bool = False, all_logits: bool = False,
             inputs_embeds: torch.Tensor | None = None, attention_mask=None, position_ids=None) -> StepOut:
        if inputs_embeds is not None:
            return self._forward_embeds(cache, inputs_embeds, hidden, all_logits)
        return self._forward(cache, self.as_ids(ids), hidden, all_logits, attention_mask)

    def _forward_embeds(self, cache: FakeCache, embeds: torch.Tensor, hidden: bool, all_logits: bool) -> StepOut:
        """inputs_embeds [B, T, V] (rows of `embedding_matrix` mixed): recover the mixture m = e·Eᵀ; the logits at
        a mixed position are the m-weighted mixture of the logits each mixed token would have given, and the cache
        stores the mixture's heaviest token (lowest id on ties) as that position's id for later contexts. A one-hot
        m is exactly the input_ids path."""
        t0 = self.clock_ms()
        self.forwards += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        mix = embeds.float() @ self.input_embed.T                         # [B, T, V]
        mix = torch.where(mix.abs() < 1e-6, torch.zeros_like(mix), mix)
        B, T, _ = mix.shape
        if cache.ids.shape[1] == 0 and cache.ids.shape[0] != B:
            cache.ids = cache.ids.expand(B, 0)
        logits = torch.zeros(B, T, self.vocab_size)
        for t in range(T):
            new = mix[:, t].argmax(-1)                                    # [B] the position's stand-in id
            for b in range(B):
                m = mix[b, t]
                self.mixtures.append(m.clone())
                context = cache.ids[b].tolist()
                for j in torch.nonzero(m).flatten().tolist():
                    logits[b, t] += float(m[j]) * self.logits_fn(context + [j]).float()
            cache.ids = torch.cat([cache.ids, new[:, None]], dim=1)
        h = (mix @ self.embed) if hidden else None                        # [B, T, H]
        return StepOut(logits=logits if all_logits else logits[:, -1, :], cache=cache, hidden=h,
                       fwd_ms=self.clock_ms() - t0)

    # -- token trees, same semantics as LM.tree_step / tree_step_paths / keep_path
    def tree_step(self, tree, cache: FakeCache, hidden: bool = False) -> StepOut:
        """One "forward" over the N tree nodes after the cache: row u's logits = logits_fn(context + the tokens of
        path_to(u)); the cache grows by the N node ids (node u at position P + u). Logits [N, V], hidden [N, H]."""
        t0 = self.clock_ms()
        if cache.ids.shape[0] != 1:
            raise ValueError(f"tree_step works on a one-row cache, got {cache.ids.shape[0]} rows")
        self.forwards += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        context = self._context(cache)
        logits = torch.stack([self.logits_fn(context + [tree.tokens[v] for v in tree.path_to(u)]).float()
                              for u in range(len(tree))])                       # [N, V]
        ids = torch.as_tensor(tree.tokens, dtype=torch.long)[None, :]            # [1, N]
        self._append(cache, ids)
        h = self.embed[ids[0]] if hidden else None                               # [N, H]
        return StepOut(logits=logits, cache=cache, hidden=h, fwd_ms=self.clock_ms() - t0)

    def tree_step_paths(self, tree, cache: FakeCache) -> StepOut:
        """A.3 on a copy of the cache (left as it was): one row per root-to-leaf path, right-padded with the root
        token, through the plain forward; node u's row is read at column depth[u] of a leaf row through u."""
        if cache.ids.shape[0] != 1:
            raise ValueError(f"tree_step_paths works on a one-row cache, got {cache.ids.shape[0]} rows")
        paths = [tree.path_to(leaf) for leaf in tree.leaves()]
        width = max(len(p) for p in paths)
        rows = torch.as_tensor([[tree.tokens[u] for u in p] + [tree.tokens[0]] * (width - len(p)) for p in paths],
                               dtype=torch.long)                                 # [L, D]
        n = len(paths)
        work = FakeCache(cache.ids.repeat_interleave(n, dim=0))                   # [L, P]
        mask = None if cache.mask is None else torch.cat(
            [cache.mask.bool().repeat_interleave(n, dim=0), torch.ones_like(rows, dtype=torch.bool)], dim=1)  # [L, P+D]
        out = self._forward(work, rows, False, True, mask)                       # logits [L, D, V]
        where = {}
        for row, p in enumerate(paths):
            for u in p:
                where.setdefault(u, (row, tree.depth[u]))
        logits = torch.stack([out.logits[where[u][0], where[u][1]] for u in range(len(tree))])   # [N, V]
        return StepOut(logits=logits, cache=cache, hidden=None, fwd_ms=out.fwd_ms)

    def keep_path(self, cache: FakeCache, prefix_len: int, path) -> FakeCache:
        """Keep the prefix ids [0 .. P-1] and the ids at P + i for i in `path` (root-to-node, increasing)."""
        path = [int(i) for i in path]
        if not path or path[0] != 0 or any(b <= a for a, b in zip(path, path[1:])):
            raise ValueError(f"path must start at the root 0 and increase, got {path}")
        if prefix_len + path[-1] >= cache.get_seq_length():
            raise ValueError(f"path {path} runs past the cache ({cache.get_seq_length()} positions)")
        keep = torch.cat([torch.arange(prefix_len), prefix_len + torch.as_tensor(path)])   # [P + len(path)]
        cache.ids = cache.ids[:, keep]
        if cache.mask is not None:
            cache.mask = cache.mask[:, keep]
        return cache

    @staticmethod
    def _context(cache: FakeCache) -> list[int]:
        """Row 0's context ids (padding dropped)."""
        ids = cache.ids[0]
        return (ids[cache.mask[0].bool()] if cache.mask is not None else ids).tolist()

    @staticmethod
    def _append(cache: FakeCache, ids: torch.Tensor) -> None:
        cache.ids = torch.cat([cache.ids, ids], dim=1)                             # [1, L+N]
        if cache.mask is not None:
            cache.mask = torch.cat([cache.mask, torch.ones_like(ids, dtype=cache.mask.dtype)], dim=1)

    @property
    def embedding_matrix(self) -> torch.Tensor:
        """The input embedding table [V, V] of the inputs_embeds path (see `input_embed`)."""
        return self.input_embed

    @staticmethod
    def fork(cache: FakeCache, n: int) -> FakeCache:
        cache.ids = cache.ids.repeat_interleave(n, dim=0)
        return cache

    def select(self, cache: FakeCache, rows) -> FakeCache:
        cache.ids = cache.ids[torch.as_tensor(rows, dtype=torch.long)]
        return cache

    @staticmethod
    def crop(cache: FakeCache, length: int) -> FakeCache:
        cache.ids = cache.ids[:, :length]
        return cache

    def token_text(self, token_id: int) -> str:
        return self.vocab[token_id]

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def encode_prompt(self, text: str, prompt_format: str) -> list[int]:
        return self.tokenizer.encode(text)


def load_fake(spec: ModelSpec) -> FakeLM:
    """The loader of models.yaml entries with `source: {fake: NAME}`."""
    return FakeLM(key=spec.key, spec=spec, delay_s=float(os.environ.get("DECLAB_FAKE_DELAY", "0")))


register_source("fake", load_fake)
