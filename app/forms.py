"""Run forms: model and strategy pickers, the prompt inputs, parameter widgets generated from `Strategy.params()`,
and the inputs a strategy declares (`roles`, `takes_grammar`, `takes_lame_prompt`, `grammar_examples`), so a new
strategy needs no app change. Everything ends in a `declab.run.RunRequest` (keys and text only)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import streamlit as st

import common
from declab.core import MAX_NEW_TOKENS, Strategy, UserError, get_strategy, load_strategies
from declab.models.registry import ModelSpec, Registry
from declab.run import RunRequest

DEFAULT_PROMPT = "Explain in two sentences why the sky is blue."
DEFAULT_MAX_NEW_TOKENS = 48
JS_INT = 2**53 - 1                    # the largest integer a browser number widget holds exactly


@dataclass
class Setup:
    """The shared part of a run form: prompt, its format, the token limit and the seed."""

    prompt: str
    prompt_format: str
    max_new_tokens: int
    seed: int


@dataclass
class Inputs:
    """What a strategy takes besides its parameters (each None when not given)."""

    grammar: str | None = None
    lame_prompt: str | None = None
    second_model: str | None = None


def request(spec: ModelSpec, strategy: Strategy, setup: Setup, params: dict, inputs: Inputs) -> RunRequest:
    return RunRequest(model=spec.key, strategy=strategy.name, prompt=setup.prompt, params=params,
                      prompt_format=setup.prompt_format, max_new_tokens=setup.max_new_tokens, seed=setup.seed,
                      grammar=inputs.grammar, lame_prompt=inputs.lame_prompt, second_model=inputs.second_model)


# ---------------------------------------------------------------------------------------------- pickers
def all_strategies() -> dict[str, Strategy]:
    """Every installed strategy (entry points); none installed stops the page with the message."""
    try:
        return load_strategies()
    except UserError as e:
        st.error(str(e))
        st.stop()


def strategy_label(name: str) -> str:
    s = all_strategies().get(name)
    return f"{name} — {s.title}" if s else name


def strategy_select(key: str, default: str = "greedy") -> Strategy:
    names = list(all_strategies())
    name = st.selectbox("Strategy", names, index=names.index(default) if default in names else 0,
                        format_func=strategy_label, key=key)
    return get_strategy(name)


def model_select(registry: Registry, key: str) -> ModelSpec:
    keys = list(registry.models)
    model = st.selectbox("Model", keys, index=keys.index(registry.default), key=key,
                         help="Models come from models.yaml; the default is the embedded SmolLM2-135M-Instruct.")
    spec = registry.get(model)
    st.caption(common.model_caption(spec))
    return spec


def prompt_inputs(spec: ModelSpec, prefix: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> Setup:
    prompt = st.text_area("Prompt", value=DEFAULT_PROMPT, key=f"{prefix}:prompt", height=100)
    c1, c2, c3 = st.columns(3)
    with c1:
        fmt = st.radio("Prompt format", ["chat", "raw"], index=0 if spec.chat else 1, horizontal=True,
                       key=f"{prefix}:format:{spec.key}",
                       help="chat: one user turn in the model's chat template; raw: the text verbatim.")
    with c2:
        n = st.number_input("Max new tokens", min_value=1, max_value=MAX_NEW_TOKENS, value=max_new_tokens, step=1,
                            key=f"{prefix}:max_new_tokens", help=f"1 to {MAX_NEW_TOKENS}.")
    with c3:
        seed = st.number_input("Seed", min_value=0, max_value=JS_INT, value=0, step=1, key=f"{prefix}:seed",
                               help="Every random draw of a run uses its own generator seeded with this.")
    return Setup(prompt=prompt, prompt_format=fmt, max_new_tokens=int(n), seed=int(seed))


# ---------------------------------------------------------------------------------------------- parameters
def _param_help(p: dict) -> str:
    text = p.get("help") or ""
    return f"{text} Range: {p['range']}. Default: {p['default']!r}.".strip()


def param_widget(p: dict, key: str):
    """One widget for one parameter spec from `Strategy.params()`; returns the value (typed, or text for tuples)."""
    name, default, help_ = p["name"], p["default"], _param_help(p)
    choices = p.get("choices")
    if choices:
        options = list(choices)
        return st.selectbox(name, options, index=options.index(default) if default in options else 0, key=key,
                            help=help_)
    if isinstance(default, bool):
        return st.checkbox(name, value=default, key=key, help=help_)
    if isinstance(default, int):
        lo, hi = p.get("lo"), p.get("hi")
        return st.number_input(name, value=int(default), step=1, key=key, help=help_,
                               min_value=None if lo is None else max(-JS_INT, int(math.floor(lo))),
                               max_value=None if hi is None else min(JS_INT, int(math.ceil(hi))))
    if isinstance(default, float):
        lo, hi = p.get("lo"), p.get("hi")
        span = (hi - lo) if lo is not None and hi is not None else None
        step = 0.01 if span is not None and span <= 2 else 0.1
        return st.number_input(name, value=float(default), step=step, format="%g", key=key, help=help_,
                               min_value=None if lo is None else float(lo),
                               max_value=None if hi is None else float(hi))
    if isinstance(default, tuple):
        return st.text_input(name, value=", ".join(str(x) for x in default), key=key, help=help_)
    return st.text_input(name, value="" if default is None else str(default), key=key, help=help_)


def param_form(strategy: Strategy, prefix: str, columns: int = 3) -> dict:
    """Widgets generated from `strategy.params()`; returns name -> value. Values are validated later, once, by
    `declab.run.validate` (through `strategy.make_config`), whose message names the range."""
    specs = strategy.params()
    if not specs:
        st.caption(f"{strategy.name} has no parameters.")
        return {}
    values = {}
    cols = st.columns(min(columns, len(specs)))
    for i, p in enumerate(specs):
        with cols[i % len(cols)]:
            values[p["name"]] = param_widget(p, key=f"{prefix}:{strategy.name}:{p['name']}")
    return values


# ---------------------------------------------------------------------------------------------- declared inputs
def inputs_form(strategy: Strategy, params: dict, spec: ModelSpec, prefix: str) -> Inputs:
    """The inputs the strategy declares: a grammar editor (`takes_grammar`, with `grammar_examples` in a picker),
    a second-model picker (`roles`), a lame prompt (`takes_lame_prompt`)."""
    inputs = Inputs()
    if strategy.takes_grammar:
        examples = dict(strategy.grammar_examples)
        pick = st.selectbox("Built-in grammar", ["(custom)"] + list(examples),
                            key=f"{prefix}:grammar_pick") if examples else "(custom)"
        text = st.text_area("Grammar (EBNF/GBNF)", value=examples.get(pick, ""), key=f"{prefix}:grammar:{pick}",
                            height=140)
        if text.strip():
            inputs.grammar = text
    if strategy.roles:
        inputs.second_model = second_model_input(strategy, params, spec, prefix)
    if strategy.takes_lame_prompt:
        lame = st.text_area("Lame prompt (leave empty to derive it from the prompt)", key=f"{prefix}:lame", height=100)
        if lame.strip():
            inputs.lame_prompt = lame
    return inputs


def second_model_input(strategy: Strategy, params: dict, spec: ModelSpec, prefix: str) -> str | None:
    """The second model (`RunRequest.second_model`) for the roles the current parameters leave open; none when this
    configuration needs no second model or names its own (a parameter naming a models.yaml key)."""
    roles = " / ".join(strategy.roles)
    try:
        needs = strategy.needs(strategy.make_config(params)).models
    except UserError:            # a parameter out of range: the run's validation says which; offer the picker
        open_roles = strategy.roles
    else:
        open_roles = tuple(n.role for n in needs if not n.key)
        if not needs:
            st.caption(f"This configuration of {strategy.name} uses no second model ({roles}).")
            return None
        if not open_roles:
            st.caption("Second model named by the parameters: "
                       + ", ".join(f"{n.role} = {n.key}" for n in needs) + ".")
            return None
    if not spec.pairs:
        st.info(f"Model '{spec.key}' lists no same-tokenizer smaller model under `pairs` in models.yaml, so "
                f"{strategy.name} has no {' / '.join(open_roles)} model to use here.")
        return None
    return st.selectbox(f"Second model ({' / '.join(open_roles)})", list(spec.pairs), key=f"{prefix}:second",
                        help="Same-tokenizer smaller models listed under `pairs` in models.yaml.")
