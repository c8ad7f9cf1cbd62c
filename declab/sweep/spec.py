"""The sweep file (YAML) and its validation into one list of runs, before anything runs.

    name: temperature-vs-top-p              # letters, digits, . _ - (the run library tag is `sweep:<name>`)
    model: smollm2-135m-instruct            # a models.yaml key (default: the registry default)
    prompts: {set: open-ended, n: 8}        # a list, {file: PATH.jsonl} or a built-in set (declab.sweep.prompts)
    prompt_format: chat                     # optional: raw | chat for prompts that do not say (default: the set's,
                                            # else the model entry's)
    max_new_tokens: 64
    seeds: [0, 1, 2]                        # or one integer
    ngram: 2                                # n of rep_n / distinct_n (default 2)
    runs:
      - strategy: sample
        grid: {temperature: [0.7, 1.0, 1.3], top_p: [0.9, 1.0]}     # every combination (a scalar = one value)
        params: {top_k: 0}                                           # fixed parameters of every combination
      - strategy: greedy
    metrics: [rep_n, distinct_n, perplexity, pass_at_1]

Every run is one (strategy, parameter combination, prompt, seed), in the file's order. Each is validated by the
engine (declab.run.validate: the strategy's Config gives its own message for an unknown parameter or an
out-of-range value) before the first one runs; a bad file is one line naming the field and the legal values.
A strategy that takes a grammar (gcd, asap) decodes a grammar-set prompt with that prompt's grammar unless the
grid or `params` set `grammar`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from declab.core import MAX_NEW_TOKENS, UserError, get_strategy
from declab.models.registry import Registry, load_registry
from declab.run import RunRequest, validate
from declab.sweep import metrics as M
from declab.sweep.prompts import Prompt, load_prompts
from strategies.grammar import BUILTIN_NAMES

KEYS = ("name", "model", "prompts", "prompt_format", "max_new_tokens", "seeds", "ngram", "runs", "metrics")
RUN_KEYS = ("strategy", "grid", "params")
MAX_RUNS = 100_000
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,56}")


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: what the worker needs (plain data, picklable)."""

    key: str                    # stable id of (strategy, params, prompt id, seed) within the sweep
    strategy: str
    params: dict                # the combination's parameters (grid + fixed), as given
    prompt: Prompt
    seed: int

    def request(self, sweep) -> RunRequest:
        """The engine's request for this run; `sweep`: the Sweep or its worker Settings (model, prompt_format,
        max_new_tokens)."""
        return RunRequest(model=sweep.model, strategy=self.strategy, prompt=self.prompt.text, params=dict(self.params),
                          prompt_format=self.prompt.prompt_format or sweep.prompt_format,
                          max_new_tokens=sweep.max_new_tokens, seed=self.seed)


@dataclass(frozen=True)
class Sweep:
    name: str
    model: str
    prompt_set: str
    prompts: tuple[Prompt, ...]
    prompt_format: str | None
    max_new_tokens: int
    seeds: tuple[int, ...]
    ngram: int
    metrics: tuple[str, ...]
    runs: tuple[SweepRun, ...] = field(repr=False)
    text: str = field(default="", repr=False)       # the file as given (kept in DIR/sweep.json)


def run_key(strategy: str, params: dict, prompt_id: str, seed: int) -> str:
    blob = json.dumps([strategy, params, prompt_id, seed], sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:16]


def _int(value, where: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise UserError(f"{where}: must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _combinations(entry: dict, where: str) -> list[dict]:
    """Every combination of the grid (in the file's key order, the last key varying fastest), each with `params`."""
    grid = entry.get("grid", {})
    fixed = entry.get("params", {})
    for key, value in (("grid", grid), ("params", fixed)):
        if not isinstance(value, dict):
            raise UserError(f"{where}.{key}: must be a mapping of parameter names to values, got "
                            f"{type(value).__name__}")
    if "grid" in entry and not grid:
        raise UserError(f"{where}.grid: is empty; give each parameter a list of values, e.g. "
                        "{temperature: [0.7, 1.0]}")
    axes = []
    for name, values in grid.items():
        values = values if isinstance(values, list) else [values]
        if not values:
            raise UserError(f"{where}.grid.{name}: the list of values is empty; give at least one value")
        if name in fixed:
            raise UserError(f"{where}: parameter '{name}' is in both grid and params; give it in one of them")
        axes.append([(str(name), v) for v in values])
    return [{**{str(k): v for k, v in fixed.items()}, **dict(combo)} for combo in itertools.product(*axes)]


def parse_sweep(text: str, base: Path | None = None, registry: Registry | None = None) -> Sweep:
    """Validate a sweep file's text into a Sweep; UserError (one line naming the field) when it is not one."""
    registry = registry or load_registry()
    base = base or Path.cwd()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"sweep file is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise UserError(f"sweep file: must be a mapping with the keys {', '.join(KEYS)}")
    unknown = [str(k) for k in data if k not in KEYS]
    if unknown:
        raise UserError(f"sweep file: unknown key(s) {', '.join(unknown)}; keys: {', '.join(KEYS)}")
    for key in ("name", "prompts", "runs"):
        if key not in data:
            raise UserError(f"{key}: missing; a sweep file needs name, prompts and runs")
    name = data["name"]
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise UserError(f"name: must be 1-57 letters, digits, '.', '_' or '-' (starting with a letter or digit), "
                        f"got {name!r}")
    model = data.get("model", registry.default)
    if not isinstance(model, str):
        raise UserError(f"model: must be a models.yaml key ({', '.join(registry.models)}), got {model!r}")
    try:
        registry.get(model)
    except UserError as e:
        raise UserError(f"model: {e}") from None
    prompt_format = data.get("prompt_format")
    if prompt_format not in (None, "raw", "chat"):
        raise UserError(f"prompt_format: must be raw or chat, got {prompt_format!r}")
    prompt_set, prompts = load_prompts(data["prompts"], base)
    for p in prompts:
        if p.grammar is not None and p.grammar not in BUILTIN_NAMES:
            raise UserError(f"prompts ({p.id}).grammar: must be one of {', '.join(BUILTIN_NAMES)}, got {p.grammar!r}")
    max_new_tokens = _int(data.get("max_new_tokens", 64), "max_new_tokens", 1, MAX_NEW_TOKENS)
    seeds = data.get("seeds", [0])
    seeds = seeds if isinstance(seeds, list) else [seeds]
    if not seeds:
        raise UserError("seeds: the list is empty; give at least one seed, e.g. [0, 1]")
    seeds = [_int(s, f"seeds[{i}]", 0, 2**63 - 1) for i, s in enumerate(seeds)]
    if len(set(seeds)) != len(seeds):
        raise UserError(f"seeds: must be distinct, got {seeds}")
    ngram = _int(data.get("ngram", 2), "ngram", 1, 9)
    metric_names = data.get("metrics", [])
    if not isinstance(metric_names, list):
        metric_names = [metric_names]
    for i, m in enumerate(metric_names):
        if not M.is_metric(m):
            raise UserError(f"metrics[{i}]: unknown metric {m!r}; metrics: {M.legal_text()}")
    if len(set(metric_names)) != len(metric_names):
        raise UserError(f"metrics: each metric once, got {metric_names}")
    entries = data["runs"]
    if not isinstance(entries, list) or not entries:
        raise UserError("runs: must be a non-empty list of {strategy: NAME, grid: {...}, params: {...}}")
    runs: list[SweepRun] = []
    sweep = Sweep(name=name, model=model, prompt_set=prompt_set, prompts=tuple(prompts), prompt_format=prompt_format,
                  max_new_tokens=max_new_tokens, seeds=tuple(seeds), ngram=ngram, metrics=tuple(metric_names),
                  runs=(), text=text)
    for i, entry in enumerate(entries):
        where = f"runs[{i}]"
        if isinstance(entry, str):
            entry = {"strategy": entry}
        if not isinstance(entry, dict) or "strategy" not in entry:
            raise UserError(f"{where}: must be a mapping with a strategy (and optionally grid, params)")
        bad = [str(k) for k in entry if k not in RUN_KEYS]
        if bad:
            raise UserError(f"{where}: unknown key(s) {', '.join(bad)}; keys: {', '.join(RUN_KEYS)}")
        try:
            strategy = get_strategy(str(entry["strategy"]))
        except UserError as e:
            raise UserError(f"{where}.strategy: {e}") from None
        for combo in _combinations(entry, where):
            for p in prompts:
                params = dict(combo)
                if getattr(strategy, "takes_grammar", False) and p.grammar and "grammar" not in params:
                    params["grammar"] = p.grammar
                for j, seed in enumerate(seeds):
                    run = SweepRun(run_key(strategy.name, params, p.id, seed), strategy.name, params, p, seed)
                    if j == 0:              # the seed does not change validity: one validation per combination
                        try:
                            validate(run.request(sweep), registry)
                        except UserError as e:
                            raise UserError(f"{where} ({strategy.name} {json.dumps(params, default=str)}, prompt "
                                            f"{p.id}): {e}") from None
                    runs.append(run)
                    if len(runs) > MAX_RUNS:
                        raise UserError(f"runs: a sweep has at most {MAX_RUNS} runs")
    keys = [r.key for r in runs]
    if len(set(keys)) != len(keys):
        raise UserError("runs: the same strategy and parameters appear twice; give each combination once")
    return dataclasses.replace(sweep, runs=tuple(runs))


def load_sweep(path, registry: Registry | None = None) -> Sweep:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read sweep file {path}: {getattr(e, 'strerror', None) or e}") from None
    return parse_sweep(text, base=path.resolve().parent, registry=registry)
