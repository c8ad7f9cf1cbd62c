"""The one resolver: a plan's model keys -> loaded models by role, for the CLI, the app, bench and tests alike.

    models = resolve_models(plan, load=get_lm)       # {"model": LM, "draft": LM, ...}

`load(key)` loads one models.yaml entry (`get_lm`: once per process; the app passes its shared
`st.cache_resource` loader). Models given already (the app's loaded model, a test's scripted fake) are used as
they are for their role, whatever their key; the run's metadata records the keys of the models it really used.
Every second model must share the run model's tokenizer.
"""

from __future__ import annotations

import threading
from typing import Callable

from declab.core import UserError
from declab.models.loading import load_lm
from declab.models.registry import Registry, load_registry
from declab.run.plan import RunPlan

MAIN = "model"                     # the role of the run's own model in a resolved mapping

_LM_CACHE: dict[tuple[str, str], object] = {}
_LM_LOCK = threading.Lock()


def get_lm(key: str, registry: Registry | None = None):
    """Load a model once per process (CLI, tests, bench)."""
    with _LM_LOCK:
        spec = (registry or load_registry()).get(key)
        cache_key = (key, repr(spec))
        if cache_key not in _LM_CACHE:
            _LM_CACHE[cache_key] = load_lm(spec)[0]
        return _LM_CACHE[cache_key]


def resolve_models(plan: RunPlan, given: dict | None = None, load: Callable[[str], object] | None = None) -> dict:
    """{role: LM} for the plan's model (role 'model') and every second model it names, loading what `given`
    lacks with `load` (default `get_lm`)."""
    given = dict(given or {})
    load = load or get_lm
    wanted = {MAIN: plan.spec.key, **plan.models}
    out = {}
    for role, key in wanted.items():
        lm = given.get(role)
        out[role] = lm if lm is not None else load(key)
    for role in plan.models:
        check_same_tokenizer(out[MAIN], out[role])
    return out


def check_same_tokenizer(lm, other) -> None:
    """Same logits width and the same text for a spread of token ids, else a UserError naming both models."""
    if lm.vocab_size != other.vocab_size:
        raise UserError(f"models '{lm.key}' and '{other.key}' do not share a tokenizer (logits width {lm.vocab_size} vs "
                        f"{other.vocab_size}); pick a pair from models.yaml")
    n = min(lm.vocab_size, 64)
    probe = sorted({0, 1, 2, n // 2, n - 1, lm.vocab_size // 3, lm.vocab_size - 1} & set(range(lm.vocab_size)))
    try:
        same = all(lm.token_text(i) == other.token_text(i) for i in probe)
    except (IndexError, KeyError):
        same = False
    if not same:
        raise UserError(f"models '{lm.key}' and '{other.key}' do not share a tokenizer; pick a pair from models.yaml")
