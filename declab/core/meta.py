"""Typed run metadata: what a run was (model, strategy, parameters, prompt, seed, versions), how it went (status,
metrics, sequences) and how to read its trace back (column dtypes), with a schema version.

One shape for every writer: the runner builds a `RunMeta`, the run library stores `to_dict()`, the app's and the
store's exports write it as `<stem>.meta.json`, and `declab run --json` writes `cli_json()` (the documented
subset). Readers take any dict through `RunMeta.from_dict`, which fills what is missing and turns what a foreign
or hand-edited file put in the wrong type into text, so an imported run renders without surprises; keys this
version does not know are kept in `other` and written back unchanged.

Schema history: 0 = metadata written before the version field existed (read as is); 1 = adds `schema` and
`models` (second models by role).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from declab.core.errors import UserError

SCHEMA_VERSION = 1
STATUSES = ("ok", "stopped", "failed")
RUN_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")           # what an imported run id may be
RUN_ID_RULE = "1 to 64 letters, digits, '-' or '_'"
CLI_JSON_KEYS = ("model", "strategy", "params", "seed", "prompt_format", "sequences", "metrics", "wall_s",
                 "versions", "run_id", "status")


def _text(value, default: str = "") -> str:
    return default if value is None else str(value)


def _int(value):
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float(value):
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _dict(value) -> dict:
    return dict(value) if isinstance(value, dict) else {}


def safe_name(text, fallback: str) -> str:
    """Text for a file or zip entry name: letters, digits, '-', '_' and '.' only (never a folder part)."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", str(text or ""))[:64].strip(".")
    return name or fallback


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_meta(d) -> None:
    """Imported metadata (a run exported elsewhere, an upload): the documented fields with the documented types.
    Raises UserError with one line naming the first bad field; unknown keys are allowed (kept in `other`)."""
    if not isinstance(d, dict):
        raise UserError("run metadata must be a JSON object")

    def bad(name: str, why: str):
        raise UserError(f"run metadata field '{name}' {why}")

    run_id = d.get("run_id")
    if run_id is not None and not (isinstance(run_id, str) and RUN_ID_RE.fullmatch(run_id)):
        bad("run_id", f"must be {RUN_ID_RULE}, got {str(run_id)[:40]!r}")
    if d.get("status") is not None and d["status"] not in STATUSES:
        bad("status", f"must be one of {', '.join(STATUSES)}, got {str(d['status'])[:40]!r}")
    for name in ("model", "strategy", "prompt", "prompt_format", "started_at", "dtype", "device", "quantization",
                 "model_source", "error", "note"):
        if d.get(name) is not None and not isinstance(d[name], str):
            bad(name, f"must be text, got {type(d[name]).__name__}")
    for name in ("params", "metrics", "models", "extras", "versions", "columns"):
        if d.get(name) is not None and not isinstance(d[name], dict):
            bad(name, f"must be an object, got {type(d[name]).__name__}")
    for name in ("seed", "max_new_tokens", "schema"):
        if d.get(name) is not None and not (isinstance(d[name], int) and not isinstance(d[name], bool)):
            bad(name, f"must be an integer, got {d[name]!r:.40}")
    if d.get("wall_s") is not None and not _is_number(d["wall_s"]):
        bad("wall_s", f"must be a number, got {d['wall_s']!r:.40}")
    seqs = d.get("sequences")
    if seqs is not None:
        if not isinstance(seqs, list) or not all(isinstance(s, dict) for s in seqs):
            bad("sequences", "must be a list of objects")
        for i, s in enumerate(seqs):
            if s.get("text") is not None and not isinstance(s["text"], str):
                bad(f"sequences[{i}].text", "must be text")
            ids = s.get("token_ids")
            if ids is not None and not (isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                                                      for t in ids)):
                bad(f"sequences[{i}].token_ids", "must be a list of integers")
            if s.get("score") is not None and not _is_number(s["score"]):
                bad(f"sequences[{i}].score", f"must be a number, got {s['score']!r:.40}")
    if d.get("prompt_ids") is not None and not isinstance(d["prompt_ids"], list):
        bad("prompt_ids", "must be a list of integers")


@dataclass
class RunMeta:
    run_id: str = ""
    status: str = "ok"                       # ok | stopped | failed
    error: str | None = None
    model: str = "?"
    model_source: str = ""
    quantization: str = ""
    dtype: str = ""
    device: str = ""
    strategy: str = "?"
    params: dict = field(default_factory=dict)
    seed: int | None = None
    prompt: str = ""
    prompt_format: str = ""
    prompt_ids: list = field(default_factory=list)
    max_new_tokens: int | None = None
    models: dict = field(default_factory=dict)       # second models by role: {"draft": key, ...}
    extras: dict = field(default_factory=dict)       # inputs besides the parameters: grammar, lame_prompt, ...
    started_at: str = ""
    wall_s: float | None = None
    metrics: dict = field(default_factory=dict)      # flat: summarize(frame) + the strategy's metrics dataclass
    versions: dict = field(default_factory=dict)
    columns: dict = field(default_factory=dict)      # trace column -> dtype, to read a CSV back typed
    sequences: list = field(default_factory=list)    # [{"text", "token_ids", "score", ...}], best first
    note: str | None = None
    schema: int = SCHEMA_VERSION
    other: dict = field(default_factory=dict)        # keys of a foreign or newer file, kept as they were

    @classmethod
    def from_dict(cls, d: dict | None) -> "RunMeta":
        d = d if isinstance(d, dict) else {}
        known = {f.name for f in dataclasses.fields(cls)} - {"other"}
        seqs = [s for s in d.get("sequences") or [] if isinstance(s, dict)] if isinstance(d.get("sequences"), list) \
            else []
        return cls(
            run_id=_text(d.get("run_id")), status=_text(d.get("status"), "ok"),
            error=None if d.get("error") is None else str(d["error"]), model=_text(d.get("model"), "?"),
            model_source=_text(d.get("model_source")), quantization=_text(d.get("quantization")),
            dtype=_text(d.get("dtype")), device=_text(d.get("device")), strategy=_text(d.get("strategy"), "?"),
            params=_dict(d.get("params")), seed=_int(d.get("seed")), prompt=_text(d.get("prompt")),
            prompt_format=_text(d.get("prompt_format")),
            prompt_ids=list(d["prompt_ids"]) if isinstance(d.get("prompt_ids"), list) else [],
            max_new_tokens=_int(d.get("max_new_tokens")), models=_dict(d.get("models")), extras=_dict(d.get("extras")),
            started_at=_text(d.get("started_at")), wall_s=_float(d.get("wall_s")), metrics=_dict(d.get("metrics")),
            versions=_dict(d.get("versions")), columns=_dict(d.get("columns")), sequences=seqs,
            note=None if d.get("note") is None else str(d["note"]),
            schema=_int(d.get("schema")) if "schema" in d else 0,
            other={k: v for k, v in d.items() if k not in known})

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "other"}
        if out["note"] is None:
            del out["note"]
        return {**self.other, **out}

    def cli_json(self) -> dict:
        """`declab run --json`: the documented keys; sequences with text, token_ids and score only."""
        out = {k: getattr(self, k) for k in CLI_JSON_KEYS}
        out["sequences"] = [{"text": s.get("text", ""), "token_ids": s.get("token_ids", []), "score": s.get("score")}
                            for s in self.sequences]
        return out

    @property
    def text(self) -> str:
        """The best sequence's text ('' when there is none)."""
        return _text(self.sequences[0].get("text")) if self.sequences else ""

    @property
    def stem(self) -> str:
        """The file name stem of this run's exports (and zip entries): built from safe characters only."""
        return f"declab-{safe_name(self.strategy, 'run')}-{safe_name(self.run_id, 'trace')}"
