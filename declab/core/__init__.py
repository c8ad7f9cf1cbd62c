"""The engine's contract with strategies: everything a strategy module imports, and nothing else of the project.

    params.py    param(...), Config (validated once), parsing of CLI/app text
    context.py   RunContext, RunInputs, Progress, Sequence, RunGen, MAX_NEW_TOKENS, ROLES
    strategy.py  Strategy (every hook with its default), Needs / ModelNeed, the registry (entry points)
    loop.py      the per-token loop and the Selector interface (llama.cpp's sampler interface)
    sampling.py  entropy, warpers, seeded draws, sample_or_argmax
    trace.py     trace rows, CSV / Parquet / JSON
    metrics.py   frame metrics and one metrics dataclass per strategy family
    meta.py      typed run metadata (schema version)
    paths.py     cache and data folders;  corpus.py  text corpora (n-gram tables, draft builds)
    errors.py    UserError

declab.core imports nothing of the project outside itself (tests/test_layering.py checks it).
"""

from declab.core.context import MAX_NEW_TOKENS, ROLES, Progress, RunContext, RunGen, RunInputs, Sequence
from declab.core.errors import UserError
from declab.core.params import Config, param, range_text
from declab.core.strategy import (STRATEGIES, ModelNeed, Needs, Strategy, get_strategy, load_strategies,
                                  register)

__all__ = ["MAX_NEW_TOKENS", "ROLES", "Progress", "RunContext", "RunGen", "RunInputs", "Sequence", "UserError",
           "Config", "param", "range_text", "STRATEGIES", "ModelNeed", "Needs", "Strategy", "get_strategy",
           "load_strategies", "register"]
