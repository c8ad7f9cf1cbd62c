"""The exact fast CPU path: every float32 linear layer through oneDNN with its weight reordered once.

On a CPU, decoding a small model is bound by how fast the weights stream from memory. transformers' `nn.Linear`
calls MKL's GEMV for one new position and a GEMM that re-packs the whole weight matrix on every call for 2-16
positions (a speculative verification). oneDNN's linear with the weight kept in its own blocked layout
(`torch.ops.mkldnn._reorder_linear_weight` once at load, then `_linear_pointwise`: what torch.compile's CPU
"freezing" pass emits, without compiling anything) streams them faster and needs no re-packing. On this lab's
2-core reference machine (bench/fast_path.py, the embedded model): a 1-position forward takes 0.90x the stock
time, 2-16 positions 0.56-0.65x, and a 4-position forward costs 1.28 of a 1-position one (stock: 1.78), which is
what makes speculative verification pay on a CPU.

It is exact float32 arithmetic: the same products, summed in another order, so logits differ from transformers'
kernels by float rounding (about 1e-6 relative) and an argmax can differ only where two logits tie to that
precision; `make bench` counts how often greedy output equals `generate`'s (stock kernels). A packed linear's rows
do not depend on how many positions go through it together (tests/test_packed.py); a whole multi-position forward
(a speculative verification) still differs from token-by-token forwards by the attention's float rounding.

models.yaml `kernels`: auto (this path on CPU in float32 where PyTorch has oneDNN, else transformers' own),
onednn (this path; an error where it cannot run), transformers (stock kernels, bit-identical to `generate`).
"""

from __future__ import annotations

import torch

from declab.core.errors import UserError

def available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(torch.nn.Linear):
    """y = x W^T + b with W [out, in] also held in oneDNN's blocked layout. Still an `nn.Linear` (its `weight` and
    `bias` are the original parameters, shared with tied embeddings), so code that reads them is unchanged."""

    def __init__(self, linear: torch.nn.Linear):
        torch.nn.Module.__init__(self)                                                 # no fresh weights
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias                            # [out, in], [out] | None
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)   # oneDNN's layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:                               # [..., in] -> [..., out]
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, onednn packed"


def replace_linears(model: torch.nn.Module, make, want=lambda linear: True) -> int:
    """Replace every plain `nn.Linear` of `model` (the LM head included) for which `want(linear)` by `make(linear)`,
    in place. Returns how many were replaced."""
    targets = [(name, mod) for name, mod in model.named_modules() if type(mod) is torch.nn.Linear and want(mod)]
    for name, mod in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, make(mod))
    return len(targets)


def pack_linears(model: torch.nn.Module) -> int:
    """Replace every float32 CPU `nn.Linear` of `model` (the LM head included) by a PackedLinear, in place.
    Returns how many were replaced."""
    return replace_linears(model, PackedLinear,
                           lambda m: m.weight.dtype == torch.float32 and m.weight.device.type == "cpu")


def use_packed(kernels: str, device: str, dtype: torch.dtype, quantization: str) -> bool:
    """Whether a model with these settings takes the oneDNN path (see the module docstring)."""
    if kernels == "transformers":                  # (compiled packs too: its graph calls these linears)
        return False
    fits = device == "cpu" and dtype == torch.float32 and quantization in ("none", "int8") and available()
    if kernels == "onednn" and not fits:
        raise UserError(f"kernels: onednn needs float32 on a CPU with PyTorch's oneDNN (got {device}, "
                        f"{str(dtype).replace('torch.', '')}, quantization {quantization}); use kernels: auto")
    return fits
