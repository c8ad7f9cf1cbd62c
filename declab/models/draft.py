"""The embedded draft at run time: turn a loaded target into its draft (models.yaml source
`{draft: WEIGHTS, base: KEY}`): the target's first E layers, the stored adapter layers and final norm, and the
FR-Spec sub-vocabulary head. The training pipeline that makes the weights is tools/draft_build.py.

Weights files: a relative `draft:` path in models.yaml is read from this package's folder (declab/models/), where
the embedded draft's weights ship (package data).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_WEIGHTS = HERE / "drafts" / "smollm2-135m-draft.safetensors"


class SubVocabHead(torch.nn.Module):
    """The draft's LM head restricted to `vocab_ids` (FR-Spec): logits for those rows of the target's (tied) head,
    scattered into a full-width row of -inf, so the draft's distribution is over the target's vocabulary with
    probability 0 outside its own (speculative sampling stays exact: those tokens are never drafted)."""

    def __init__(self, weight: torch.Tensor, vocab_ids: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape                        # V, H
        self.register_buffer("vocab_ids", vocab_ids.to(device=weight.device, dtype=torch.long))   # [N]
        self.weight = torch.nn.Parameter(weight.detach()[self.vocab_ids].clone(), requires_grad=False)   # [N, H]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:                       # [..., H] -> [..., V]
        sub = torch.nn.functional.linear(hidden, self.weight)                      # [..., N]
        out = sub.new_full((*sub.shape[:-1], self.out_features), float("-inf"))    # [..., V]
        return out.index_copy_(out.dim() - 1, self.vocab_ids, sub)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The stored tensors in float32 (int8 matrices multiplied back by their row scales)."""
    from safetensors.torch import load_file
    raw = load_file(str(path))
    out = {}
    for k, v in raw.items():
        if k.endswith(".int8"):
            base = k[: -len(".int8")]
            out[base] = v.float() * raw[base + ".scale"].float()
        elif not v.is_floating_point():                # lm_head.vocab_ids and other index tensors
            out[k] = v.long()
        elif not k.endswith(".scale"):
            out[k] = v.float()
    return out


def pack_tensors(tensors: dict[str, torch.Tensor], weights: str = "float16") -> dict[str, torch.Tensor]:
    """What `load_tensors` reads back: weights 'float16', or 'int8' (2-D matrices as int8 with one float16 scale per
    output row, symmetric, weight-only; everything else float16). Integer tensors are kept as int32."""
    out = {}
    for key, t in tensors.items():
        t = t.detach().cpu()
        if not t.is_floating_point():
            out[key] = t.to(torch.int32).contiguous()
            continue
        t = t.float()
        if weights == "int8" and t.dim() == 2:
            scale = (t.abs().amax(dim=1, keepdim=True) / 127.0).clamp_min(1e-12)                 # [rows, 1]
            out[key + ".int8"] = torch.round(t / scale).clamp(-127, 127).to(torch.int8).contiguous()
            out[key + ".scale"] = scale.to(torch.float16).contiguous()
        else:
            out[key] = t.to(torch.float16).contiguous()
    return out


def read_draft_info(path: Path) -> dict:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["declab_draft"])


def build_draft_model(base_model, weights: Path):
    """Turn a loaded target model into the draft, in place: keep its first E layers, append the stored adapter
    layers, load the trained final norm; the embedding and (tied) LM head stay the target's. Returns (model, info)."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    info = read_draft_info(weights)
    E, A = int(info["frozen"]), int(info["adapter_layers"])
    state = load_tensors(weights)
    cfg = base_model.config
    layers = list(base_model.model.layers[:E])
    cfg.num_hidden_layers = E + A
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = list(cfg.layer_types)[:E + A]
    dtype = base_model.model.embed_tokens.weight.dtype
    device = base_model.model.embed_tokens.weight.device
    for i in range(E, E + A):
        layer = LlamaDecoderLayer(cfg, layer_idx=i)
        prefix = f"model.layers.{i}."
        layer.load_state_dict({k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)})
        layers.append(layer.to(device=device, dtype=dtype))
    base_model.model.layers = torch.nn.ModuleList(layers)
    base_model.model.norm.weight.data.copy_(state["model.norm.weight"].to(dtype))
    if "lm_head.vocab_ids" in state:                   # FR-Spec head over the draft's vocabulary
        base_model.lm_head = SubVocabHead(base_model.lm_head.weight, state["lm_head.vocab_ids"])
    return base_model.eval(), info


def weights_path(source: dict) -> Path:
    p = Path(source["draft"]).expanduser()
    return p if p.is_absolute() else HERE / p
