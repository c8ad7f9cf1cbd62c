"""Trained drafting heads (issue 18): Medusa, Hydra, EAGLE as spec_tree drafters (strategies/head_drafters.py),
their modules and files (declab/models/heads.py)."""

from __future__ import annotations

import json

from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from declab.cli import main as cli_main
from declab.core import UserError
from declab.core.tree import DraftTree
from declab.core.verify import typical_threshold, verify_typical
from declab.models.heads import (HEAD_KINDS, EagleLayer, HydraHeads, MedusaHeads, eagle_config, heads_file,
                                 load_heads, prepare)
from declab.run import observatory as obs
from declab.run import Run, RunRequest
from strategies.head_drafters import EagleDrafter, HydraDrafter, MedusaDrafter, beam_tree

KINDS = ("medusa", "hydra", "eagle")
HOME = Path(__file__).resolve().parent.parent / "app" / "Home.py"
PROMPTS = ("Rewrite this sentence in the past tense: The cat sits on the mat and looks at the birds.",
           "Give me three interesting facts about lighthouses.")


def prefix_closed(tree: DraftTree) -> bool:
    return all(tree.parent[u] < u and tree.depth[u] == tree.depth[tree.parent[u]] + 1 for u in range(1, len(tree)))


def test_medusa_heads_with_zero_weights_reproduce_the_base_logits():
    torch.manual_seed(0)
    heads = MedusaHeads(16, num_heads=3)
    for block in heads.heads:
        torch.nn.init.zeros_(block[0].linear.bias)            # W = 0 from the start; b = 0 too: the identity
    lm_head = torch.randn(50, 16)
    f = torch.randn(5, 16)
    out = heads(f)                                            # [3, 5, 16]
    assert out.shape == (3, 5, 16)
    for k in range(3):
        assert torch.equal(out[k] @ lm_head.T, f @ lm_head.T)
    # distinct modules per head (the [ResBlock] * n pitfall would share one)
    assert len({id(b[0].linear.weight) for b in heads.heads}) == 3


def test_hydra_head_starts_as_the_base_head_and_reads_its_path():
    torch.manual_seed(0)
    heads = HydraHeads(8, num_heads=3)
    f, emb = torch.randn(4, 8), torch.randn(4, 2, 8)
    assert torch.allclose(heads.forward_head(2, f, emb), f + torch.nn.functional.silu(heads.heads[1].linear.bias))
    assert heads.heads[2].linear.in_features == 8 * 4        # head i reads H (i + 1)


def test_medusa_tree_template_is_prefix_closed_and_within_the_shape():
    drafter = MedusaDrafter.__new__(MedusaDrafter)
    drafter.info = {"held_out": {"rank_accuracy": [[0.6, 0.2, 0.1, 0.05], [0.4, 0.2, 0.1, 0.05],
                                                   [0.3, 0.2, 0.1, 0.05]]}}
    drafter.module = MedusaHeads(4, num_heads=3)
    for budget, depth, branching in [(8, 3, 2), (12, 2, 4), (1, 3, 3), (20, 3, 1)]:
        paths = drafter.template(budget, depth, branching)
        assert len(paths) == min(budget, sum(branching ** d for d in range(1, depth + 1)))
        assert all(len(p) <= depth and max(p) < branching for p in paths)
        assert all(p[:-1] == () or p[:-1] in paths[:i] for i, p in enumerate(paths))   # parents come first
        values = [torch.tensor([drafter.info["held_out"]["rank_accuracy"][d][c] for d, c in enumerate(p)]).prod()
                  for p in paths]
        assert all(a >= b - 1e-9 for a, b in zip(values, values[1:]))                 # best-first


def test_eagle2_beam_tree_keeps_the_best_nodes_prefix_closed():
    table = {(): [(1, 0.7), (2, 0.2), (3, 0.1)], (1,): [(4, 0.9), (5, 0.1)], (2,): [(6, 0.99), (7, 0.01)],
             (1, 4): [(8, 0.5), (9, 0.5)], (2, 6): [(10, 0.99), (13, 0.01)]}

    def expand(frontier, d):
        rows = [table.get(path, [(99, 1e-6), (98, 1e-6)]) for _c, path, _k in frontier]
        return (torch.tensor([[t for t, _ in r[:2]] for r in rows]), torch.tensor([[p for _, p in r[:2]] for r in rows]))

    tree = DraftTree.rooted(0)
    beam_tree(tree, expand, budget=5, depth=3, branching=2, eos_ids=frozenset(), source="t")
    assert prefix_closed(tree) and len(tree) - 1 == 5
    paths = {tuple(tree.tokens[u] for u in tree.path_to(v)[1:]) for v in range(1, len(tree))}
    # cumulative q: 1:.7, 1-4:.63, 1-4-8/9:.315, 2:.2, 2-6:.198 -> the five best
    assert paths == {(1,), (1, 4), (1, 4, 8), (1, 4, 9), (2,)}


@pytest.mark.model
@pytest.mark.parametrize("kind", KINDS)
def test_the_stored_heads_load_with_their_numbers(real_lm, kind):
    path = heads_file(real_lm, kind)
    assert path.stat().st_size <= 10_000_000
    tensors, info = load_heads(path)
    assert info["kind"] == kind and info["train_s"] <= 20 * 60
    acc = info["held_out"]["top1_by_offset"]
    assert len(acc) >= 3 and all(0.0 <= a <= 1.0 for a in acc) and acc[0] > 0.1      # untrained: about 0.01
    drafter = {"medusa": MedusaDrafter, "hydra": HydraDrafter, "eagle": EagleDrafter}[kind](real_lm)
    lm_head = real_lm.model.get_output_embeddings().weight
    vocab = tensors["draft_vocab_ids"]
    assert torch.equal(drafter.head.linear.weight, lm_head[vocab])                    # the target's frozen head rows
    assert not any(p.requires_grad for p in drafter.module.parameters())


@pytest.mark.model
def test_greedy_spec_tree_with_every_head_equals_target_greedy(real_lm):
    def go(prompt, strategy, **params):
        return Run(real_lm, RunRequest(model=real_lm.key, strategy=strategy, prompt=prompt, prompt_format="chat",
                                       params=params, max_new_tokens=24)).run_to_end()
    for i, prompt in enumerate(PROMPTS):
        greedy = go(prompt, "greedy").sequences[0].token_ids
        for kind in KINDS:
            for branching, budget in ((1, 4), (3, 12))[: 2 if i == 0 else 1]:      # both shapes, then the chain
                res = go(prompt, "spec_tree", drafter=kind, branching=branching, tree_budget=budget, tree_depth=4,
                         measure_speedup=False)
                assert res.sequences[0].token_ids == greedy, (kind, branching)
                assert res.meta["metrics"]["mean_accepted_length"] > 1.0, (kind, branching)


@pytest.mark.model
def test_eagle_tree_features_equal_those_of_a_chain_along_each_path(real_lm):
    """The drafter's tree mask: a node's predicted feature drafted inside a tree equals the one drafted along its
    own path alone."""
    torch.manual_seed(0)
    module = EagleLayer(eagle_config(real_lm.model.config))
    drafter = EagleDrafter(real_lm, prepare(real_lm, "eagle", module, {}, None))
    seq = real_lm.encode_prompt("Name three colours.", "chat")
    out = real_lm.prefill(seq[:-1], hidden=True)
    captured = {}
    original = drafter.layer

    def spy(embeds, feats, positions, mask=None):
        res = original(embeds, feats, positions, mask)
        captured.setdefault("calls", []).append((positions, res[0].clone()))
        return res
    drafter.layer = spy
    drafter.reset(seq)
    drafter.take_states(0, out.hidden[0])
    tree = drafter.propose(seq, budget=10, depth=3, branching=3, generator=None)
    assert len(tree) > 4 and prefix_closed(tree)
    tree_calls = captured.pop("calls")
    # the same nodes along one path, as a chain (branching 1, the top-1 path)
    drafter.reset(seq)
    drafter.take_states(0, out.hidden[0])
    chain = drafter.propose(seq, budget=3, depth=3, branching=1, generator=None)
    chain_calls = captured.pop("calls")
    assert chain.tokens[1] == tree.tokens[tree.children[0][0]]
    # depth-2 feature of the top-1 child: row 0 of the tree's depth-2 call == the chain's depth-2 call
    assert torch.allclose(tree_calls[1][1][0], chain_calls[1][1][0], atol=1e-4)


def test_a_head_drafter_on_a_model_without_heads_is_a_clear_error(fake_registry, tmp_path, capsys):
    code = cli_main(["run", "--model", "fake", "--strategy", "spec_tree", "--prompt", " the cat", "--max-new-tokens",
                     "4", "--set", "drafter=medusa", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no trained drafting heads" in err[0]


def test_typical_acceptance_keeps_the_longest_typical_path():
    """Medusa's typical acceptance (D.1): epsilon = delta = 0 accepts every drafted node with p > 0, so the longest
    path is kept; thresholds cut low-probability drafts; the final token never comes from below the threshold."""
    V = 6
    tree = DraftTree.rooted(0)
    a = tree.add(0, 1)
    b = tree.add(0, 2)
    a1 = tree.add(a, 3)
    b1 = tree.add(b, 4)
    b2 = tree.add(b1, 5)
    p = torch.full((len(tree), V), 0.01)
    p[0, 1], p[0, 2] = 0.6, 0.05           # root: node a typical, node b only above a zero threshold
    p[a, 3] = 0.9
    p[b, 4], p[b1, 5] = 0.9, 0.9
    p = p / p.sum(-1, keepdim=True)
    gen = torch.Generator().manual_seed(0)
    res = verify_typical(tree, p, gen, epsilon=0.0, delta=0.0)
    assert res.path == [0, b, b1, b2] and res.verdicts[b2] == "accepted" and res.verdicts[a] == "rejected"
    res = verify_typical(tree, p, gen)                                   # Medusa's 0.09 / 0.3
    assert res.path == [0, a, a1] and res.verdicts[b] == "rejected"
    th = typical_threshold(p[a1])
    for seed in range(20):
        r = verify_typical(tree, p, torch.Generator().manual_seed(seed))
        assert float(p[a1, r.final_token]) > th


def test_typical_verification_is_offered_and_marked_lossy(fake_registry, tmp_path):
    out = tmp_path / "run.json"
    assert cli_main(["run", "--model", "fake", "--strategy", "spec_tree", "--prompt", " the cat", "--max-new-tokens",
                     "8", "--set", "drafter=prompt_lookup", "--set", "temperature=1", "--set", "verify=typical",
                     "--set", "measure_speedup=false", "--json", str(out), "--quiet"]) == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["target_exact"] is False
    assert cli_main(["run", "--model", "fake", "--strategy", "spec_tree", "--prompt", " the cat", "--max-new-tokens",
                     "4", "--set", "verify=typical", "--quiet"]) == 2          # needs temperature > 0


@pytest.mark.model
def test_every_trained_drafter_runs_from_the_app_and_the_observatory_shows_their_accuracy(real_lm):
    at = AppTest.from_file(str(HOME), default_timeout=120).run()
    at.selectbox(key="run:strategy").set_value("spec_tree").run()
    at.number_input(key="run:max_new_tokens").set_value(8)
    at.checkbox(key="run:spec_tree:measure_speedup").uncheck()
    for kind in HEAD_KINDS:
        at.selectbox(key="run:spec_tree:drafter").set_value(kind).run()
        at.button(key="run:go").click().run()
        assert not at.exception, [e.value for e in at.exception]
        assert not [e.value for e in at.error], [e.value for e in at.error]
        rec = at.session_state["declab_runs"][-1]
        assert rec.meta["metrics"]["drafter"] == kind and len(rec.meta["metrics"]) > 3
    at.switch_page("views/drafters.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.multiselect(key="drf:drafters").value == list(obs.legal_drafters())   # the embedded model has them all
    charts = [c for c in at.get("plotly_chart") if "Held-out top-1" in c.proto.spec]
    assert len(charts) == 1


@pytest.mark.model
def test_speculative_takes_the_trained_drafters_as_chains(real_lm):
    """`speculative --set draft=<trained drafter>` is spec_tree's chain (branching 1): the same tokens, the same
    rounds; an adaptive rule the chain cannot follow is refused."""
    def go(strategy, **params):
        return Run(real_lm, RunRequest(model=real_lm.key, strategy=strategy, prompt=PROMPTS[1], prompt_format="chat",
                                       params=dict(params, measure_speedup=False), max_new_tokens=24)).run_to_end()
    for kind in ("hydra", "kangaroo"):
        spec = go("speculative", draft=kind, num_draft_tokens=4)
        tree = go("spec_tree", drafter=kind, branching=1, tree_budget=4, tree_depth=4)
        assert spec.status == "ok" and spec.sequences[0].token_ids == tree.sequences[0].token_ids
        assert spec.meta["metrics"]["rounds"] == tree.meta["metrics"]["rounds"]
    with pytest.raises(UserError, match="adaptive"):
        Run(real_lm, RunRequest(model=real_lm.key, strategy="speculative", prompt="hi",
                                params={"draft": "medusa", "adaptive": "specdec"}, max_new_tokens=4))
