"""A run request (keys and text only) and its validated plan.

    request = RunRequest(model="smollm2-135m-instruct", strategy="speculative", prompt="Hi", max_new_tokens=16)
    plan = validate(request)        # once, no model needed: bad input fails fast with a one-line UserError

`validate` checks everything that does not need a model (model key, strategy, parameters, prompt, limits, seed),
lets the strategy check and complete its inputs once (`Strategy.prepare`: a grammar is parsed here and nowhere
else before the run), and names the second models the run needs by role (`Strategy.needs(cfg)`): a key the config
names, else the request's `second_model` (the app's picker), else the model's first models.yaml `pairs` entry.
The plan holds keys only; `declab.run.resolve.resolve_models` turns them into loaded models.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from declab.core import MAX_NEW_TOKENS, Config, RunInputs, Strategy, UserError, get_strategy
from declab.models.registry import ModelSpec, Registry, load_registry

MAX_PROMPT_CHARS = 100_000


@dataclass
class RunRequest:
    """What a user asked for: keys and text only (never a loaded model)."""

    model: str
    strategy: str
    prompt: str
    params: dict = field(default_factory=dict)
    prompt_format: str | None = None          # raw | chat; None = the model entry's default
    max_new_tokens: int = 64
    seed: int = 0
    grammar: str | None = None                # EBNF text (CLI --grammar-file, the app's editor)
    lame_prompt: str | None = None            # uscd (CLI --lame-prompt, the app's text box)
    second_model: str | None = None           # the second model picked for roles the config leaves open


@dataclass(frozen=True)
class RunPlan:
    """A validated request: the model entry, the strategy and its config, the completed inputs, and the second
    models by role (keys). Built only by `validate`."""

    request: RunRequest
    spec: ModelSpec
    strategy: Strategy
    cfg: Config
    inputs: RunInputs
    models: dict[str, str]                    # role -> models.yaml key

    def extras(self, model_keys: dict[str, str]) -> dict:
        """The inputs besides the parameters, as recorded in the run metadata (`extras`), with `second_model` the
        key of the second model the run used (model_keys: role -> key)."""
        out: dict = {}
        if self.request.grammar is not None:
            out["grammar"] = self.inputs.grammar
        if self.inputs.lame_prompt is not None:
            out["lame_prompt"] = self.inputs.lame_prompt
        if model_keys:
            out["second_model"] = next(iter(model_keys.values()))
        return out


def validate(request: RunRequest, registry: Registry | None = None) -> RunPlan:
    """Check everything that does not need the model; raise UserError with a one-line message."""
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
    for name in ("grammar", "lame_prompt", "second_model"):
        value = getattr(request, name)
        if value is not None and not isinstance(value, str):
            raise UserError(f"{name.replace('_', ' ')} must be text, got {type(value).__name__}")
    inputs = RunInputs(prompt=request.prompt, prompt_format=request.prompt_format or ("chat" if spec.chat else "raw"),
                       grammar=request.grammar, lame_prompt=request.lame_prompt)
    inputs = strategy.prepare(cfg, inputs)
    models = {}
    for need in strategy.needs(cfg).models:
        key = need.key or request.second_model or (spec.pairs[0] if spec.pairs else None)
        if not key:
            raise UserError(f"strategy '{strategy.name}' needs a second model and model '{spec.key}' lists none "
                            f"under `pairs` in models.yaml: it has no {need.role}")
        registry.get(key)                                   # unknown key: a one-line error
        models[need.role] = key
    return RunPlan(request=request, spec=spec, strategy=strategy, cfg=cfg, inputs=inputs, models=models)
