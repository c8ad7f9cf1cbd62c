"""The runner: validate a request, encode the prompt, stream a strategy's events, collect the result.

    request = RunRequest(model="smollm2-135m-instruct", strategy="greedy", prompt="Hi", max_new_tokens=16)
    spec, strategy, cfg = validate(request)          # no model needed: bad input fails fast
    run = Run(lm, request)                            # encodes the prompt, checks the context length
    for progress in run.events(): ...                 # streams; run.stop.set() ends it after the current step
    result = run.result                               # metadata, trace frame, sequences, status

Seeded runs are reproducible: every random draw uses the run's own generator seeded with `seed`.
"""

from __future__ import annotations

import dataclasses
import platform
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field

import pandas as pd

from declab import __version__
from declab.errors import UserError
from declab.metrics import summarize
from declab.registry import ModelSpec, Registry, load_registry
from declab.sampling import make_generator
from declab.trace import Trace, column_dtypes
from strategies.base import MAX_NEW_TOKENS, Progress, RunContext, Sequence, Strategy, get_strategy

MAX_PROMPT_CHARS = 100_000


@dataclass
class RunRequest:
    model: str
    strategy: str
    prompt: str
    params: dict = field(default_factory=dict)
    prompt_format: str | None = None          # raw | chat; None = the model entry's default
    max_new_tokens: int = 64
    seed: int = 0
    extras: dict = field(default_factory=dict)


@dataclass
class RunResult:
    meta: dict
    frame: pd.DataFrame
    sequences: list[Sequence]
    status: str                                # ok | stopped | failed
    error: str | None = None


def versions() -> dict:
    import torch
    import transformers
    return {"declab": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "pandas": pd.__version__, "python": platform.python_version()}


def validate(request: RunRequest, registry: Registry | None = None) -> tuple[ModelSpec, Strategy, object]:
    """Check everything that does not need the model. Raises UserError with a one-line message."""
    registry = registry or load_registry()
    spec = registry.get(request.model)
    strategy = get_strategy(request.strategy)
    cfg = strategy.make_config(request.params)
    if not isinstance(request.prompt, str) or not request.prompt.strip():
        raise UserError("prompt is empty; give some text to continue")
    if len(request.prompt) > MAX_PROMPT_CHARS:
        raise UserError(f"prompt has {len(request.prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
    if request.prompt_format not in (None, "raw", "chat"):
        raise UserError(f"prompt format must be raw or chat, got {request.prompt_format!r}")
    n = request.max_new_tokens
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_NEW_TOKENS:
        raise UserError(f"max new tokens must be an integer in [1, {MAX_NEW_TOKENS}], got {n!r}")
    if isinstance(request.seed, bool) or not isinstance(request.seed, int) or not 0 <= request.seed < 2**63:
        raise UserError(f"seed must be an integer in [0, 2^63), got {request.seed!r}")
    if hasattr(strategy, "check_request"):      # strategy-specific input (a grammar that does not compile...)
        strategy.check_request(cfg, request)
    return spec, strategy, cfg


class Run:
    """One run of one strategy on one loaded LM. Per-run state only; the LM is shared and never mutated."""

    def __init__(self, lm, request: RunRequest, registry: Registry | None = None):
        self.spec, self.strategy, self.cfg = validate(request, registry)
        if lm.key != request.model:
            raise UserError(f"run asks for model '{request.model}' but '{lm.key}' is loaded")
        self.lm, self.request = lm, request
        self.prompt_format = request.prompt_format or ("chat" if self.spec.chat else "raw")
        self.prompt_ids = lm.encode_prompt(request.prompt, self.prompt_format)
        limit = self.spec.context_length
        if not self.prompt_ids:
            raise UserError("prompt encodes to no tokens; give some text to continue")
        if len(self.prompt_ids) + request.max_new_tokens > limit:
            raise UserError(f"prompt is {len(self.prompt_ids)} tokens; with {request.max_new_tokens} new tokens that "
                            f"exceeds the context length {limit} of model '{self.spec.key}'")
        self.run_id = uuid.uuid4().hex[:12]
        self.stop = threading.Event()
        self.trace = Trace(self.run_id, self.strategy.name, lm.key)
        self.result: RunResult | None = None
        self.latest: list[int] = []

    def events(self):
        """Yield Progress events; afterwards `self.result` is set (also when stopped or failed)."""
        req, lm = self.request, self.lm
        ctx = RunContext(lm=lm, prompt_ids=self.prompt_ids, max_new_tokens=req.max_new_tokens, seed=req.seed,
                         generator=make_generator(req.seed, lm.device), trace=self.trace, stop=self.stop,
                         extras={"prompt_text": req.prompt, "prompt_format": self.prompt_format, **req.extras})
        started = time.time()
        t0 = time.perf_counter()
        status, error, sequences = "ok", None, None
        gen = self.strategy.run(ctx, self.cfg)
        try:
            while True:
                if self.stop.is_set():
                    status = "stopped"
                    break
                try:
                    ev: Progress = next(gen)
                except StopIteration as done:
                    sequences = done.value
                    break
                self.latest = list(ev.token_ids)
                yield ev
        except UserError:
            raise
        except Exception as e:  # a failing run (OOM, grammar...) is recorded, never loses earlier runs
            status, error = "failed", f"{type(e).__name__}: {e}"
            self.traceback = traceback.format_exc()
        finally:
            gen.close()
        wall_s = time.perf_counter() - t0
        if sequences is None:
            sequences = [Sequence(token_ids=self.latest)]
        for s in sequences:
            s.token_ids = strip_eos(s.token_ids, lm.eos_ids)
            s.text = lm.decode(s.token_ids)
        frame = self.trace.frame()
        metrics = summarize(frame)
        metrics.update(ctx.metrics)                 # what the strategy measured itself (speedup, switches...)
        new_tokens = len(sequences[0].token_ids) if sequences else 0
        metrics.update(new_tokens=new_tokens, tokens_per_s=round(new_tokens / wall_s, 3) if wall_s > 0 else 0.0)
        meta = {
            "run_id": self.run_id, "status": status, "error": error,
            "model": lm.key, "model_source": self.spec.source_text, "quantization": lm.quantization,
            "dtype": str(lm.dtype).replace("torch.", ""), "device": str(lm.device),
            "strategy": self.strategy.name, "params": dataclasses.asdict(self.cfg), "seed": req.seed,
            "prompt": req.prompt, "prompt_format": self.prompt_format, "prompt_ids": self.prompt_ids,
            "max_new_tokens": req.max_new_tokens, "extras": {k: v for k, v in req.extras.items()
                                                             if isinstance(v, (str, int, float, bool))},
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)), "wall_s": round(wall_s, 4),
            "metrics": metrics, "versions": versions(), "columns": column_dtypes(frame),
            "sequences": [{"text": s.text, "token_ids": s.token_ids, "score": s.score, **s.extra} for s in sequences],
        }
        self.result = RunResult(meta=meta, frame=frame, sequences=sequences, status=status, error=error)

    def run_to_end(self) -> RunResult:
        for _ in self.events():
            pass
        return self.result


def strip_eos(ids: list[int], eos_ids) -> list[int]:
    """Generated ids up to and excluding the first EOS."""
    out = []
    for t in ids:
        if t in eos_ids:
            break
        out.append(int(t))
    return out


def second_model_key(request: RunRequest, registry: Registry | None = None) -> str | None:
    """The second model a run needs, or None. Only for strategies whose `needs` holds 'second_model': the model
    the strategy's config names (`Strategy.named_second_model(cfg)`: a key, '' for "the paired one", None for "no
    second model with this config"), else extras['second_model'], else the model's first `pairs` entry."""
    registry = registry or load_registry()
    spec, strategy, cfg = validate(request, registry)
    if "second_model" not in (getattr(strategy, "needs", None) or ()):
        return None
    named = strategy.named_second_model(cfg) if hasattr(strategy, "named_second_model") else ""
    if named is None:
        return None
    key = named or request.extras.get("second_model") or (spec.pairs[0] if spec.pairs else None)
    if not key:
        role = getattr(strategy, "second_model_role", "")              # e.g. contrastive: "amateur"
        raise UserError(f"strategy '{strategy.name}' needs a second model and model '{spec.key}' lists none under "
                        f"`pairs` in models.yaml" + (f": it has no {role}" if role else ""))
    registry.get(key)                                       # unknown key: a one-line error
    return key


def attach_second_model(request: RunRequest, registry: Registry | None = None) -> None:
    """CLI / bench: load the second model a run needs (see `second_model_key`) into request.extras as
    'second_model' (key) and 'second_lm' (the LM), as the app does."""
    key = second_model_key(request, registry)
    if key is not None and (request.extras.get("second_lm") is None or request.extras.get("second_model") != key):
        request.extras = dict(request.extras, second_model=key, second_lm=get_lm(key, registry))


_LM_CACHE: dict[str, object] = {}
_LM_LOCK = threading.Lock()


def get_lm(key: str, registry: Registry | None = None):
    """Load a model once per process (CLI, tests, bench). The app uses st.cache_resource around load_lm."""
    from declab.loading import load_lm
    with _LM_LOCK:
        if key not in _LM_CACHE:
            spec = (registry or load_registry()).get(key)
            _LM_CACHE[key] = load_lm(spec)[0]
        return _LM_CACHE[key]
