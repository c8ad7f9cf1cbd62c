"""The engine contract (declab/core, declab/run): strategies declare what a run needs and the engine provides it,
validated once and resolved by role; the per-token loop's Selector interface; typed metadata; the run service."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from declab.cli import main as cli_main
from declab.core import ModelNeed, Needs, RunInputs, Strategy, UserError, get_strategy, load_strategies, register
from declab.core.loop import Choice, Selector, token_loop
from declab.core.meta import CLI_JSON_KEYS, SCHEMA_VERSION, RunMeta
from declab.core.metrics import SpeculativeMetrics
from declab.run import Run, RunRequest, validate
from declab.run.service import Job, RunService
from declab.run.store import open_store
from tests.fake import FakeLM


# ------------------------------------------------------------------------------------------------ needs and plans
def test_every_strategy_declares_its_inputs_and_needs_a_config_can_ask_for(fake_registry):
    strategies = load_strategies()
    assert len(strategies) == 18             # issue 19 added sampler_chain, cautious, adadec
    roles = {name: s.roles for name, s in strategies.items() if s.roles}
    assert roles == {"speculative": ("draft",), "spec_tree": ("draft",), "ead": ("small",), "contrastive": ("amateur",)}
    assert {n for n, s in strategies.items() if s.takes_grammar} == {"gcd", "asap"}
    assert {n for n, s in strategies.items() if s.takes_lame_prompt} == {"uscd"}
    spec = get_strategy("speculative")
    assert spec.needs(spec.make_config({"draft": "ngram"})) == Needs()
    assert spec.needs(spec.make_config({"draft": "fake-draft"})).models == (ModelNeed("draft", "fake-draft"),)
    assert get_strategy("greedy").needs(get_strategy("greedy").make_config()) == Needs()


def test_register_refuses_an_unknown_role():
    with pytest.raises(TypeError, match="unknown role"):
        @register
        class Bad(Strategy):
            name, title, roles = "bad-role", "bad", ("teacher",)
            Config = get_strategy("greedy").Config


def test_the_plan_names_second_models_by_role_and_no_model_free_drafter_loads_one(fake_registry):
    plan = validate(RunRequest(model="fake", strategy="speculative", prompt=" the cat"))
    assert plan.models == {"draft": "fake-draft"}                       # the model's first pair
    plan = validate(RunRequest(model="fake", strategy="ead", prompt=" the cat", second_model="fake"))
    assert plan.models == {"small": "fake"}                             # the picked second model
    plan = validate(RunRequest(model="fake", strategy="speculative", prompt=" the cat",
                               params={"draft": "prompt_lookup"}))
    assert plan.models == {}

    def no_loading(key):
        raise AssertionError(f"loaded {key}")
    res = Run(FakeLM(), plan, load=no_loading).run_to_end()             # nothing to load: the drafter is model-free
    assert res.status == "ok" and res.meta["models"] == {}
    with pytest.raises(UserError, match="unknown model 'nope'"):
        validate(RunRequest(model="fake", strategy="contrastive", prompt="x", params={"amateur": "nope"}))


def test_one_cli_run_validates_once_and_parses_its_grammar_once(fake_registry, monkeypatch, tmp_path):
    import xgrammar as xg

    import declab.cli as cli
    calls = {"validate": 0, "parse": 0}
    real_validate, real_parse = cli.validate, xg.Grammar.from_ebnf

    def counting_validate(*a, **k):
        calls["validate"] += 1
        return real_validate(*a, **k)

    def counting_parse(*a, **k):
        calls["parse"] += 1
        return real_parse(*a, **k)
    monkeypatch.setattr(cli, "validate", counting_validate)
    monkeypatch.setattr(xg.Grammar, "from_ebnf", staticmethod(counting_parse))
    g = tmp_path / "g.ebnf"
    g.write_text('root ::= " x" | " y"\n')
    assert cli_main(["run", "--strategy", "gcd", "--prompt", " the cat", "--grammar-file", str(g), "--set",
                     "num_samples=2", "--max-new-tokens", "4", "--no-store", "--quiet"]) == 0
    assert calls == {"validate": 1, "parse": 1}


def test_the_resolver_refuses_a_second_model_with_another_tokenizer(fake_registry):
    other = FakeLM(vocab=("</s>", " a", " b"), key="fake-draft")
    with pytest.raises(UserError, match="share a tokenizer"):
        Run(FakeLM(), RunRequest(model="fake", strategy="ead", prompt=" the cat"), models={"small": other})


# ------------------------------------------------------------------------------------------------ the loop
class Counting(Selector):
    """Argmax that counts its calls: reset once, apply and accept once per emitted token."""

    def __init__(self):
        self.calls = {"reset": 0, "apply": 0, "accept": []}

    def reset(self):
        self.calls["reset"] += 1

    def apply(self, logits, step):
        self.calls["apply"] += 1
        token = int(logits.argmax())
        return Choice(token, 0.5, {"seen": step})

    def accept(self, token):
        self.calls["accept"].append(token)


def test_the_loop_calls_the_selector_like_llama_cpps_sampler(fake_lm):
    from declab.core import RunContext
    from declab.core.sampling import make_generator
    from declab.core.trace import Trace
    ctx = RunContext(lm=fake_lm, prompt_ids=[1, 2], max_new_tokens=6, seed=0, generator=make_generator(0, "cpu"),
                     trace=Trace("t", "x", fake_lm.key))
    sel = Counting()
    gen = token_loop(ctx, sel)
    try:
        while True:
            next(gen)
    except StopIteration as done:
        seqs = done.value
    rows = ctx.trace.frame()
    tok = rows[rows.kind == "token"]
    assert sel.calls["reset"] == 1 and sel.calls["apply"] == len(tok)
    assert sel.calls["accept"] == tok.token_id.astype(int).tolist()       # every emitted token, EOS included
    assert tok.seen.tolist() == list(range(len(tok)))                      # the selector's own columns
    assert seqs[0].score == pytest.approx(tok.logprob.sum())               # the model's log-likelihood by default


def test_mirostat_commits_mu_only_when_the_token_is_accepted():
    from strategies.mirostat import Controller, MirostatConfig
    c = Controller(MirostatConfig(tau=3.0, eta=1.0), 50, torch.Generator().manual_seed(0))
    logits = torch.randn(50, generator=torch.Generator().manual_seed(1))
    first = c.apply(logits)
    again = c.apply(logits)                                              # not accepted: mu has not moved
    assert first.columns["mu"] == again.columns["mu"] == 6.0
    c.accept(again.token)
    assert c.mu == again.columns["mu_after"] != 6.0


# ------------------------------------------------------------------------------------------------ typed metadata
def test_run_metadata_is_typed_versioned_and_the_cli_json_keeps_its_keys(fake_registry, fake_lm, tmp_path):
    res = Run(fake_lm, RunRequest(model="fake", strategy="speculative", prompt=" the cat", max_new_tokens=8,
                                  params={"measure_speedup": False})).run_to_end()
    meta = RunMeta.from_dict(res.meta)
    assert meta.schema == SCHEMA_VERSION and meta.models == {"draft": "fake-draft"}
    assert meta.to_dict() == res.meta                                      # a lossless round trip
    for name in ("acceptance_rate", "mean_accepted_length", "rounds"):      # measured, and defined in the docstring
        assert name in res.meta["metrics"] and name in SpeculativeMetrics.__doc__
    out = tmp_path / "r.json"
    assert cli_main(["run", "--strategy", "greedy", "--prompt", " the cat", "--max-new-tokens", "4", "--json",
                     str(out), "--no-store", "--quiet"]) == 0
    data = json.loads(out.read_text())
    assert tuple(data) == CLI_JSON_KEYS and set(data["sequences"][0]) == {"text", "token_ids", "score"}


def test_foreign_metadata_reads_as_text_and_keeps_unknown_keys():
    m = RunMeta.from_dict({"strategy": {"x": 1}, "model": 3, "seed": "7", "metrics": "?", "sequences": "no",
                           "future_key": [1, 2]})
    assert m.strategy == "{'x': 1}" and m.model == "3" and m.seed is None and m.metrics == {}
    assert m.sequences == [] and m.schema == 0 and m.to_dict()["future_key"] == [1, 2]
    # a stem is a file name: safe characters only (issue 23)
    assert RunMeta.from_dict(None).strategy == "?" and RunMeta().stem == "declab-_-trace"


# ------------------------------------------------------------------------------------------------ the run service
def test_the_service_stops_on_stop_and_stores_what_each_run_made(fake_registry, tmp_store, monkeypatch):
    monkeypatch.setenv("DECLAB_FAKE_DELAY", "0")
    lm = FakeLM(delay_s=0.02)
    runs = [Run(lm, RunRequest(model="fake", strategy="greedy", prompt=" the cat", max_new_tokens=200))
            for _ in range(2)]
    service = RunService([Job("a", runs[0]), Job("b", runs[1])], kind="test", source="test").start()
    deadline = threading.Event()
    while len(runs[0].latest) < 3 and not deadline.wait(0.01):
        pass
    service.stop()
    service.wait()
    assert [r.result.status for r in runs] == ["stopped", "stopped"]
    assert 3 <= len(runs[0].result.sequences[0].token_ids) < 200 and runs[1].result.sequences[0].token_ids == []
    stored = open_store(tmp_store).list()
    assert sorted(r["status"] for r in stored) == ["stopped", "stopped"] and {r["source"] for r in stored} == {"test"}


def test_strategies_receive_completed_inputs(fake_registry):
    plan = validate(RunRequest(model="fake", strategy="asap", prompt=" the cat"))
    assert isinstance(plan.inputs, RunInputs) and plan.inputs.grammar_name == "json"
    assert plan.inputs.grammar.strip().startswith(("root", "#"))
    plan = validate(RunRequest(model="fake", strategy="uscd", prompt=" the cat", lame_prompt=" a dog"))
    assert plan.inputs.lame_prompt == " a dog" and plan.inputs.prompt_format == "raw"
