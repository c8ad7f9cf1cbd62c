"""Tree speculative decoding (docs/strategies.md#spec_tree) end to end: greedy output equals target greedy for every
drafter and tree shape, branching 1 is chain speculative decoding token for token, every stochastic verifier keeps
the warped target distribution through the whole strategy, the trace and metrics agree with each other, bad settings
are refused, the CLI runs it with the default pair; on the embedded model with its draft, greedy identity."""

from __future__ import annotations

import json

import pytest
import torch

from declab.cli import main as cli_main
from declab.core import UserError, get_strategy
from declab.core.sampling import warp
from declab.run import Run, RunRequest
from tests.fake import FakeLM, drafted_logits, hashed_logits, no_eos

DRAFTERS = ("model", "aded", "token_recycling", "lookahead", "prompt_lookup")
TOY_VOCAB = ("</s>", " a", " b", " c", " d", " e")
NEG = float("-inf")
P_TOY = [NEG, 2.0, 1.0, 0.5, -1.0, 0.0]
Q_TOY = [NEG, -1.0, 0.0, 2.5, 1.5, -2.0]
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47}


def pair(noise: float = 1.0):
    V = len(FakeLM().vocab)
    return FakeLM(no_eos(hashed_logits(V))), FakeLM(no_eos(drafted_logits(V, noise)), key="fake-draft")


def run(lm, draft=None, strategy="spec_tree", prompt=" the cat sat on the mat", n=40, seed=0, **params):
    if strategy in ("spec_tree", "speculative"):
        params.setdefault("measure_speedup", False)
    return Run(lm, RunRequest(model=lm.key, strategy=strategy, prompt=prompt, params=params, max_new_tokens=n,
                              seed=seed), models={"draft": draft} if draft is not None else {}).run_to_end()


def ids(res):
    return res.sequences[0].token_ids


@pytest.fixture
def one_thread():
    """Tiny tensors: keep torch from paying thread synchronisation on every op (much faster on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("drafter", DRAFTERS)
@pytest.mark.parametrize("branching,budget", [(1, 4), (2, 8), (3, 16)])
def test_greedy_output_is_target_greedy_for_every_drafter_and_shape(fake_registry, drafter, branching, budget):
    target, draft = pair()
    greedy = ids(run(target, strategy="greedy"))
    res = run(target, draft, drafter=drafter, branching=branching, tree_budget=budget)
    assert res.status == "ok" and ids(res) == greedy
    m = res.meta["metrics"]
    assert m["target_forwards"] == m["rounds"] and m["mean_accepted_length"] >= 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("warpers", [{"temperature": 1.0}, {"temperature": 0.7, "top_k": 8, "top_p": 0.9}])
def test_branching_one_is_chain_speculative_sampling_token_for_token(fake_registry, seed, warpers):
    target, draft = pair(noise=1.5)
    chain = run(target, draft, strategy="speculative", seed=seed, num_draft_tokens=3, **warpers)
    tree = run(target, draft, seed=seed, branching=1, tree_depth=3, tree_budget=3, **warpers)
    assert ids(tree) == ids(chain) and len(ids(tree)) == 40
    assert tree.meta["metrics"]["accepted"] == chain.meta["metrics"]["accepted"]


def constant_pair():
    p, q = torch.tensor(P_TOY), torch.tensor(Q_TOY)
    return FakeLM(lambda c: p, vocab=TOY_VOCAB), FakeLM(lambda c: q, vocab=TOY_VOCAB, key="toy-draft")


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a token with zero target probability was emitted"
    expected = counts.sum() * probs[keep]
    return float(((counts[keep] - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("verify,drafter", [("multi_round", "model"), ("spectr", "model"), ("rsd", "model"),
                                            ("multi_round", "prompt_lookup")])
def test_every_stochastic_verifier_keeps_the_warped_target_distribution(monkeypatch, tmp_path, one_thread, verify,
                                                                      drafter):
    """p and q are constant, so every emitted token is an independent draw from the warped p, whatever the tree
    held and whichever child was accepted, resampled or added as bonus."""
    target, draft = constant_pair()
    registry = tmp_path / "toy.yaml"
    registry.write_text("default: fake\nmodels:\n  fake: {source: {fake: default}, chat: false, context_length: 4096, "
                        "pairs: [toy-draft]}\n  toy-draft: {source: {fake: draft}, chat: false, "
                        "context_length: 4096}\n")
    monkeypatch.setenv("DECLAB_MODELS", str(registry))
    warpers = {"temperature": 0.8, "top_p": 0.95}
    res = Run(target, RunRequest(model="fake", strategy="spec_tree", prompt=" a b", max_new_tokens=1500, seed=5,
                                 params=dict(drafter=drafter, verify=verify, branching=3, tree_budget=9, tree_depth=3,
                                             measure_speedup=False, **warpers)),
              models={"draft": draft}).run_to_end()
    out = ids(res)
    assert len(out) == 1500
    p = warp(torch.tensor(P_TOY), warpers["temperature"], 0, warpers["top_p"]).softmax(-1)
    counts = torch.bincount(torch.tensor(out), minlength=len(TOY_VOCAB)).float()
    assert chi_square(counts, p) < CHI2_999[int((p > 0).sum()) - 1], (counts, p)
    tok = res.frame[res.frame.kind == "token"]
    assert (tok.origin == "resampled").sum() > 30 and (tok.origin == "accepted").sum() > 30


def test_trace_and_metrics_agree(fake_registry):
    target, draft = pair()
    res = run(target, draft, branching=2, tree_budget=6, tree_depth=3, n=30)
    f, m = res.frame, res.meta["metrics"]
    prop, verdicts, tok = f[f.kind == "propose"], f[f.kind.isin(["accept", "reject"])], f[f.kind == "token"]
    assert len(prop) == len(verdicts) == m["drafted"] and prop.groupby("round").size().max() <= 6
    assert (prop.depth <= 3).all() and set(verdicts.verdict) <= {"accepted", "rejected", "unverified"}
    assert int((verdicts.verdict == "accepted").sum()) == m["accepted"] == int((tok.origin == "accepted").sum())
    assert m["rounds"] == tok["round"].nunique() and m["mean_accepted_length"] == pytest.approx(len(tok) / m["rounds"])
    assert m["tree_nodes_mean"] == pytest.approx(m["drafted"] / m["rounds"], abs=1e-4)
    # acceptance at depth d, re-derived: rounds whose accepted path reached d / rounds that reached d-1 with a d node
    reach = tok[tok.origin == "accepted"].groupby("round").size().reindex(range(m["rounds"]), fill_value=0)
    for d, rate in m["acceptance_by_depth"].items():
        d = int(d)
        offered = [r for r in range(m["rounds"]) if reach[r] >= d - 1 and (prop[prop["round"] == r].depth == d).any()]
        assert rate == pytest.approx(sum(reach[r] >= d for r in offered) / len(offered), abs=1e-4)
    # every round's accepted tokens form one root-to-leaf path of its tree
    for r, grp in tok[tok.origin == "accepted"].groupby("round"):
        nodes = list(grp.node)
        parents = dict(zip(prop[prop["round"] == r].node, prop[prop["round"] == r].parent_id))
        assert parents[nodes[0]] == 0 and all(parents[b] == a for a, b in zip(nodes, nodes[1:]))


def test_bad_settings_are_refused(fake_registry):
    strat = get_strategy("spec_tree")
    with pytest.raises(UserError, match="verify must be auto or greedy when temperature is 0"):
        strat.make_config({"verify": "spectr"})
    with pytest.raises(UserError, match="needs temperature 0"):
        strat.make_config({"verify": "greedy", "temperature": 0.5})
    with pytest.raises(UserError, match="drafter must be one of"):
        strat.make_config({"drafter": "oracle"})
    with pytest.raises(UserError, match=r"tree_budget must be in \[1, 64\]"):
        strat.make_config({"tree_budget": 65})
    assert strat.needs(strat.make_config({"drafter": "aded"})).models == ()


def test_cli_runs_spec_tree_with_the_default_pair(fake_registry, tmp_path):
    out = tmp_path / "t.json"
    assert cli_main(["run", "--strategy", "spec_tree", "--prompt", " the cat", "--max-new-tokens", "12", "--set",
                     "branching=2", "--set", "measure_speedup=false", "--json", str(out), "--quiet"]) == 0
    data = json.loads(out.read_text())
    assert data["metrics"]["drafter"] == "fake-draft" and len(data["sequences"][0]["token_ids"]) == 12


@pytest.mark.model
def test_greedy_spec_tree_equals_target_greedy_on_the_embedded_model(real_lm, draft_lm):
    prompt = "Rewrite this sentence in the past tense: The cat sits on the mat and looks at the birds."

    def go(strategy, **params):
        return Run(real_lm, RunRequest(model=real_lm.key, strategy=strategy, prompt=prompt, prompt_format="chat",
                                       params=dict(params, **({"measure_speedup": False} if strategy != "greedy"
                                                              else {})), max_new_tokens=24),
                   models={"draft": draft_lm}).run_to_end()
    greedy = ids(go("greedy"))
    for drafter, branching in [("model", 1), ("model", 3), ("aded", 2), ("token_recycling", 2), ("lookahead", 2),
                               ("prompt_lookup", 2)]:
        res = go("spec_tree", drafter=drafter, branching=branching, tree_budget=8)
        assert ids(res) == greedy, (drafter, branching)
