"""Trained drafting heads of a target model (dossier section D; docs/strategies.md#spec_tree): where their weights
live, how they are stored and loaded, and the pieces they share.

A models.yaml entry names a heads folder (`heads: heads/smollm2-135m`, relative to declab/models/); one file per
kind, `<folder>/<kind>.safetensors` (package data), holding the trained weights (int8 matrices with a float16 scale
per row, or float16; `declab.models.draft.pack_tensors`) and, in the metadata key `declab_heads`, the recipe and the
numbers measured when it was built. The heads never hold the target's own weights (embedding, LM head, layers):
those are taken from the loaded target at run time, so one file serves every entry with the same weights (the
packed, stock and int8 variants of the embedded model).

Kinds: `medusa`, `hydra`, `eagle` (strategies/head_drafters.py), `kangaroo` (strategies/kangaroo.py), and
`acceptance-<draft key>` (SpecDec++'s acceptance head on that draft, strategies/speculative.py). Built by
tools/heads_build.py.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from declab.core.errors import UserError
from declab.models.draft import load_tensors, pack_tensors
from declab.models.packed import PackedLinear, pack_linears
from declab.models.split import KangarooAdapter

HERE = Path(__file__).resolve().parent
META_KEY = "declab_heads"
HEAD_KINDS = ("medusa", "hydra", "eagle", "kangaroo")     # spec_tree drafters that need a trained file


class ResBlock(torch.nn.Module):
    """x + SiLU(W x + b) (Medusa's ResBlock; Hydra and SpecDec++ use the same block). zero_init: W = 0 (Medusa: the
    block starts as the identity; b keeps its default init); SpecDec++ keeps W's default init."""

    def __init__(self, dim: int, zero_init: bool = True):
        super().__init__()
        self.linear = torch.nn.Linear(dim, dim)
        if zero_init:
            torch.nn.init.zeros_(self.linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:                          # [..., H] -> [..., H]
        return x + torch.nn.functional.silu(self.linear(x))


def heads_folder(spec) -> Path | None:
    """The heads folder a models.yaml entry names (absolute, or relative to declab/models/), or None."""
    name = getattr(spec, "heads", "") or ""
    if not name:
        return None
    p = Path(name).expanduser()
    return p if p.is_absolute() else HERE / p


def has_heads(spec, kind: str) -> bool:
    """Whether the models.yaml entry `spec` has a trained `kind` file (no model is loaded)."""
    folder = heads_folder(spec)
    return folder is not None and (folder / f"{kind}.safetensors").exists()


def trained_infos(spec) -> dict[str, dict]:
    """{kind: stored info} of the drafter heads the models.yaml entry `spec` has (HEAD_KINDS order)."""
    folder = heads_folder(spec)
    return {k: read_heads_info(folder / f"{k}.safetensors") for k in HEAD_KINDS if has_heads(spec, k)}


def heads_file(lm, kind: str) -> Path:
    """The weights file of head `kind` for the loaded model `lm`; a clear UserError when there is none."""
    folder = heads_folder(getattr(lm, "spec", None))
    if folder is None:
        raise UserError(f"model '{lm.key}' has no trained drafting heads (models.yaml field `heads`); drafter "
                        f"'{kind.split('-')[0]}' needs them: use smollm2-135m-instruct, or build heads for this model "
                        f"with python -m tools.heads_build")
    path = folder / f"{kind}.safetensors"
    if not path.exists():
        raise UserError(f"no trained '{kind}' head for model '{lm.key}' ({path} is missing): build it with "
                        f"python -m tools.heads_build build --only {kind.split('-')[0]}")
    return path


def save_heads(path: Path, tensors: dict[str, torch.Tensor], info: dict, weights: str = "int8") -> None:
    """Write trained tensors (see pack_tensors) with `info` (recipe, numbers) as JSON metadata."""
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(pack_tensors(tensors, weights), str(tmp),
              metadata={"format": "pt", META_KEY: json.dumps(dict(info, weights=weights))})
    tmp.chmod(0o644)                                   # package data: readable by whoever installs it
    tmp.rename(path)


def read_heads_info(path: Path) -> dict:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()[META_KEY])


def load_heads(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors in float32, integer tensors as int64; info)."""
    return load_tensors(path), read_heads_info(path)


def load_module(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str = "") -> torch.nn.Module:
    """Load `prefix`-named tensors into `module` (strict), cast to its dtype / device; eval mode, no grad."""
    ref = next(module.parameters())
    state = {k[len(prefix):]: v.to(device=ref.device, dtype=ref.dtype if v.is_floating_point() else v.dtype)
             for k, v in tensors.items() if k.startswith(prefix)}
    module.load_state_dict(state)
    module.requires_grad_(False)
    return module.eval()


# ------------------------------------------------------------------------------------------------ Medusa
class MedusaHeads(torch.nn.Module):
    """Medusa-1 heads in the legacy form (Cai et al., arXiv 2401.10774; FasterDecoding/Medusa medusa_model_legacy.py):
    head k (k = 1..K) is `layers` ResBlocks on the target's last state f_t, read by the target's frozen LM head; it
    predicts x_{t+k+1} (the base head predicts x_{t+1}). W starts at 0, so every head starts as the base head."""

    def __init__(self, hidden: int, num_heads: int = 4, layers: int = 1):
        super().__init__()
        # distinct modules per layer: `[ResBlock(H)] * n` would share one (the pitfall D.1 names)
        self.heads = torch.nn.ModuleList(
            torch.nn.Sequential(*[ResBlock(hidden) for _ in range(layers)]) for _ in range(num_heads))

    def forward(self, f: torch.Tensor) -> torch.Tensor:                           # [..., H] -> [K, ..., H]
        return torch.stack([head(f) for head in self.heads])


# ------------------------------------------------------------------------------------------------ Hydra
class HydraHead(torch.nn.Module):
    """One Hydra head (Ankner et al., arXiv 2402.05109; zankner/Hydra mlp_head.py): input
    concat(f_t, E(x_{t+1}), ..., E(x_{t+i})) of width H(i+1); the first block maps it to H with a learned linear
    residual, R x + SiLU(W x + b) (R starts as the projection onto f_t, W at 0: the head starts as the base head);
    `layers` - 1 more ResBlocks H -> H. Read by the target's frozen LM head (see HydraHeads)."""

    def __init__(self, hidden: int, index: int, layers: int = 1):
        super().__init__()
        width = hidden * (index + 1)
        self.residual = torch.nn.Linear(width, hidden, bias=False)
        self.linear = torch.nn.Linear(width, hidden)
        with torch.no_grad():
            self.residual.weight.zero_()
            self.residual.weight[:, :hidden].copy_(torch.eye(hidden))
            self.linear.weight.zero_()
        self.rest = torch.nn.Sequential(*[ResBlock(hidden) for _ in range(layers - 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:                           # [..., H(i+1)] -> [..., H]
        return self.rest(self.residual(x) + torch.nn.functional.silu(self.linear(x)))


class HydraHeads(torch.nn.Module):
    """K sequentially dependent heads: head i (1-based) reads f_t and the embeddings of the i tokens after t (the
    root and the i - 1 drafted before it) and predicts x_{t+i+1}. The paper gives each head its own LM head
    (initialised from the base one); here all share the target's frozen head (a 49k x 576 head per Hydra head
    would be 28M parameters each, over the 10 MB budget), as Medusa's legacy heads do."""

    def __init__(self, hidden: int, num_heads: int = 4, layers: int = 1):
        super().__init__()
        self.heads = torch.nn.ModuleList(HydraHead(hidden, i + 1, layers) for i in range(num_heads))

    def forward_head(self, i: int, f: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """Head i (1-based): f [..., H], embeds [..., i, H] (E(x_{t+1}) .. E(x_{t+i})) -> state [..., H]."""
        x = torch.cat([f, embeds.flatten(-2)], dim=-1)                             # [..., H(i+1)]
        return self.heads[i - 1](x)


# ------------------------------------------------------------------------------------------------ EAGLE
class EagleLayer(torch.nn.Module):
    """EAGLE-1's drafter (Li et al., arXiv 2401.15077; SafeAILab/EAGLE cnets1.py Model):
    f^_{j+1} = Layer(fc([E(x_{j+1}); f_j])), fc: 2H -> H with bias, Layer: one Llama decoder layer of the target's
    shape without its input RMSNorm, no final norm; logits = the target's frozen LM head(f^). E = the target's frozen
    embedding (taken from the target at run time, not stored). Its own one-layer KV cache (layer index 0)."""

    def __init__(self, config):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer
        hidden = config.hidden_size
        self.fc = torch.nn.Linear(2 * hidden, hidden)
        self.layer = LlamaDecoderLayer(config, layer_idx=0)
        self.layer.input_layernorm = torch.nn.Identity()

    def forward(self, embeds: torch.Tensor, feats: torch.Tensor, position_embeddings, attention_mask=None,
                cache=None) -> torch.Tensor:
        """embeds [B, T, H] = E(x_{j+1}), feats [B, T, H] = f_j (true or predicted) -> f^_{j+1} [B, T, H].
        attention_mask: additive [B, 1, T, P+T] (P = cached positions); cache: a DynamicCache or None."""
        x = self.fc(torch.cat([embeds, feats], dim=-1))                            # [B, T, H]
        return self.layer(x, attention_mask=attention_mask, past_key_values=cache, use_cache=cache is not None,
                          position_embeddings=position_embeddings)


def eagle_config(config):
    """The target's config with one layer: the EAGLE drafter's layer and its one-layer cache."""
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = 1
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = list(cfg.layer_types)[:1]
    return cfg


# ------------------------------------------------------------------------------------------------ at run time
class DraftVocabHead:
    """The target's frozen LM head restricted to the drafter vocabulary (None: the whole one): top-k token ids
    and probabilities under the softmax over that vocabulary. Packed like the target's head when it is."""

    def __init__(self, lm, vocab_ids: torch.Tensor | None):
        out = lm.model.get_output_embeddings()
        weight = out.weight.detach()                                               # [V, H]
        self.ids = vocab_ids.to(weight.device) if vocab_ids is not None else None  # [N] | None
        sub = weight if self.ids is None else weight[self.ids]                     # [N, H]
        self.linear = torch.nn.Linear(sub.shape[1], sub.shape[0], bias=False)
        self.linear.weight = torch.nn.Parameter(sub.clone(), requires_grad=False)
        if isinstance(out, PackedLinear):
            self.linear = PackedLinear(self.linear)

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def topk(self, states: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """states [B, H] -> (token ids [B, k], probabilities [B, k])."""
        probs = self.linear(states).float().softmax(-1)                            # [B, N]
        top = probs.topk(k, dim=-1)
        ids = top.indices if self.ids is None else self.ids[top.indices]           # [B, k]
        return ids, top.values


@dataclass
class TrainedHead:
    """A loaded drafting head of one model: the trained module (frozen, eval, on the model's device and dtype, its
    linears packed like the model's), the file's info (recipe, held-out numbers) and the drafting vocabulary head."""

    kind: str
    module: torch.nn.Module
    info: dict
    vocab: DraftVocabHead | None             # None for kangaroo (it drafts through the target's own head)


def build_module(kind: str, config, info: dict) -> torch.nn.Module:
    """The untrained module of a drafting head kind, shaped by the target's config and the file's info."""
    H = config.hidden_size
    if kind == "medusa":
        return MedusaHeads(H, int(info["num_heads"]), int(info.get("layers", 1)))
    if kind == "hydra":
        return HydraHeads(H, int(info["num_heads"]), int(info.get("layers", 1)))
    if kind == "eagle":
        return EagleLayer(eagle_config(config))
    if kind == "kangaroo":
        return KangarooAdapter(config, int(info["exit_layer"]))
    raise ValueError(f"unknown drafting head kind {kind!r}")


def prepare(lm, kind: str, module: torch.nn.Module, info: dict, vocab_ids: torch.Tensor | None) -> TrainedHead:
    """Put a head module on `lm`'s device / dtype, frozen, its linears packed as the model's are."""
    module = module.to(device=lm.device, dtype=lm.embedding_matrix.dtype).eval().requires_grad_(False)
    if isinstance(lm.model.get_output_embeddings(), PackedLinear):
        pack_linears(module)
    return TrainedHead(kind, module, dict(info), None if kind == "kangaroo" else DraftVocabHead(lm, vocab_ids))


def load_trained(lm, kind: str) -> TrainedHead:
    """The stored `kind` head (medusa, hydra, eagle, kangaroo) of the loaded model `lm` (UserError when it has
    none)."""
    tensors, info = load_heads(heads_file(lm, kind))
    module = load_module(build_module(kind, lm.model.config, info), tensors, "heads.")
    return prepare(lm, kind, module, info, tensors.get("draft_vocab_ids"))
