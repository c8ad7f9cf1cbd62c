"""The compiled decoding step (models.yaml `kernels: compiled`, issue 21 item 3): the one-position forward of the
per-token loop through torch.compile (Inductor, with weight freezing) on a preallocated StaticCache.

Why each piece is there, measured on this lab's 2-core reference machine (the embedded model, float32, 2 threads):
- Eager transformers spends about half a decoding step outside its matrix-vector products: some 400 small
  PyTorch calls per token, each with Python and dispatcher overhead. Inductor fuses the norms, rotary embedding,
  residual adds and the MLP's activation into a few C++ kernels, and runs the graph from one call.
- The linears stay the oneDNN-packed ones of declab/models/packed.py (on a CPU in float32), and *freezing*
  (`torch._inductor.config.freezing`) treats weights as constants, so the graph calls oneDNN's linear on the packed
  weights directly. (Without freezing Inductor cannot lower the packed op; compiling stock linears with freezing
  gives MKL's GEMV, about 10% slower here; without either, a profile shows a tensor copy per linear each step.)
- A StaticCache gives every step the same shapes, so one graph serves the whole run. Its length is rounded up to a
  bucket (`bucket`: powers of two from 128), so runs of different lengths share a graph; each bucket compiles once.
- transformers marks a StaticCache's tensors (keys, values and its `cumulative_length` counter) as static graph
  inputs; with freezing, Inductor would then bake the counter's value at compile time into the graph and every
  later step would write and read the wrong cache slot (tokens go wrong from the third one). `release_static`
  takes that mark off after the eager prefill, so they stay ordinary inputs that the graph mutates in place.

It is exact float32 arithmetic in another summation order (like the oneDNN path, declab/models/packed.py); `make
bench` counts how often greedy output equals transformers' `generate` token for token. Only the per-token loop's
one-position steps (B = 1, T = 1, logits only) take the compiled graph; prefill, speculative verification, trees
and every strategy that crops, forks or reorders caches stay on the eager forward of the same weights (their
caches are dynamic).

With models.yaml `quantization: int8` (the CPU fast path, not token-exact) every linear, the LM head included, is
an `Int8Linear`: fbgemm's int8-weight kernel, which quantizes each call's activations itself. PyTorch's dynamic
int8 modules (what `kernels: auto` int8 uses) hold their weights in a TorchScript object that Dynamo cannot trace;
these take plain tensors, behind one opaque op (`declab::int8_linear`) that the graph calls, so the step's
norms, rotary embedding, attention and residuals compile around them. Measured on the reference machine (the
embedded model, 2 threads, a one-position step): these linears 28 us for a 576 x 576 matrix against 45-57 us for
the dynamic module, and the compiled step about 20-21 ms against 34-36 ms for the same modules run eagerly.

Compilation is a one-time cost per bucket and process, paid at load for the first bucket (`warm`): about a minute
on the reference machine (`make bench` prints it). Inductor's on-disk cache lives under <declab cache>/inductor
unless $TORCHINDUCTOR_CACHE_DIR names another folder.
"""

from __future__ import annotations

import os
import threading
import time
import warnings

import torch
import torch._inductor.config as inductor_config

from declab.core.errors import UserError, first_line
from declab.core.paths import cache_root
from declab.models.packed import replace_linears

MIN_BUCKET = 128                         # the smallest StaticCache length (positions)

# Inductor keeps its compiled kernels under the declab cache unless the user chose a folder. Set at import: Inductor
# writes its own default (a /tmp folder) into the environment the first time it looks.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))


# fbgemm's int8-weight linear: the weight quantized once (per tensor), each call's activations quantized inside the
# kernel; plain-tensor arguments, but a C++ body that Dynamo cannot trace, so the graph calls it through this op.
# torch marks these fbgemm entry points deprecated (a warning per process); they are in the pinned torch.
_INT8: list["Int8Linear"] = []          # the linears behind declab::int8_linear, by handle
_LIB = torch.library.Library("declab", "DEF")
_LIB.define("int8_linear(Tensor x, int handle) -> Tensor")
warnings.filterwarnings("ignore", message=r"fbgemm_(linear_quantize_weight|pack_quantized_matrix|linear_int8_weight_fp32_"
                                          r"activation) is deprecated")


def _int8_linear(x: torch.Tensor, handle: int) -> torch.Tensor:             # [..., in] -> [..., out]
    m = _INT8[handle]
    return torch.fbgemm_linear_int8_weight_fp32_activation(x.contiguous(), m.weight_int8, m.packed, m.col_offsets,
                                                           m.scale, m.zero_point, m.bias)


_LIB.impl("int8_linear", _int8_linear, "CPU")


@torch.library.register_fake("declab::int8_linear", lib=_LIB)
def _int8_linear_shape(x: torch.Tensor, handle: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], _INT8[handle].out_features)


class Int8Linear(torch.nn.Module):
    """y = x W^T + b with W held as int8 (one scale and zero point for the matrix, fbgemm's layout) and x quantized
    to 8 bits per call inside the kernel; the same op in eager mode and in the compiled graph."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight            # the float matrix, still read by drafting heads (tied: the embedding)
        w = linear.weight.detach().float().contiguous()                               # [out, in]
        self.weight_int8, self.col_offsets, self.scale, self.zero_point = torch.fbgemm_linear_quantize_weight(w)
        self.packed = torch.fbgemm_pack_quantized_matrix(self.weight_int8)           # fbgemm's handle
        self.bias = (linear.bias.detach().float() if linear.bias is not None
                     else torch.zeros(self.out_features))                             # [out]
        self.handle = len(_INT8)
        _INT8.append(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:                               # [..., in] -> [..., out]
        return torch.ops.declab.int8_linear(x, self.handle)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 (fbgemm)"


def int8_linears(model: torch.nn.Module) -> int:
    """Replace every float `nn.Linear` of `model` (the LM head included) by an Int8Linear, in place. Returns how
    many."""
    return replace_linears(model, Int8Linear)


def bucket(length: int) -> int:
    """The StaticCache length for a run of `length` positions (prompt + new tokens): the next power of two, at
    least MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << max(0, int(length) - 1).bit_length())


def release_static(cache) -> None:
    """Take transformers' static-address mark off a StaticCache's tensors (see the module docstring): with weight
    freezing, marked tensors would be frozen into the graph as constants."""
    for layer in getattr(cache, "layers", ()):
        for name in ("keys", "values", "cumulative_length"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor) and hasattr(t, "_dynamo_static_input_type"):
                del t._dynamo_static_input_type


class CompiledStep:
    """One model's compiled one-position forward: `__call__(ids [1, 1], cache) -> logits [1, V]` (float32 of the
    model's dtype, last position). Thread-safe: calls are serialised (one forward at a time; Dynamo's compiler is
    not re-entrant). `compile_s` maps each compiled bucket to its one-time compile seconds."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self._fn = None
        self._lock = threading.Lock()
        self.compile_s: dict[int, float] = {}

    def _compiled(self):
        if self._fn is None:
            self._fn = torch.compile(self.model.forward, dynamic=False, fullgraph=True)
        return self._fn

    def __call__(self, ids: torch.Tensor, cache) -> torch.Tensor:            # [1, 1] -> [1, V]
        size = int(cache.get_max_length())
        with self._lock, torch.inference_mode(), inductor_config.patch(freezing=True):
            t0 = time.perf_counter()
            if size in self.compile_s:
                # a compiled bucket: Dynamo tells its graphs apart by the guards that differ between them (the cache
                # length) and skips re-checking the rest each step (about 1-2 ms of a step on the reference machine)
                with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                    out = self._compiled()(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            else:
                out = self._compiled()(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                self.compile_s[size] = round(time.perf_counter() - t0, 1)
        return out.logits[:, -1, :]                                          # [1, V]

    def warm(self, new_cache, prompt_ids: torch.Tensor, max_len: int) -> float:
        """Compile the bucket of `max_len` now (at load, so no run's first step carries it): a prefill of
        `prompt_ids` [1, T] and two steps on a throwaway cache. Returns the seconds it took."""
        t0 = time.perf_counter()
        cache = new_cache(max_len)
        with torch.inference_mode():
            self.model(input_ids=prompt_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        release_static(cache)
        try:
            for _ in range(2):
                self(prompt_ids[:, -1:], cache)
        except Exception as e:     # no C++ compiler, an unsupported model...: one line, and the eager entries still work
            first = first_line(e)
            raise UserError(f"kernels: compiled could not compile this model's decoding step ({type(e).__name__}: "
                            f"{first}); Inductor needs a C++ compiler on a CPU. Use kernels: auto") from None
        return round(time.perf_counter() - t0, 1)
