"""The strategy contract: the `Strategy` base with every hook declared with its default, `Needs` (what a run
needs besides the prompt and the parameters), and the registry.

A strategy is a module with a frozen config dataclass (fields declared with `param(...)`, declab.core.params) and a
`Strategy` subclass whose `run(ctx, cfg)` is a generator: it yields `Progress` after each step (so the UI can stream
and a Stop button can end it), writes trace rows through `ctx.trace`, and returns the final ranked `Sequence` list.

Strategies import the engine's core; the engine never imports them. They are found through the entry-point group
`declab.strategies` (pyproject.toml names the built-in package `strategies`; another installed package can add its
own), loaded on the first registry look-up.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from declab.core.context import ROLES, RunContext, RunGen, RunInputs
from declab.core.errors import UserError
from declab.core.params import Config, parse_value, range_text

PLUGIN_GROUP = "declab.strategies"
ENV_PLUGINS = "DECLAB_PLUGINS"        # comma-separated modules imported before the registries are read


@dataclass(frozen=True)
class ModelNeed:
    """One second model a run needs: its role and the models.yaml key the config names ('' = the run model's
    first `pairs` entry, or the second model picked in the app)."""

    role: str                        # draft | small | amateur
    key: str = ""


@dataclass(frozen=True)
class Needs:
    """What one run (a strategy with one config) needs besides its model, prompt and parameters."""

    models: tuple[ModelNeed, ...] = ()
    grammar: bool = False
    lame_prompt: bool = False

    def roles(self) -> tuple[str, ...]:
        return tuple(m.role for m in self.models)


class Strategy:
    """Subclass per strategy. Class attributes describe it for `declab list`, the app form and the Teach page;
    the hooks below have defaults, so a strategy overrides only what it uses."""

    name: ClassVar[str]
    title: ClassVar[str]
    paper: ClassVar[str] = ""
    explanation: ClassVar[str] = ""       # a short card for students
    advice: ClassVar[str] = ""            # when to pick which setting, with what was measured (shown in the app)
    Config: ClassVar[type[Config]]
    deterministic: ClassVar[bool] = True
    roles: ClassVar[tuple[str, ...]] = ()           # second models it can use (draft / small / amateur)
    takes_grammar: ClassVar[bool] = False           # a grammar input (editor in the app, --grammar-file in the CLI)
    takes_lame_prompt: ClassVar[bool] = False       # a lame prompt input (uscd)
    grammar_examples: ClassVar[Mapping[str, str]] = {}   # built-in grammars offered in the app's picker

    def run(self, ctx: RunContext, cfg) -> RunGen:  # pragma: no cover - interface
        raise NotImplementedError

    # ---------------------------------------------------------------------------------- hooks with defaults
    def needs(self, cfg) -> Needs:
        """What a run with this config needs. Default: one model per declared role (the paired one) and the
        declared inputs. Override when the config names a model or makes a role unnecessary."""
        return Needs(models=tuple(ModelNeed(r) for r in self.roles), grammar=self.takes_grammar,
                     lame_prompt=self.takes_lame_prompt)

    def prepare(self, cfg, inputs: RunInputs) -> RunInputs:
        """Check and complete the run's inputs before any model is loaded (a grammar that does not compile, a
        corpus that cannot be read: UserError). Called once per run, by the engine's plan. Default: unchanged."""
        return inputs

    # ---------------------------------------------------------------------------------- config helpers
    def params(self) -> list[dict]:
        """Every parameter with type, default, range and help (for `declab list` and the app form)."""
        out = []
        for f in dataclasses.fields(self.Config):
            m = f.metadata
            out.append({"name": f.name, "type": type(f.default).__name__, "default": f.default,
                        "range": range_text(m), "lo": m.get("lo"), "hi": m.get("hi"), "lo_open": m.get("lo_open"),
                        "hi_open": m.get("hi_open"), "choices": m.get("choices"), "help": m.get("help", "")})
        return out

    def make_config(self, params: dict | None = None):
        """Build and validate the config from a dict of values or strings (CLI `--set` / app widgets)."""
        fields = {f.name: f for f in dataclasses.fields(self.Config)}
        values = {}
        for name, value in (params or {}).items():
            if name not in fields:
                raise UserError(f"{self.name}: unknown parameter '{name}'; parameters: {', '.join(fields) or 'none'}")
            values[name] = parse_value(self.name, fields[name], value) if isinstance(value, str) else value
        return self.Config(**values)


# ------------------------------------------------------------------------------------------------ registry
STRATEGIES: dict[str, Strategy] = {}
_LOADED = threading.Event()
_LOAD_LOCK = threading.Lock()


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: add a strategy to the registry (its module runs this when the plug-in is loaded)."""
    unknown = set(cls.roles) - set(ROLES)
    if unknown:
        raise TypeError(f"{cls.__name__}: unknown role(s) {sorted(unknown)}; roles are {', '.join(ROLES)}")
    cls.Config._strategy = cls.name
    STRATEGIES[cls.name] = cls()
    return cls


def import_plugins() -> None:
    """Import the modules named in $DECLAB_PLUGINS (comma-separated): a plug-in that is not installed with entry
    points registers its strategies or model sources this way (the tests register their scripted fake model)."""
    for name in filter(None, (n.strip() for n in os.environ.get(ENV_PLUGINS, "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise UserError(f"cannot import plug-in module '{name}' named in ${ENV_PLUGINS}: {e}") from None


def load_strategies() -> dict[str, Strategy]:
    """Every registered strategy, loading the `declab.strategies` entry points (and $DECLAB_PLUGINS) once."""
    if not _LOADED.is_set():
        with _LOAD_LOCK:
            if not _LOADED.is_set():
                for ep in importlib.metadata.entry_points(group=PLUGIN_GROUP):
                    ep.load()
                import_plugins()
                _LOADED.set()
    if not STRATEGIES:
        raise UserError(f"no decoding strategies are installed (entry-point group {PLUGIN_GROUP}); install declab "
                        f"with `pip install .` or `make setup`")
    return STRATEGIES


def get_strategy(name: str) -> Strategy:
    strategies = load_strategies()
    if name not in strategies:
        raise UserError(f"unknown strategy '{name}'; known strategies: {', '.join(strategies)}")
    return strategies[name]
