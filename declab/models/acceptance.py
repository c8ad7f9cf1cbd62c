"""SpecDec++'s acceptance-prediction head (Huang et al., "SpecDec++: Boosting Speculative Decoding via Adaptive
Candidate Lengths", arXiv 2405.19715; code Kaffaljidhmah2/SpecDec_pp, specdec_pp/wrap_model.py): a small network on
the draft model's last-layer state that predicts whether the target will accept the token the draft just read.
Spec: docs/strategies.md#speculative (adaptive = specdec).

    AcceptanceHead(H, num_layers)   `resnet_num_layers` ResBlocks x + SiLU(W x + b) (W keeps its default init: not
                                    zero-initialised, unlike Medusa) + Linear(H, 2); class 1 = accept.
    p_accept(states [..., H])       -> [...] the predicted acceptance a^_i = softmax(logits)[1] of the token whose
                                    draft state this is (the state of position i, after the draft read Z_i = Y_i).

The reference builds its blocks as `[ResBlock(H)] * num_layers`, i.e. one block object repeated (shared weights);
here the `resnet_num_layers` blocks are independent (the paper's description). The head is trained per (target,
draft) pair on the target's own answers (tools/heads_acceptance.py) and stored beside the target's other heads as
kind `acceptance-<draft key>` (declab/models/heads.py); the weights file's metadata holds the recipe and the held-out
numbers. It is only meaningful for the draft it was trained on: `load_acceptance_head` returns None for any other
pair (model-free drafters, other drafts, the scripted fake models of the tests), and the strategy then falls back to
the draft's own confidence.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from declab.core.errors import UserError
from declab.models.heads import ResBlock, heads_file, load_heads, load_module

RESNET_NUM_LAYERS = 3           # SpecDec++ README / train.py `resnet_num_layers` used in the paper's runs
PREFIX = "acceptance."          # tensor names in the weights file: acceptance.blocks.<i>.linear.*, acceptance.out.*
_CACHE: dict[tuple[str, float, str], tuple["AcceptanceHead", dict]] = {}
_LOCK = threading.Lock()


def kind_for(draft_key: str) -> str:
    """The heads kind of the acceptance head on draft `draft_key` (declab/models/heads.py)."""
    return f"acceptance-{draft_key}"


class AcceptanceHead(torch.nn.Module):
    """resnet_num_layers x ResBlock(H) (not zero-initialised) -> Linear(H, 2). Input: the draft's post-norm last
    state; output logits [..., 2] (0 = reject, 1 = accept)."""

    def __init__(self, hidden_size: int, num_layers: int = RESNET_NUM_LAYERS):
        super().__init__()
        self.hidden_size, self.num_layers = int(hidden_size), int(num_layers)
        self.blocks = torch.nn.ModuleList(ResBlock(self.hidden_size, zero_init=False) for _ in range(self.num_layers))
        self.out = torch.nn.Linear(self.hidden_size, 2)

    def forward(self, states: torch.Tensor) -> torch.Tensor:                   # [..., H] -> [..., 2]
        x = states
        for block in self.blocks:
            x = block(x)                                                        # [..., H]
        return self.out(x)                                                      # [..., 2]

    @torch.inference_mode()
    def p_accept(self, states: torch.Tensor) -> torch.Tensor:                  # [..., H] -> [...]
        """a^ = P(accept) of the token whose draft state each row is (class 1 of the softmax), float32."""
        ref = self.out.weight
        logits = self(states.to(device=ref.device, dtype=ref.dtype))            # [..., 2]
        return logits.float().softmax(-1)[..., 1]                               # [...]


def head_tensors(head: AcceptanceHead) -> dict[str, torch.Tensor]:
    """The head's weights under the file's tensor names (what save_heads stores)."""
    return {PREFIX + k: v.detach().cpu() for k, v in head.state_dict().items()}


def build_head(tensors: dict[str, torch.Tensor], device=None) -> AcceptanceHead:
    """An AcceptanceHead (float32, eval, no grad) from stored tensors; H and the block count are read off them."""
    H = int(tensors[PREFIX + "out.weight"].shape[1])
    n = len({k.split(".")[2] for k in tensors if k.startswith(PREFIX + "blocks.")})
    head = AcceptanceHead(H, n).to(device=device or "cpu", dtype=torch.float32)
    return load_module(head, tensors, PREFIX)


def acceptance_path(target_lm, draft_lm) -> Path | None:
    """The acceptance head file of (target, draft), or None when the target has no heads folder or no such file."""
    try:
        return heads_file(target_lm, kind_for(getattr(draft_lm, "key", "")))
    except UserError:
        return None


def load_acceptance_head(target_lm, draft_lm) -> tuple[AcceptanceHead, dict] | None:
    """(head on the draft's device, info from the file's metadata), or None when no head was trained for this
    (target, draft) pair. Loaded once per file (keyed by path and mtime; the head is read-only, safe to share).
    A file whose hidden size differs from the draft's raises a UserError."""
    path = acceptance_path(target_lm, draft_lm)
    if path is None:
        return None
    device = getattr(draft_lm, "device", None) or torch.device("cpu")
    key = (str(path), path.stat().st_mtime, str(device))
    with _LOCK:
        if key not in _CACHE:
            tensors, info = load_heads(path)
            head = build_head(tensors, device)
            H = _hidden_size(draft_lm)
            if H is not None and H != head.hidden_size:
                raise UserError(f"acceptance head {path.name} reads states of size {head.hidden_size}, but draft "
                                f"'{draft_lm.key}' has hidden size {H}: rebuild it with python -m "
                                f"tools.heads_acceptance")
            _CACHE[key] = (head, info)
        return _CACHE[key]


def _hidden_size(lm) -> int | None:
    config = getattr(getattr(lm, "model", None), "config", None)
    return getattr(config, "hidden_size", None)
