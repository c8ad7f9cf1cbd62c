"""Model-free tree drafters of spec_tree (strategies/tree_drafters.py; docs/strategies.md#spec_tree): tree shape limits, determinism, table updates by hand on tiny sequences, repeated passages, and a
scripted greedy tree-verification loop (no model) whose output must equal the script's greedy continuation.
"""

from __future__ import annotations

import pytest
import torch

from declab.core.errors import UserError
from declab.core.tree import DraftTree
from strategies.speculative import PromptLookupDrafter
from strategies.tree_drafters import (AdedDrafter, LookaheadDrafter, PromptLookupTreeDrafter, TokenRecyclingDrafter,
                                      TREE_DRAFTERS, drafter_params, insert_branch, make_tree_drafter,
                                      rank_template)

V = 24
EOS = 0


def check_tree(tree: DraftTree, budget: int, depth: int, branching: int) -> None:
    """Budget / depth / branching respected, topological and prefix-closed, siblings distinct, point masses."""
    assert tree.scheme == "deterministic"
    assert tree.parent[0] == -1 and tree.depth[0] == 0
    assert len(tree) - 1 <= budget
    for u in range(1, len(tree)):
        p = tree.parent[u]
        assert 0 <= p < u
        assert tree.depth[u] == tree.depth[p] + 1 <= depth
        assert u in tree.children[p]
        assert tree.multiplicity[u] == 1 and tree.q[u] == 1.0
        assert tree.tokens[p] != EOS or p == 0             # nothing proposed after an EOS
    for u in range(len(tree)):
        kids = tree.children[u]
        assert len(kids) <= branching
        assert len({tree.tokens[c] for c in kids}) == len(kids)
        assert all(tree.parent[c] == u for c in kids)


def branches(tree: DraftTree) -> list[list[int]]:
    """Token paths (root excluded) to every leaf, in node order."""
    return [[tree.tokens[v] for v in tree.path_to(leaf)[1:]] for leaf in tree.leaves() if leaf != 0]


def first_branch(tree: DraftTree) -> list[int]:
    out, u = [], 0
    while tree.children[u]:
        u = tree.children[u][0]
        out.append(tree.tokens[u])
    return out


def make(name: str, **kw):
    return make_tree_drafter(name, V, [EOS], **kw)


# -------------------------------------------------------------------------------- a scripted greedy target
TABLE = torch.randn(V, V, V, generator=torch.Generator().manual_seed(7))
TABLE[:, :, EOS] = -1e9                                 # never ends: runs go to their length


PHASE = torch.randn(11, V, V, generator=torch.Generator().manual_seed(8))


def target_logits(context: list[int]) -> torch.Tensor:
    """Deterministic [V] logits of the last two tokens (greedy text becomes periodic: drafters can learn it)."""
    a = context[-2] if len(context) > 1 else 1
    return TABLE[a, context[-1]]


def drifting_logits(context: list[int]) -> torch.Tensor:
    """The same plus a term of the position mod 11: a text drafters only partly predict."""
    return target_logits(context) + 1.5 * PHASE[len(context) % 11, context[-1]]


def greedy(prompt: list[int], n: int, fn=target_logits) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(fn(seq).argmax()))
    return seq[len(prompt):]


def verify_loop(drafter, prompt: list[int], n: int, budget: int, depth: int, branching: int, seed: int = 0,
                fn=target_logits):
    """Greedy tree verification (A.4) against the script `fn`; returns (emitted tokens, trees)."""
    g = torch.Generator().manual_seed(seed)
    drafter.reset(list(prompt))
    seq, trees = list(prompt), []
    while len(seq) - len(prompt) < n:
        tree = drafter.propose(list(seq), budget, depth, branching, g)
        check_tree(tree, budget, depth, branching)
        assert tree.tokens[0] == seq[-1]
        trees.append((list(tree.tokens), list(tree.parent)))
        logits = torch.stack([fn(seq[:-1] + [tree.tokens[v] for v in tree.path_to(u)])
                              for u in range(len(tree))])                      # [N, V]
        u, path = 0, [0]
        while True:
            c = tree.child_with(u, int(logits[u].argmax()))
            if c is None:
                break
            path.append(c)
            u = c
        seq += [tree.tokens[v] for v in path[1:]] + [int(logits[u].argmax())]
        drafter.observe(list(seq), tree, logits, path)
    return seq[len(prompt):][:n], trees


PROMPT = [3, 5, 7, 9, 11, 3, 5, 8, 13, 2, 4, 6, 3, 5, 7, 10]


@pytest.mark.parametrize("name", sorted(TREE_DRAFTERS))
@pytest.mark.parametrize("shape", [(16, 4, 4), (8, 3, 2), (5, 6, 1), (0, 4, 4), (3, 1, 8)])
@pytest.mark.parametrize("fn", [target_logits, drifting_logits], ids=["periodic", "drifting"])
def test_loop_shape_exactness_determinism(name, shape, fn):
    budget, depth, branching = shape
    out, trees = verify_loop(make(name), PROMPT, 40, budget, depth, branching, seed=3, fn=fn)
    assert out == greedy(PROMPT, 40, fn)                 # verification keeps target greedy, whatever the drafts
    out2, trees2 = verify_loop(make(name), PROMPT, 40, budget, depth, branching, seed=3, fn=fn)
    assert trees2 == trees                              # same seed -> same drafts
    if budget and fn is drifting_logits:
        assert any(len(t) > 1 for t, _ in trees)        # something was drafted


@pytest.mark.parametrize("name", sorted(TREE_DRAFTERS))
def test_drafters_speed_up_a_periodic_target(name):
    out, trees = verify_loop(make(name), PROMPT, 80, 16, 4, 4)
    tau = 80 / len(trees)
    assert tau > 1.3, f"{name}: {tau:.2f} tokens per round"


@pytest.mark.parametrize("name", sorted(TREE_DRAFTERS))
def test_repeated_passage_is_proposed(name):
    passage = [4, 9, 2, 15, 7, 11, 20, 6]
    text = [1, 3] + passage + [12, 13, 14, 16, 17] + passage[:3]
    d = make(name)
    d.reset(text)
    if name == "token_recycling":                       # the target's logits along the passage fill M
        chain = DraftTree.rooted(passage[0])
        for t in passage[1:]:
            chain.add(len(chain) - 1, t)
        logits = torch.zeros(len(passage), V)
        for u, nxt in enumerate(passage[1:] + [1]):
            logits[u, nxt] = 5.0
        d.observe(text, chain, logits, [0])
    tree = d.propose(text, 16, 4, 4, torch.Generator().manual_seed(0))
    check_tree(tree, 16, 4, 4)
    assert first_branch(tree)[:4] == passage[3:7]


def test_empty_when_nothing_to_propose():
    for name in TREE_DRAFTERS:
        d = make(name)
        d.reset([5])
        tree = d.propose([5], 16, 4, 4, torch.Generator().manual_seed(0))
        assert len(tree) == 1 and tree.tokens == [5]


# -------------------------------------------------------------------------------- shared insertion
def test_insert_branch_limits_and_eos():
    tree = DraftTree.rooted(1)
    assert insert_branch(tree, [2, 3, 4, 5], budget=10, depth=3, branching=2, eos_ids={EOS}, source="t") == 3
    assert insert_branch(tree, [2, 3, 9], 10, 3, 2, {EOS}, "t") == 1          # shared prefix merged
    assert insert_branch(tree, [2, 3, 8], 10, 3, 2, {EOS}, "t") == 0          # node [2,3] already has 2 children
    assert insert_branch(tree, [6, EOS, 7], 10, 3, 2, {EOS}, "t") == 2        # EOS ends the branch
    assert insert_branch(tree, [8], 10, 3, 2, {EOS}, "t") == 0                # root full
    assert branches(tree) == [[2, 3, 4], [2, 3, 9], [6, EOS]]
    assert insert_branch(tree, [2, 5, 5], budget=7, depth=3, branching=2, eos_ids={EOS}, source="t") == 1
    assert len(tree) - 1 == 7
    assert all(m == 1 for m in tree.multiplicity)


# -------------------------------------------------------------------------------- ADED
def test_aded_reinforcement_adds_and_caps():
    d = AdedDrafter(eos_ids=[EOS])
    seq = [1, 2, 3, 1, 2, 4]
    d.reset(seq)
    assert d.weight(1, 2, 3) == pytest.approx(0.5) and d.weight(1, 2, 4) == pytest.approx(0.5)
    d.propose(seq, 8, 3, 2, torch.Generator().manual_seed(0))
    for key in [(1, 2, 3), (2, 3, 1), (3, 1, 2), (1, 2, 4)]:   # the window's four tri-grams, once each
        assert d.bonus[key] == pytest.approx(0.04)
    assert d.weight(1, 2, 3) == pytest.approx(0.54)
    for _ in range(100):
        d.propose(seq, 8, 3, 2, torch.Generator().manual_seed(0))
    assert d.weight(1, 2, 3) == 3.0 and d.bonus[(1, 2, 3)] == 3.0


def test_aded_reinforcement_window_and_repeats():
    d = AdedDrafter(eos_ids=[EOS])
    seq = [1, 2, 3] + list(range(4, 24)) + [5, 6, 7, 5, 6, 7]
    d.reset(seq)
    d.reinforce_window(seq)
    assert (1, 2, 3) not in d.bonus                     # outside the last 16 tokens
    assert d.bonus[(5, 6, 7)] == pytest.approx(0.08)    # two occurrences in the window


def test_aded_table_backoff_top_successors_and_observe():
    d = AdedDrafter(eos_ids=[EOS], top_successors=2)
    seq = [1, 2, 3, 9, 2, 4, 8, 2, 5, 8, 2, 5]
    d.reset(seq)
    assert [c for c, _ in d.successors(8, 2)] == [5]
    assert [c for c, _ in d.successors(7, 2)] == [5, 4]          # bigram back-off: 5 (2x), then 4 (most recent)
    assert len(d.successors(7, 2, limit=None)) == 3
    d.observe(seq + [6], DraftTree.rooted(5), None, [0])
    assert d.tri[(2, 5)][6] == 1 and d.bi[5][6] == 1


def test_aded_mcts_prefers_the_heavier_branch_and_records_paths():
    d = AdedDrafter(eos_ids=[EOS])
    seq = [1, 2, 3, 6, 1, 2, 3, 6, 1, 2, 3, 6, 1, 2, 4, 7, 1, 2]
    d.reset(seq)
    tree = d.propose(seq, 16, 3, 4, torch.Generator().manual_seed(5))
    check_tree(tree, 16, 3, 4)
    assert first_branch(tree)[0] == 3
    paths = d.last_paths
    assert 1 <= len(paths) <= d.num_paths
    assert paths[0]["tokens"][:3] == [3, 6, 1]
    assert [p["visits"] for p in paths] == sorted((p["visits"] for p in paths), reverse=True)
    assert sum(p["visits"] for p in paths) <= d.mcts_iterations
    assert all(p["value"] >= 1.0 for p in paths)
    info = d.info()["paths"]
    assert info[0]["tokens"] == paths[0]["tokens"] and "added" in info[0]
    again = AdedDrafter(eos_ids=[EOS])
    again.reset(seq)
    again.propose(seq, 16, 3, 4, torch.Generator().manual_seed(5))
    assert again.last_paths == paths


def test_aded_rollouts_use_the_generator():
    seq = [1, 2, 3, 1, 2, 4, 1, 2, 5, 1, 2, 6, 3, 7, 4, 8, 5, 9, 6, 10, 1, 2]
    runs = []
    for seed in range(6):
        d = AdedDrafter(eos_ids=[EOS], mcts_iterations=20)
        d.reset(seq)
        d.propose(seq, 16, 4, 4, torch.Generator().manual_seed(seed))
        runs.append([(tuple(p["tokens"]), p["visits"]) for p in d.last_paths])
    assert len(set(map(tuple, runs))) > 1


# -------------------------------------------------------------------------------- Token Recycling
def test_rank_template_shape():
    t = rank_template(16, 4, 4)
    assert set(t) == {(0,), (1,), (2,), (3,), (0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (2, 0),
                      (0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (0, 0, 0, 0)}
    assert list(t) == sorted(t, key=lambda p: (len(p), p))
    for b, dep, br in [(1, 1, 1), (7, 2, 3), (30, 6, 2), (64, 5, 8), (10, 10, 1)]:
        t = rank_template(b, dep, br)
        assert len(t) == min(b, sum(br ** k for k in range(1, dep + 1)))
        assert all(p[:-1] in t or len(p) == 1 for p in t)          # prefix-closed
        assert all(len(p) <= dep and max(p) < br for p in t)
    assert rank_template(0, 4, 4) == () and rank_template(5, 0, 4) == ()


def test_token_recycling_writes_every_node_last_write_wins():
    d = TokenRecyclingDrafter(vocab_size=10, eos_ids=[EOS], topk=3)
    d.reset([3, 4, 5, 6])                                # prompt tokens never update M
    assert d.coverage == 0 and bool((d.M == -1).all())
    tree = DraftTree.rooted(3)
    a = tree.add(0, 5)                                   # node 1: token 5 (rejected below)
    b = tree.add(0, 7)                                   # node 2: token 7
    tree.add(b, 3)                                       # node 3: token 3 again -> its row wins over the root's
    logits = torch.tensor([[0, 9, 8, 7, 0, 0, 0, 0, 0, 0],
                           [0, 0, 0, 0, 9, 8, 7, 0, 0, 0],
                           [5, 0, 0, 0, 0, 0, 0, 7, 8, 9],
                           [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.float)
    logits[3, 2], logits[3, 6], logits[3, 4] = 3.0, 2.0, 1.0
    d.observe([3, 4, 5, 6, 3, 7, 8], tree, logits, [0, b])
    assert d.M[5].tolist() == [4, 5, 6]                  # written although not accepted
    assert d.M[7].tolist() == [9, 8, 7]
    assert d.M[3].tolist() == [2, 6, 4]                  # node 3 wrote after the root (node 0)
    assert d.coverage == 3 and a == 1
    assert bool((d.M[[0, 1, 2, 4, 6, 8, 9]] == -1).all())


def test_token_recycling_fills_the_template_and_skips_empty_rows():
    d = TokenRecyclingDrafter(vocab_size=10, eos_ids=[EOS], topk=3)
    d.reset([1])
    d.M[3] = torch.tensor([5, 7, 9])
    d.M[5] = torch.tensor([6, 8, 2])
    d.written[[3, 5]] = True
    tree = d.propose([1, 3], 16, 3, 2, None)
    check_tree(tree, 16, 3, 2)
    # template (budget 16, depth 3, branching 2); M[7], M[6], M[8] are empty: nothing below them
    assert branches(tree) == [[7], [5, 6], [5, 8]]
    assert tree.tokens[1:3] == [5, 7]                    # breadth-first: ranks 0, 1 under the root first
    assert d.info() == {"coverage": 2, "filled": 4}
    d.M[6] = torch.tensor([0, 4, 4])                      # EOS at rank 0: nothing below it
    d.M[0] = torch.tensor([1, 2, 3])
    tree = d.propose([1, 3], 16, 3, 2, None)
    assert [5, 6, 0] in branches(tree) and all(len(b) <= 3 for b in branches(tree))


def test_token_recycling_hot_start_and_explicit_template():
    cold = TokenRecyclingDrafter(vocab_size=10, topk=2)
    hot = TokenRecyclingDrafter(vocab_size=10, topk=2, hot_start=True, template=[(0,), (0, 0), (1,)])
    for d in (cold, hot):
        d.reset([1])
        tree = DraftTree.rooted(3)
        d.observe([1, 3], tree, torch.arange(10.0)[None], [0])
        assert d.M[3].tolist() == [9, 8]
        d.reset([2])
    assert cold.coverage == 0 and hot.coverage == 1
    hot.M[9] = torch.tensor([4, 5])
    tree = hot.propose([2, 3], 16, 4, 4, None)
    assert branches(tree) == [[8], [9, 4]]              # leaves in node (breadth-first) order
    with pytest.raises(UserError):
        TokenRecyclingDrafter(vocab_size=10, template=[(0, 1)])     # not prefix-closed


# -------------------------------------------------------------------------------- Alipay Lookahead
def node_at(d: LookaheadDrafter, key: int, path: list[int]):
    n = d.tries[key]
    for t in path:
        n = n.children[t]
    return n


def test_lookahead_input_and_output_frequencies():
    d = LookaheadDrafter(eos_ids=[EOS], branch_length=3)
    prompt = [1, 2, 3, 1, 2, 4]
    d.reset(prompt)
    assert node_at(d, 1, [2]).f_in == 2 and node_at(d, 1, [2, 3]).f_in == 1 and node_at(d, 1, [2, 4]).f_in == 1
    assert node_at(d, 1, [2, 3, 1]).f_in == 1 and 2 not in node_at(d, 1, [2, 3, 1]).children   # 3 tokens
    assert 4 not in d.tries                              # the last prompt token has no continuation yet
    seq = prompt + [5, 6, 7]
    d.observe(seq, DraftTree.rooted(4), None, [0])       # key 4 (position 5) now has 3 tokens after it
    assert node_at(d, 4, [5, 6, 7]).f_out == 1 and node_at(d, 4, [5]).f_in == 0
    assert 5 not in d.tries                              # position 6 is not branch_length old yet
    d.observe(seq + [1, 2], DraftTree.rooted(7), None, [0])
    assert node_at(d, 5, [6, 7, 1]).f_out == 1 and node_at(d, 6, [7, 1, 2]).f_out == 1
    assert node_at(d, 1, [2]).f_in == 2 and 7 not in d.tries


def test_lookahead_orders_children_by_mixed_frequency():
    d = LookaheadDrafter(eos_ids=[EOS], branch_length=2)
    d.reset([8, 3, 9])                                   # 8 -> 3 once from the prompt
    d.insert(8, [4], "output")
    d.insert(8, [4], "output")
    d.insert(8, [5, 6], "output")
    tree = d.propose([7, 8], 16, 4, 4, None)
    check_tree(tree, 16, 4, 4)
    assert [tree.tokens[c] for c in tree.children[0]] == [3, 4, 5]   # input wins; then f_out 2 > 1
    assert branches(tree) == [[3, 9], [4], [5, 6]]
    assert len(d.propose([7, 8], 16, 4, 1, None)) == 3            # branching 1: the 3, 9 chain only


def test_lookahead_query_fallback():
    d = LookaheadDrafter(eos_ids=[EOS], branch_length=4)
    prompt = [1, 2, 3, 4, 5, 6, 7, 2, 8, 9, 10, 11]
    d.reset(prompt)
    tree = d.propose([1, 2], 16, 3, 4, None)             # (1, 2) found with 3+ tokens: that branch only
    assert branches(tree) == [[3, 4, 5]]
    assert d.info()["tries"] == [{"query": [1, 2], "nodes": 3}]
    tree = d.propose([12, 2], 16, 3, 4, None)            # (12, 2) unknown: the last token alone
    assert branches(tree) == [[3, 4, 5], [8, 9, 10]]
    assert d.info()["tries"] == [{"query": [12, 2], "nodes": 0}, {"query": [2], "nodes": 6}]
    d.reset([5, 1, 2, 0, 3, 2, 6, 7, 8])                 # (1, 2) retrieves only [EOS]: too short, fall back
    tree = d.propose([1, 2], 16, 3, 4, None)
    assert branches(tree) == [[0], [6, 7, 8]]


def test_lookahead_hot_start_keeps_output_only():
    cold = LookaheadDrafter(branch_length=2)
    hot = LookaheadDrafter(branch_length=2, hot_start=True)
    for d in (cold, hot):
        d.reset([1, 2, 3])
        d.observe([1, 2, 3, 4, 5, 6], DraftTree.rooted(6), None, [0])
        d.reset([9, 9])
    assert 1 not in cold.tries and 3 not in cold.tries
    assert 1 not in hot.tries                            # input-only paths are dropped
    assert node_at(hot, 3, [4, 5]).f_out == 1 and node_at(hot, 5, [6]).f_out == 1   # tail flushed
    assert node_at(hot, 9, [9]).f_in == 1


# -------------------------------------------------------------------------------- prompt lookup
def test_prompt_lookup_all_matches_in_first_match_order():
    d = PromptLookupTreeDrafter(eos_ids=[EOS], ngram_size=2)
    seq = [1, 2, 3, 5, 1, 2, 4, 9, 6, 2, 7, 1, 2]
    tree = d.propose(seq, 16, 3, 4, None)
    check_tree(tree, 16, 3, 4)
    # n = 2: (1, 2) at 0 and 4; n = 1: (2) at 1, 5 (merged) and 9
    assert branches(tree) == [[3, 5, 1], [4, 9, 6], [7, 1, 2]]
    assert [(m["n"], m["start"]) for m in d.last_matches] == [(2, 0), (2, 4), (1, 1), (1, 5), (1, 9)]
    assert [m["added"] for m in d.last_matches] == [3, 3, 0, 0, 3]
    assert tree.source[1] == "ngram2" and tree.source[tree.child_with(0, 7)] == "ngram1"
    chain, _ = PromptLookupDrafter(2, [EOS]).propose(seq, 3, None)
    assert first_branch(tree) == [p.token for p in chain]          # rank 0 = transformers' chain
    assert branches(d.propose(seq, 16, 3, 1, None)) == [[3, 5, 1]]
    assert branches(d.propose(seq, 4, 3, 4, None)) == [[3, 5, 1], [4]]
    assert branches(PromptLookupTreeDrafter(ngram_size=1).propose(seq, 16, 2, 4, None)) == [[3, 5], [4, 9], [7, 1]]


def test_prompt_lookup_eos_ends_a_branch():
    d = PromptLookupTreeDrafter(eos_ids=[EOS], ngram_size=2)
    seq = [5, 6, EOS, 7, 8, 5, 6, 9, 3, 5, 6]
    tree = d.propose(seq, 16, 4, 4, None)
    check_tree(tree, 16, 4, 4)
    assert branches(tree) == [[EOS], [9, 3, 5, 6]]


# -------------------------------------------------------------------------------- factory
def test_factory():
    assert set(TREE_DRAFTERS) == {"aded", "token_recycling", "lookahead", "prompt_lookup"}
    for name, cls in TREE_DRAFTERS.items():
        d = make(name)
        assert isinstance(d, cls) and d.name == name and d.scheme == "deterministic"
        assert "Spec: docs/strategies.md#spec_tree" in cls.__doc__ and "->" in cls.__doc__
    assert make("token_recycling", topk=4).M.shape == (V, 4)
    assert make("aded", mcts_iterations=7).mcts_iterations == 7
    assert make("lookahead").branch_length == 12 and make("prompt_lookup").ngram_size == 2
    with pytest.raises(UserError):
        make("medusa")
    d = make("aded", ngram_size=3, mcts_iterations=9, topk=2)    # settings of other drafters are ignored
    assert d.mcts_iterations == 9 and not hasattr(d, "ngram_size")
    assert make("prompt_lookup", ngram_size=3, mcts_iterations=9).ngram_size == 3
    assert drafter_params("token_recycling") == ("vocab_size", "eos_ids", "topk", "hot_start", "template")
    with pytest.raises(UserError):
        make("lookahead", branch_length=0)
