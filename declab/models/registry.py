"""The model registry: `models.yaml`, validated on load with messages that name the entry and field."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from declab.core.errors import UserError
from declab.core.strategy import import_plugins

DEFAULT_PATH = Path(__file__).resolve().parent / "models.yaml"    # package data; the checkout links it at the root
ENV_PATH = "DECLAB_MODELS"      # another models.yaml (tests point it at one with the scripted fake model)

DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "bnb-4bit", "bnb-8bit", "int8")
DEVICES = ("auto", "cpu", "cuda")
CACHES = ("dynamic", "static")
KERNELS = ("auto", "onednn", "transformers", "compiled")     # declab/models/packed.py, compiled.py
SOURCE_KINDS = ["hub", "path", "package", "draft"]    # more through declab.models.loading.register_source
FIELDS = ("source", "dtype", "quantization", "device", "chat", "context_length", "description", "pairs",
          "trust_remote_code", "cache", "kernels", "heads")


@dataclass(frozen=True)
class ModelSpec:
    """One models.yaml entry. `source` is {'hub': id} | {'path': folder} | {'package': pkg, 'gguf': file} |
    {'draft': weights file, 'base': key} (a draft built on another entry's weights, declab/models/draft.py), or a
    kind registered with declab.models.loading.register_source (the tests' scripted fake)."""

    key: str
    source: dict
    dtype: str = "auto"
    quantization: str = "none"
    device: str = "auto"
    chat: bool = True
    context_length: int = 2048
    description: str = ""
    pairs: tuple[str, ...] = ()
    trust_remote_code: bool = False
    cache: str = "dynamic"
    kernels: str = "auto"           # auto | onednn (packed linears, declab/models/packed.py) | transformers | compiled
                                    # (torch.compile'd decoding steps, declab/models/compiled.py)
    heads: str = ""                 # folder of trained drafting heads for this model's weights (declab/models/heads.py)

    @property
    def source_text(self) -> str:
        """Where the weights come from, for messages and metadata."""
        if "hub" in self.source:
            return f"hub {self.source['hub']}"
        if "path" in self.source:
            return f"folder {self.source['path']}"
        if "draft" in self.source:
            return f"draft {self.source['draft']} on {self.source['base']}"
        if "package" in self.source:
            return f"package {self.source['package']} ({self.source['gguf']})"
        kind = self.kind
        return f"{kind} {self.source.get(kind)}"

    @property
    def kind(self) -> str:
        """The source kind: hub, path, package, draft or a registered one."""
        return next(k for k in SOURCE_KINDS if k in self.source)


@dataclass(frozen=True)
class Registry:
    models: dict[str, ModelSpec]
    default: str

    def get(self, key: str) -> ModelSpec:
        if key not in self.models:
            raise UserError(f"unknown model '{key}'; known models: {', '.join(self.models)}")
        return self.models[key]


def _entry(key: str, raw, where: str) -> ModelSpec:
    def bad(field: str, why: str):
        raise UserError(f"{where}: model '{key}', field '{field}': {why}")

    if not isinstance(raw, dict):
        bad("(entry)", "must be a mapping of fields")
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        bad(unknown[0], f"unknown field; allowed: {', '.join(FIELDS)}")
    source = raw.get("source")
    if not isinstance(source, dict):
        bad("source", "required: {hub: ID} | {path: FOLDER} | {package: PKG, gguf: FILE}")
    kinds = [k for k in SOURCE_KINDS if k in source]
    if len(kinds) != 1:
        bad("source", f"give exactly one of {', '.join(SOURCE_KINDS)}")
    if kinds[0] == "package" and not source.get("gguf"):
        bad("source", "a package source needs a gguf file name")
    if kinds[0] == "draft" and not source.get("base"):
        bad("source", "a draft source needs the key of its base model (base: KEY)")
    for field, allowed in (("dtype", DTYPES), ("quantization", QUANTIZATIONS), ("device", DEVICES),
                           ("cache", CACHES), ("kernels", KERNELS)):
        if raw.get(field, allowed[0]) not in allowed:
            bad(field, f"must be one of {', '.join(allowed)}, got {raw.get(field)!r}")
    if raw.get("kernels") == "compiled" and raw.get("quantization", "none") not in ("none", "int8"):
        bad("kernels", "compiled needs quantization none or int8 (bitsandbytes layers do not compile here)")
    ctx = raw.get("context_length", 2048)
    if not isinstance(ctx, int) or isinstance(ctx, bool) or ctx < 16:
        bad("context_length", f"must be an integer >= 16, got {ctx!r}")
    for field in ("chat", "trust_remote_code"):
        if not isinstance(raw.get(field, False), bool):
            bad(field, f"must be true or false, got {raw.get(field)!r}")
    pairs = raw.get("pairs", []) or []
    if not isinstance(pairs, list) or not all(isinstance(p, str) for p in pairs):
        bad("pairs", "must be a list of model keys")
    if not isinstance(raw.get("heads", ""), str):
        bad("heads", f"must be a folder name, got {raw.get('heads')!r}")
    return ModelSpec(key=key, source=dict(source), dtype=raw.get("dtype", "auto"),
                     quantization=raw.get("quantization", "none"), device=raw.get("device", "auto"),
                     chat=raw.get("chat", True), context_length=ctx, description=str(raw.get("description", "")),
                     pairs=tuple(pairs), trust_remote_code=raw.get("trust_remote_code", False),
                     cache=raw.get("cache", "dynamic"), kernels=raw.get("kernels", "auto"),
                     heads=raw.get("heads", ""))


def load_registry(path: str | Path | None = None) -> Registry:
    """Read and validate models.yaml (default: $DECLAB_MODELS, else the one at the repository root)."""
    import_plugins()                      # plug-ins may add source kinds before entries are validated
    path = Path(path or os.environ.get(ENV_PATH) or DEFAULT_PATH)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"cannot read model registry {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); save it as "
                        "UTF-8") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("models"), dict) or not raw["models"]:
        raise UserError(f"{path}: needs a 'models' mapping with at least one entry")
    models = {str(k): _entry(str(k), v, str(path)) for k, v in raw["models"].items()}
    for spec in models.values():
        for p in spec.pairs:
            if p not in models:
                raise UserError(f"{path}: model '{spec.key}', field 'pairs': unknown model '{p}'")
        if "draft" in spec.source and spec.source["base"] not in models:
            raise UserError(f"{path}: model '{spec.key}', field 'source': unknown base model '{spec.source['base']}'")
    default = raw.get("default", next(iter(models)))
    if default not in models:
        raise UserError(f"{path}: default '{default}' is not a model in the file")
    return Registry(models=models, default=default)
