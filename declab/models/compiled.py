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

Compilation is a one-time cost per bucket and process, paid at load for the first bucket (`warm`): about a minute
on the reference machine (`make bench` prints it). Inductor's on-disk cache lives under <declab cache>/inductor
unless $TORCHINDUCTOR_CACHE_DIR names another folder.
"""

from __future__ import annotations

import os
import threading
import time

import torch
import torch._inductor.config as inductor_config

from declab.core.errors import UserError, first_line
from declab.core.paths import cache_root

MIN_BUCKET = 128                         # the smallest StaticCache length (positions)

# Inductor keeps its compiled kernels under the declab cache unless the user chose a folder. Set at import: Inductor
# writes its own default (a /tmp folder) into the environment the first time it looks.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))


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
            out = self._compiled()(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            if size not in self.compile_s:
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
