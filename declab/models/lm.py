"""The LM wrapper: one object per loaded model, holding weights and tokenizer only.

It is shared across browser sessions (`st.cache_resource`) and CLI runs, so nothing per-run lives on it: the
KV cache is passed in and returned. All forwards run under `torch.inference_mode()`; the model is never
mutated, so concurrent runs on one LM are safe.

Shapes: B = rows (beams, drafts, candidates), T = new positions in this call, V = logits width
(`vocab_size`, which can exceed len(tokenizer)), H = hidden size.
"""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import DynamicLayer

from declab.core.errors import UserError
from declab.core.tree import DraftTree, additive_mask
from declab.models.acceptance import load_acceptance_head
from declab.models.compiled import CompiledStep, bucket, release_static
from declab.models.heads import TrainedHead, load_trained
from declab.models.registry import ModelSpec


@dataclass
class StepOut:
    logits: torch.Tensor            # [B, V] float32 at the last position, or [B, T, V] with all_logits=True
                                    # (tree_step / tree_step_paths: [N, V], one row per tree node)
    cache: DynamicCache             # the cache after this call (same object, grown by T)
    hidden: torch.Tensor | None     # [B, T, H] last-layer states (after the final norm), when hidden=True
                                    # (tree_step: [N, H])
    fwd_ms: float                   # wall time of the forward, CUDA synchronised


class LM:
    """A causal LM with its tokenizer. Built by `declab.loading.load_lm`."""

    def __init__(self, model, tokenizer, spec: ModelSpec, device: str, dtype: torch.dtype, quantization: str):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.spec = spec
        self.key = spec.key
        self.device = torch.device(device)
        self.dtype = dtype
        self.quantization = quantization
        head = model.get_output_embeddings()
        self.vocab_size: int = int(getattr(head, "out_features", None) or model.config.vocab_size)  # logits width V
        self.eos_ids: frozenset[int] = frozenset(_eos_ids(model, tokenizer))
        self._token_text: dict[int, str] = {}
        self._trained: dict[str, TrainedHead] = {}
        self._trained_lock = threading.Lock()
        # models.yaml `kernels: compiled`: the per-token loop's one-position steps through torch.compile
        self.compiled: CompiledStep | None = CompiledStep(model) if spec.kernels == "compiled" else None

    # ----------------------------------------------------------------------------------------- timing
    def sync(self) -> None:
        """Wait for queued GPU work so that a clock read afterwards measures it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def clock_ms(self) -> float:
        self.sync()
        return time.perf_counter() * 1000.0

    # ---------------------------------------------------------------------------------------- forward
    def _forward(self, cache, input_ids=None, inputs_embeds=None, hidden=False, all_logits=False,
                 attention_mask=None, position_ids=None) -> StepOut:
        t0 = self.clock_ms()
        pad = {} if attention_mask is None else {"attention_mask": torch.as_tensor(attention_mask, device=self.device),
                                                 "position_ids": torch.as_tensor(position_ids, device=self.device)}
        with torch.inference_mode():
            out = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, past_key_values=cache, use_cache=True,
                             output_hidden_states=hidden, logits_to_keep=0 if all_logits else 1, **pad)
        if self.compiled is not None and isinstance(cache, StaticCache):
            release_static(cache)                                     # before the compiled steps read it
        logits = out.logits.float()                                   # [B, T or 1, V]
        logits = logits if all_logits else logits[:, -1, :]           # [B, T, V] | [B, V]
        h = out.hidden_states[-1] if hidden else None                 # [B, T, H], already final-normed
        return StepOut(logits=logits, cache=out.past_key_values, hidden=h, fwd_ms=self.clock_ms() - t0)

    def new_cache(self, max_len: int | None = None):
        """A fresh KV cache: dynamic, or with models.yaml `cache: static` and a known final length max_len (prompt +
        new tokens) a StaticCache of that length, preallocated once (what torch.compile / CUDA graphs need on a GPU;
        the per-token loop asks for it, strategies that crop, fork or reorder caches keep the dynamic one)."""
        if max_len is not None and self.compiled is not None:
            # one compiled graph per cache length: lengths are bucketed (declab/models/compiled.py)
            return StaticCache(config=self.model.config, max_cache_len=bucket(int(max_len)))
        if max_len is not None and self.spec.cache == "static" and getattr(self.model, "_can_compile_fullgraph", True):
            return StaticCache(config=self.model.config, max_cache_len=int(max_len))
        return DynamicCache(config=self.model.config)

    def as_ids(self, ids) -> torch.Tensor:
        """list[int] -> [1, T]; [T] -> [1, T]; [B, T] unchanged; always long on the model's device."""
        t = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        return t[None, :] if t.dim() == 1 else t

    def prefill(self, ids, hidden: bool = False, all_logits: bool = False, attention_mask=None,
                position_ids=None, max_len: int | None = None) -> StepOut:
        """Run the prompt through a fresh cache. ids: list[int] | [T] | [B, T]. Rows of different lengths (uscd):
        left-pad them and pass attention_mask [B, T] (0 = pad) with position_ids [B, T] (both or neither). max_len:
        the run's final length, for a static cache (see new_cache)."""
        return self._forward(self.new_cache(max_len), input_ids=self.as_ids(ids), hidden=hidden,
                             all_logits=all_logits, attention_mask=attention_mask, position_ids=position_ids)

    def step(self, ids, cache: DynamicCache, hidden: bool = False, all_logits: bool = False,
             inputs_embeds: torch.Tensor | None = None, attention_mask=None, position_ids=None) -> StepOut:
        """Append T positions to `cache`: ids [B, T] (or a list for B=1), or inputs_embeds [B, T, H].
        attention_mask [B, cache length + T] and position_ids [B, T]: for left-padded rows (see prefill)."""
        if (self.compiled is not None and isinstance(cache, StaticCache) and inputs_embeds is None and not hidden
                and not all_logits and attention_mask is None):
            x = self.as_ids(ids)                                      # [B, T]
            if x.shape == (1, 1):                                     # a decoding step of the per-token loop
                t0 = self.clock_ms()
                logits = self.compiled(x, cache).float()              # [1, V]
                return StepOut(logits=logits, cache=cache, hidden=None, fwd_ms=self.clock_ms() - t0)
        if inputs_embeds is not None:
            return self._forward(cache, inputs_embeds=inputs_embeds.to(self.dtype), hidden=hidden,
                                 all_logits=all_logits, attention_mask=attention_mask, position_ids=position_ids)
        return self._forward(cache, input_ids=self.as_ids(ids), hidden=hidden, all_logits=all_logits,
                             attention_mask=attention_mask, position_ids=position_ids)

    # ------------------------------------------------------------------------------------ trained heads
    def trained_head(self, kind: str) -> TrainedHead:
        """This model's trained drafting head `kind` (medusa, hydra, eagle; declab/models/heads.py), loaded once
        and shared (frozen weights, like the model's own). A UserError when the model has none."""
        with self._trained_lock:
            if kind not in self._trained:
                self._trained[kind] = load_trained(self, kind)
            return self._trained[kind]

    def acceptance_head(self, draft):
        """SpecDec++'s trained acceptance head of this target with `draft` (declab/models/acceptance.py), or None
        when the pair has none."""
        found = load_acceptance_head(self, draft)
        return found[0] if found else None

    # ------------------------------------------------------------------------------------ token trees
    def tree_inputs(self, tree: DraftTree, prefix_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The inputs of one tree forward after a cache of `prefix_len` positions: ids [1, N], a float additive
        attention mask [1, 1, N, P+N] (0 = may attend, the dtype's min elsewhere: every prefix column, and inside
        the tree block each node's ancestors and itself) and position_ids [1, N] = P + depth (never P + node id)."""
        dtype = self.embedding_matrix.dtype                           # the hidden states' (= queries') dtype
        n, p = len(tree), int(prefix_len)
        allowed = torch.cat([torch.ones(n, p, dtype=torch.bool), tree.ancestor_matrix()], dim=1)   # [N, P+N]
        ids = self.as_ids(tree.tokens)                                # [1, N]
        pos = (p + torch.as_tensor(tree.depth, dtype=torch.long, device=self.device))[None, :]   # [1, N]
        return ids, additive_mask(allowed, dtype, self.device), pos   # [1, N], [1, 1, N, P+N], [1, N]

    def check_tree_support(self, cache) -> None:
        """Refuse tree forwards the 4-D mask would not drive exactly: attention kernels other than eager / sdpa
        (flash-attention ignores a custom mask, flex wants a BlockMask), caches other than a one-row DynamicCache
        of plain full-attention layers (a StaticCache sizes the mask to max_cache_len and cannot be compacted by
        index; sliding-window and quantized layers rewrite their keys)."""
        impl = getattr(self.model.config, "_attn_implementation", None)
        if impl not in ("eager", "sdpa"):
            raise UserError(f"tree verification needs attn_implementation eager or sdpa; model '{self.key}' uses "
                            f"{impl!r}")
        if not isinstance(cache, DynamicCache) or any(type(layer) is not DynamicLayer for layer in cache.layers):
            kinds = sorted({type(layer).__name__ for layer in getattr(cache, "layers", [])})
            raise UserError(f"tree verification needs a DynamicCache of full-attention layers, got "
                            f"{type(cache).__name__} ({', '.join(kinds)}); models.yaml `cache: static` is for the "
                            f"plain per-token loop only")
        rows = {int(layer.keys.shape[0]) for layer in cache.layers if layer.is_initialized and layer.keys.numel()}
        if rows - {1}:
            raise UserError(f"tree verification works on a one-row cache, got {sorted(rows)} rows")

    def tree_step(self, tree: DraftTree, cache: DynamicCache, hidden: bool = False) -> StepOut:
        """One forward over all N tree nodes appended after `cache` (length P), each attending to the whole
        prefix and to its own ancestors only (A.2). Returns logits [N, V] float32 (row u predicts the token after
        node u), the same cache grown by N (node u at position P + u; compact it with keep_path), hidden [N, H]
        when asked, and fwd_ms."""
        self.check_tree_support(cache)
        ids, mask, pos = self.tree_inputs(tree, cache.get_seq_length())   # [1, N], [1, 1, N, P+N], [1, N]
        out = self._forward(cache, input_ids=ids, hidden=hidden, all_logits=True, attention_mask=mask,
                            position_ids=pos)
        out.logits = out.logits[0]                                    # [N, V]
        out.hidden = out.hidden[0] if hidden else None                # [N, H]
        return out

    def tree_step_paths(self, tree: DraftTree, cache: DynamicCache) -> StepOut:
        """The exact fallback of A.3, as a reference: one cache row per root-to-leaf path (on a deep copy of
        `cache`, which is left as it was), each row its path's tokens right-padded to the longest path (padding
        sits after the real tokens, so the plain causal mask never lets a real token see it), positions P, P+1, ...
        Returns the same logits [N, V] as tree_step (node u read from a leaf row through u, at column depth[u]),
        `cache` itself (unchanged), and fwd_ms of the batched forward."""
        self.check_tree_support(cache)
        leaves = tree.leaves()
        paths = [tree.path_to(leaf) for leaf in leaves]
        width = max(len(p) for p in paths)
        rows = [[tree.tokens[u] for u in p] + [tree.tokens[0]] * (width - len(p)) for p in paths]   # [L][D]
        work = self.fork(copy.deepcopy(cache), len(paths))            # L rows of the prefix
        out = self._forward(work, input_ids=self.as_ids(rows), all_logits=True)   # logits [L, D, V]
        where = {}                                                    # node -> (row, column)
        for row, p in enumerate(paths):
            for u in p:
                where.setdefault(u, (row, tree.depth[u]))
        r = torch.as_tensor([where[u][0] for u in range(len(tree))], device=out.logits.device)   # [N]
        c = torch.as_tensor([where[u][1] for u in range(len(tree))], device=out.logits.device)   # [N]
        return StepOut(logits=out.logits[r, c], cache=cache, hidden=None, fwd_ms=out.fwd_ms)  # logits [N, V]

    @property
    def embedding_matrix(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight               # [V_in, H]

    # ------------------------------------------------------------------------------------------ cache
    @staticmethod
    def fork(cache: DynamicCache, n: int) -> DynamicCache:
        """Repeat every row n times (row b becomes rows b*n .. b*n+n-1), in place."""
        cache.batch_repeat_interleave(n)
        return cache

    def select(self, cache: DynamicCache, rows) -> DynamicCache:
        """Keep / reorder rows (beam reorder), in place: new row i = old row rows[i]."""
        cache.reorder_cache(torch.as_tensor(rows, dtype=torch.long, device=self.device))
        return cache

    @staticmethod
    def crop(cache: DynamicCache, length: int) -> DynamicCache:
        """Drop positions past `length` (rejected draft tokens), in place. (transformers 5.x `Cache.crop` takes the
        number of tokens to remove as a negative int; a positive absolute length raises there.)"""
        remove = cache.get_seq_length() - length
        if remove > 0:
            cache.crop(-remove)
        return cache

    def keep_path(self, cache: DynamicCache, prefix_len: int, path) -> DynamicCache:
        """After a tree_step over a cache of prefix_len = P positions: keep [0 .. P-1] and P + i for each node i
        of `path` (root-to-node ids, increasing, root 0 included), in every layer, in place (A.5). A chain
        (path == [0 .. k]) is a crop. The cache ends at P + len(path)."""
        path = [int(i) for i in path]
        p = int(prefix_len)
        if not path or path[0] != 0 or any(b <= a for a, b in zip(path, path[1:])):
            raise ValueError(f"path must start at the root 0 and increase, got {path}")
        if p + path[-1] >= cache.get_seq_length():
            raise ValueError(f"path {path} runs past the cache ({cache.get_seq_length()} positions, prefix {p})")
        if path == list(range(len(path))):
            return self.crop(cache, p + len(path))
        self.check_tree_support(cache)
        keep = torch.cat([torch.arange(p), p + torch.as_tensor(path)]).to(self.device)   # [P + len(path)]
        for layer in cache.layers:
            if layer.is_initialized and layer.keys.numel():
                layer.keys = layer.keys.index_select(-2, keep.to(layer.keys.device))      # [B, heads, P+k, D]
                layer.values = layer.values.index_select(-2, keep.to(layer.values.device))  # [B, heads, P+k, D]
        return cache

    # -------------------------------------------------------------------------------------------- text
    def token_text(self, token_id: int) -> str:
        """The text of one token (raw model output: escape before rendering). Cached per id."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            self._token_text[token_id] = text
        return text

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def encode_prompt(self, text: str, prompt_format: str) -> list[int]:
        """raw: the text verbatim, no special tokens added. chat: one user turn in the chat template."""
        if prompt_format == "chat":
            if not getattr(self.tokenizer, "chat_template", None):
                raise UserError(f"model '{self.key}' has no chat template; use --prompt-format raw")
            ids = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                     tokenize=True, return_dict=False)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return [int(i) for i in ids]
        return [int(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (model.generation_config.eos_token_id, tokenizer.eos_token_id):
        if source is None:
            continue
        ids.update([source] if isinstance(source, int) else source)
    return ids
