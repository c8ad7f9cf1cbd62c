"""The LM wrapper: one object per loaded model, holding weights and tokenizer only.

It is shared across browser sessions (`st.cache_resource`) and CLI runs, so nothing per-run lives on it: the
KV cache is passed in and returned. All forwards run under `torch.inference_mode()`; the model is never
mutated, so concurrent runs on one LM are safe.

Shapes: B = rows (beams, drafts, candidates), T = new positions in this call, V = logits width
(`vocab_size`, which can exceed len(tokenizer)), H = hidden size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from declab.core.errors import UserError
from declab.models.registry import ModelSpec


@dataclass
class StepOut:
    logits: torch.Tensor            # [B, V] float32 at the last position, or [B, T, V] with all_logits=True
    cache: DynamicCache             # the cache after this call (same object, grown by T)
    hidden: torch.Tensor | None     # [B, T, H] last-layer states (after the final norm), when hidden=True
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
        logits = out.logits.float()                                   # [B, T or 1, V]
        logits = logits if all_logits else logits[:, -1, :]           # [B, T, V] | [B, V]
        h = out.hidden_states[-1] if hidden else None                 # [B, T, H], already final-normed
        return StepOut(logits=logits, cache=out.past_key_values, hidden=h, fwd_ms=self.clock_ms() - t0)

    def new_cache(self, max_len: int | None = None):
        """A fresh KV cache: dynamic, or with models.yaml `cache: static` and a known final length max_len (prompt +
        new tokens) a StaticCache of that length, preallocated once (what torch.compile / CUDA graphs need on a GPU;
        the per-token loop asks for it, strategies that crop, fork or reorder caches keep the dynamic one)."""
        if max_len is not None and self.spec.cache == "static" and getattr(self.model, "_can_compile_fullgraph", True):
            from transformers import StaticCache
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
        if inputs_embeds is not None:
            return self._forward(cache, inputs_embeds=inputs_embeds.to(self.dtype), hidden=hidden,
                                 all_logits=all_logits, attention_mask=attention_mask, position_ids=position_ids)
        return self._forward(cache, input_ids=self.as_ids(ids), hidden=hidden, all_logits=all_logits,
                             attention_mask=attention_mask, position_ids=position_ids)

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
