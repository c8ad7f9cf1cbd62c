"""Split forwards of a Llama-family target in the LM wrapper's terms: run only the layers [a, b) of
`lm.model.model.layers` on given input states, with ONE shared DynamicCache whose layers may hold different lengths.

Kangaroo (Liu et al., "Kangaroo: Lossless Self-Speculative Decoding via Double Early Exiting", arXiv 2404.18911;
docs/strategies.md#spec_tree, strategies/kangaroo.py) drafts with the target's own shallow layers [0, E) and verifies
with its deep layers [E, L) only: while drafting, the shallow layers' KV of the drafted tokens are written into the
target's cache (layers < E run ahead of layers >= E), and the verification forward runs the deep layers on the
stacked shallow states, which catches layers >= E up. A full forward is `deep(shallow(ids))` on the same cache.

Per call: positions continue from what the first layer of the range holds (`cache_length(cache, a)`), RoPE comes
from `model.model.rotary_emb(h, position_ids)`, the mask from `create_causal_mask(..., layer_idx=a)` (transformers
5.x sizes the mask from that layer's cache, which is what a cache with per-layer lengths needs). Every layer of a
range must hold the same length. Everything runs under `torch.inference_mode()`.

Symbols: E = exit layer (`exit_layer`), L = number of decoder layers, T = new positions, H = hidden size, V = logits
width. Layers may be `PackedLinear` (declab/models/packed.py) or int8 modules: they are just called.
"""

from __future__ import annotations

from copy import deepcopy

import torch
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRMSNorm, LlamaRotaryEmbedding


def num_layers(lm) -> int:
    """L: the target's decoder layers."""
    return len(lm.model.model.layers)


def cache_length(cache, layer_idx: int) -> int:
    """Positions held by layer `layer_idx` of `cache` (0 for a layer never written)."""
    if cache is None or layer_idx >= len(cache.layers):
        return 0
    return int(cache.layers[layer_idx].get_seq_length())


def cache_lengths(cache, n: int) -> list[int]:
    """[n] positions held by each of the first n layers."""
    return [cache_length(cache, i) for i in range(n)]


def crop_layers(cache, length: int, start: int = 0, stop: int | None = None) -> None:
    """Drop the positions past `length` in every layer of [start, stop) of `cache`, each by its own length (layers
    shorter than `length` are left as they are), in place. (transformers 5.x DynamicLayer.crop takes the number of
    positions to remove as a negative int.)"""
    stop = len(cache.layers) if stop is None else stop
    for layer in cache.layers[start:stop]:
        extra = int(layer.get_seq_length()) - int(length)
        if extra > 0:
            layer.crop(-extra)


def run_layers(lm, h: torch.Tensor, cache, start: int, stop: int) -> torch.Tensor:
    """Layers [start, stop) of the target on input states h [1, T, H] (the state entering layer `start`), appending
    T positions to those layers of `cache`. Returns the state entering layer `stop` [1, T, H] (not normed)."""
    model = lm.model.model
    lens = set(cache_lengths(cache, stop)[start:])
    if len(lens) > 1:
        raise ValueError(f"layers [{start}, {stop}) hold different cache lengths {sorted(lens)}")
    p = cache_length(cache, start)                                               # P: positions already cached
    pos = torch.arange(p, p + h.shape[1], device=h.device)[None, :]              # [1, T]
    with torch.inference_mode():
        pe = model.rotary_emb(h, pos)                                            # (cos, sin) [1, T, D]
        mask = create_causal_mask(config=model.config, inputs_embeds=h, attention_mask=None, past_key_values=cache,
                                  position_ids=pos, layer_idx=start)             # None | [1, 1, T, P+T]
        for layer in model.layers[start:stop]:
            h = layer(h, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                      position_embeddings=pe)                                    # [1, T, H]
    return h


def shallow(lm, ids, cache, exit_layer: int) -> torch.Tensor:
    """Embedding + layers [0, E) on token ids (list[int] | [T] | [1, T]), writing their KV into layers < E of
    `cache`. Returns h_E [1, T, H] (HF `hidden_states[E]`, the state entering layer E)."""
    with torch.inference_mode():
        h = lm.model.model.embed_tokens(lm.as_ids(ids))                          # [1, T, H]
    return run_layers(lm, h, cache, 0, exit_layer)


def deep(lm, h_e: torch.Tensor, cache, exit_layer: int, hidden: bool = False):
    """Layers [E, L) on h_E [1, T, H], writing their KV into layers >= E of `cache`, then the final norm and the LM
    head. Returns logits [T, V] float32 (row t predicts the token after position t), and with hidden=True the pair
    (logits [T, V], post-norm states [T, H])."""
    h = run_layers(lm, h_e, cache, exit_layer, num_layers(lm))                   # [1, T, H]
    with torch.inference_mode():
        f = lm.model.model.norm(h)                                               # [1, T, H]
        logits = lm.model.lm_head(f)[0].float()                                  # [T, V]
    return (logits, f[0]) if hidden else logits


def full(lm, ids, cache, exit_layer: int) -> torch.Tensor:
    """deep(shallow(ids)): a whole target forward through the split path. Returns logits [T, V] float32."""
    return deep(lm, shallow(lm, ids, cache, exit_layer), cache, exit_layer)


# ------------------------------------------------------------------------------------------------ Kangaroo adapter
class KangarooAdapter(torch.nn.Module):
    """Kangaroo's adapter A (arXiv 2404.18911 Sec. 3; reference Equationliu/Kangaroo kangaroo/adapter.py
    AdapterModel with one layer): h_E -> RMSNorm -> self-attention (+ residual, no MLP) -> final RMSNorm, the
    target's config (heads, head_dim, GQA, RoPE); its output goes through the target's frozen LM head (not held
    here). It has its own KV cache (one layer; pass a DynamicCache, or None for a training pass over whole causal
    sequences). `exit_layer` = E, the target layer whose input state h_E it reads.

    Lives in declab.models (not strategies/kangaroo.py) so that the training tool can build it too (tools may not
    import strategies; tests/test_layering.py). For the same reason it carries the target's split forward as
    methods (`shallow`, `deep_states`, `cache_lengths`, `crop`): the drafter, which may not import declab.models,
    reaches them through the loaded adapter (`lm.trained_head("kangaroo").module`)."""

    def __init__(self, config, exit_layer: int):
        super().__init__()
        cfg = deepcopy(config)
        cfg.num_hidden_layers = 1
        cfg._attn_implementation = "sdpa"                  # exact with a float/bool mask; fast on CPU and GPU
        self.config, self.exit_layer = cfg, int(exit_layer)
        self.input_layernorm = LlamaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, layer_idx=0)
        self.norm = LlamaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=cfg)  # buffers only (not saved)

    def forward(self, h_e: torch.Tensor, cache=None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """h_E [B, T, H] -> the post-norm state the LM head reads [B, T, H]. With `cache` the T positions are
        appended after what it holds; without, it is one causal pass (right padding is harmless: no real position
        attends to a later one)."""
        p = cache_length(cache, 0)
        if position_ids is None:
            position_ids = torch.arange(p, p + h_e.shape[1], device=h_e.device)[None, :]   # [1, T]
        pe = self.rotary_emb(h_e, position_ids)                                  # (cos, sin) [1, T, D]
        mask = create_causal_mask(config=self.config, inputs_embeds=h_e, attention_mask=None, past_key_values=cache,
                                  position_ids=position_ids)                     # None (causal) | [B, 1, T, P+T]
        a, _ = self.self_attn(self.input_layernorm(h_e), position_embeddings=pe, attention_mask=mask,
                              past_key_values=cache)                             # [B, T, H]
        return self.norm(h_e + a)                                                # [B, T, H]

    def init_from(self, target_model) -> "KangarooAdapter":
        """A warm start for training: the attention and its input norm copied from the target's layer E, the final
        norm from the target's final norm (so the frozen LM head sees states of the usual scale)."""
        layer = target_model.model.layers[self.exit_layer]
        with torch.no_grad():
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                mine, theirs = getattr(self.self_attn, name), getattr(layer.self_attn, name)
                mine.weight.copy_(theirs.weight)
                if mine.bias is not None and getattr(theirs, "bias", None) is not None:
                    mine.bias.copy_(theirs.bias)
            self.input_layernorm.weight.copy_(layer.input_layernorm.weight)
            self.norm.weight.copy_(target_model.model.norm.weight)
        return self

    # ---------------------------------------------------------------- the target's split forward, for the drafter
    def shallow(self, lm, ids, cache) -> torch.Tensor:
        """Embedding + target layers [0, E) on ids, their KV into `cache`. Returns h_E [1, T, H]."""
        return shallow(lm, ids, cache, self.exit_layer)

    def deep_states(self, lm, h_e: torch.Tensor, cache, head: bool = True):
        """Target layers [E, L) on h_E [1, T, H], their KV into `cache`, then the final norm. Returns the post-norm
        states f [T, H] (what the LM head reads), or with head=False nothing (a prefill: only the KV matter)."""
        h = run_layers(lm, h_e, cache, self.exit_layer, num_layers(lm))         # [1, T, H]
        if not head:
            return None
        with torch.inference_mode():
            return lm.model.model.norm(h)[0]                                     # [T, H]

    @staticmethod
    def cache_lengths(cache) -> list[int]:
        """[layers] positions held by each layer of `cache`."""
        return cache_lengths(cache, len(cache.layers))

    @staticmethod
    def crop(cache, length: int) -> None:
        """Every layer of `cache` cut to at most `length` positions (see crop_layers)."""
        crop_layers(cache, length)
