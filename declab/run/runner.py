"""The runner: one run of one strategy, from a validated plan and its resolved models to a result.

    run = Run(lm, request)                            # validates once, resolves the second models, encodes the prompt
    for progress in run.events(): ...                 # streams; run.stop.set() ends it after the current step
    result = run.result                               # typed metadata, trace frame, sequences, status

Seeded runs are reproducible: every random draw uses the run's own generator seeded with `seed`.
"""

from __future__ import annotations

import dataclasses
import platform
import threading
import time
import traceback
import uuid
from dataclasses import dataclass

import pandas as pd
import torch

from declab import __version__
from declab.core import Progress, RunContext, Sequence, UserError
from declab.core.meta import RunMeta
from declab.core.metrics import summarize
from declab.core.sampling import make_generator
from declab.core.trace import Trace, column_dtypes
from declab.models.registry import Registry
from declab.run.plan import RunPlan, RunRequest, validate
from declab.run.resolve import MAIN, resolve_models


@dataclass
class RunResult:
    meta: dict                                 # RunMeta.to_dict(): the shape the store and every export write
    frame: pd.DataFrame
    sequences: list[Sequence]
    status: str                                # ok | stopped | failed
    error: str | None = None

    @property
    def run_meta(self) -> RunMeta:
        return RunMeta.from_dict(self.meta)


def versions() -> dict:
    import torch
    import transformers
    return {"declab": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "pandas": pd.__version__, "python": platform.python_version()}


class Run:
    """One run of one strategy on one loaded LM. Per-run state only; the LM is shared and never mutated.

    `request` is a RunRequest (validated here) or a RunPlan (validated already). `models` may hold loaded second
    models by role (draft / small / amateur); the ones the plan needs and `models` lacks are loaded through the
    resolver (`load`, default declab.run.resolve.get_lm)."""

    def __init__(self, lm, request: RunRequest | RunPlan, registry: Registry | None = None,
                 models: dict | None = None, load=None):
        self.plan = request if isinstance(request, RunPlan) else validate(request, registry)
        self.request = self.plan.request
        self.spec, self.strategy, self.cfg = self.plan.spec, self.plan.strategy, self.plan.cfg
        if lm.key != self.request.model:
            raise UserError(f"run asks for model '{self.request.model}' but '{lm.key}' is loaded")
        self.lm = lm
        self.models = resolve_models(self.plan, given={**(models or {}), MAIN: lm}, load=load)
        self.prompt_format = self.plan.inputs.prompt_format
        self.prompt_ids = lm.encode_prompt(self.request.prompt, self.prompt_format)
        limit = self.spec.context_length
        if not self.prompt_ids:
            raise UserError("prompt encodes to no tokens; give some text to continue")
        if len(self.prompt_ids) + self.request.max_new_tokens > limit:
            raise UserError(f"prompt is {len(self.prompt_ids)} tokens; with {self.request.max_new_tokens} new tokens "
                            f"that exceeds the context length {limit} of model '{self.spec.key}'")
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
                         inputs=self.plan.inputs, models={r: m for r, m in self.models.items() if r != MAIN})
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
        if ctx.metrics is not None:                 # what the strategy measured itself (speedup, switches...)
            metrics.update(ctx.metrics.as_dict())
        # wall time and tokens/s count the run's own decoding: a speedup measurement's target-only decoding, timed
        # inside the run (metrics target_only_ms), is reported apart
        wall_s = max(wall_s - (metrics.get("target_only_ms") or 0.0) / 1000.0, 0.0)
        new_tokens = len(sequences[0].token_ids) if sequences else 0
        metrics.update(new_tokens=new_tokens, tokens_per_s=round(new_tokens / wall_s, 3) if wall_s > 0 else 0.0,
                       torch_threads=torch.get_num_threads())
        meta = RunMeta(
            run_id=self.run_id, status=status, error=error, model=lm.key, model_source=self.spec.source_text,
            quantization=lm.quantization, dtype=str(lm.dtype).replace("torch.", ""), device=str(lm.device),
            strategy=self.strategy.name, params=dataclasses.asdict(self.cfg), seed=req.seed, prompt=req.prompt,
            prompt_format=self.prompt_format, prompt_ids=self.prompt_ids, max_new_tokens=req.max_new_tokens,
            models=self.model_keys(), extras=self.plan.extras(self.model_keys()),
            started_at=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)), wall_s=round(wall_s, 4),
            metrics=metrics, versions=versions(), columns=column_dtypes(frame),
            sequences=[{"text": s.text, "token_ids": s.token_ids, "score": s.score, **s.extra} for s in sequences])
        self.result = RunResult(meta=meta.to_dict(), frame=frame, sequences=sequences, status=status, error=error)

    def model_keys(self) -> dict[str, str]:
        """role -> key of the second models this run uses."""
        return {role: m.key for role, m in self.models.items() if role != MAIN}

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
