"""Token-tree verification forwards (docs/strategies.md#spec_tree: tree attention, KV compaction).

`tree_step` runs all N draft-tree nodes in one forward with a 4-D ancestor mask and depth positions; each node's
logits must equal a plain forward of its root-to-node path, and the path-batch fallback `tree_step_paths` (A.3).
`keep_path` compacts the cache to the accepted path so the next step equals a fresh forward. Fake-model tests are
exact; the real-model ones (`model` marker) use the embedded SmolLM2 under sdpa and eager, a few forwards each.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import StaticCache

from declab.core.errors import UserError
from declab.core.tree import DraftTree
from tests.fake import FakeLM

PROMPT = ("The quick brown fox jumps over the lazy dog near the river bank, while a small bird sings a song "
          "about the morning sun and the cold wind.")


def random_tree(root: int, pool: list[int], n: int = 12, max_depth: int = 4, seed: int = 0) -> DraftTree:
    """A random tree of n nodes (depth <= max_depth), tokens drawn from `pool`; duplicate siblings are merged, so
    drawing continues until n distinct nodes exist. Node 1 is always the root's first child."""
    rng = random.Random(seed)
    tree = DraftTree.rooted(root)
    while len(tree) < n:
        parent = rng.choice([u for u in range(len(tree)) if tree.depth[u] < max_depth])
        tree.add(parent, rng.choice(pool), q=0.5, source="test")
    return tree


def deepest_branching_path(tree: DraftTree) -> list[int]:
    """The root-to-leaf path of greatest depth that is not a chain prefix (some node id != its index), so that
    keep_path has to gather rather than crop."""
    paths = [tree.path_to(leaf) for leaf in tree.leaves()]
    paths = [p for p in paths if p != list(range(len(p)))]
    return max(paths, key=len)


# ------------------------------------------------------------------------------------------------- fake model
def test_duplicate_siblings_are_merged():
    tree = DraftTree.rooted(5)
    a = tree.add(0, 7, q=0.4)
    b = tree.add(0, 7, q=0.4)
    c = tree.add(0, 8, q=0.2)
    d = tree.add(a, 7, q=0.3)                      # the same token under another parent is another node
    assert a == b == 1 and c == 2 and d == 3
    assert len(tree) == 4 and tree.multiplicity == [1, 2, 1, 1] and tree.children[0] == [1, 2]


def test_fake_tree_step_matches_path_forwards():
    lm = FakeLM()
    prompt = list(range(1, 9))
    pre = lm.prefill(prompt[:-1])
    P = pre.cache.get_seq_length()
    tree = random_tree(prompt[-1], list(range(1, lm.vocab_size)), seed=3)
    ref = lm.tree_step_paths(tree, pre.cache)
    assert pre.cache.ids.tolist() == [prompt[:-1]]                     # the fallback leaves the cache as it was
    before = lm.forwards
    out = lm.tree_step(tree, pre.cache, hidden=True)
    assert lm.forwards == before + 1
    assert out.logits.shape == (len(tree), lm.vocab_size) and out.hidden.shape[0] == len(tree)
    assert out.cache.get_seq_length() == P + len(tree)
    for u in range(len(tree)):
        path = [tree.tokens[v] for v in tree.path_to(u)]
        plain = lm.prefill(prompt[:-1] + path).logits[0]
        assert torch.equal(out.logits[u], plain)
        assert torch.equal(ref.logits[u], plain)


def test_fake_keep_path_then_next_step():
    lm = FakeLM()
    prompt = list(range(3, 12))
    cache = lm.prefill(prompt[:-1]).cache
    P = cache.get_seq_length()
    tree = random_tree(prompt[-1], list(range(1, lm.vocab_size)), seed=5)
    out = lm.tree_step(tree, cache)
    path = deepest_branching_path(tree)
    lm.keep_path(cache, P, path)
    tokens = [tree.tokens[u] for u in path]
    assert cache.get_seq_length() == P + len(path) and cache.ids.tolist() == [prompt[:-1] + tokens]
    bonus = int(out.logits[path[-1]].argmax())
    nxt = lm.step([bonus], cache).logits[0]
    assert torch.equal(nxt, lm.prefill(prompt[:-1] + tokens + [bonus]).logits[0])
    with pytest.raises(ValueError):
        lm.keep_path(cache, P, [1, 2])


# ------------------------------------------------------------------------------------------------- real model
@pytest.fixture(scope="module")
def case(real_lm):
    """Prompt ids (~30 tokens), and a 12-node tree of depth <= 4 over tokens of the prompt, rooted at its last
    token (the root is not cached: the prefix is prompt[:-1])."""
    ids = real_lm.encode_prompt(PROMPT, "raw")
    assert 20 <= len(ids) <= 40
    tree = random_tree(ids[-1], sorted(set(ids)), n=12, max_depth=4, seed=1)
    assert any(tree.depth[u] != u for u in range(len(tree))) and tree.max_depth <= 4
    return ids, tree


@pytest.fixture(params=["sdpa", "eager"])
def attn(request, real_lm):
    """Run the test under this attention implementation, restoring the model's own afterwards (it is shared by
    the whole session)."""
    model = real_lm.model
    old = model.config._attn_implementation
    model.set_attn_implementation(request.param)
    try:
        yield request.param
    finally:
        model.set_attn_implementation(old)


@pytest.mark.model
def test_real_tree_step_matches_path_forwards(real_lm, case, attn):
    lm, (ids, tree) = real_lm, case
    N = len(tree)
    cache = lm.prefill(ids[:-1]).cache
    P = cache.get_seq_length()
    keys0 = cache.layers[0].keys.clone()

    ref = lm.tree_step_paths(tree, cache)                              # the A.3 reference, on a copy
    assert ref.logits.shape == (N, lm.vocab_size)
    assert cache.get_seq_length() == P and torch.equal(cache.layers[0].keys, keys0)

    plain = torch.empty(N, lm.vocab_size)                              # each node from its root-to-node path
    for leaf in tree.leaves():
        path = tree.path_to(leaf)
        rows = lm.step([tree.tokens[u] for u in path], cache, all_logits=True).logits[0]   # [len(path), V]
        plain[path] = rows
        lm.crop(cache, P)

    seen = []                                                          # the mask every attention layer receives
    hooks = [layer.self_attn.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["attention_mask"]), with_kwargs=True)
        for layer in lm.model.model.layers]
    try:
        out = lm.tree_step(tree, cache)
    finally:
        for h in hooks:
            h.remove()
    _, mask, pos = lm.tree_inputs(tree, P)
    assert mask.shape == (1, 1, N, P + N) and mask.dtype == torch.float32
    assert len(seen) == len(lm.model.model.layers) and all(torch.equal(m, mask) for m in seen)
    assert out.logits.shape == (N, lm.vocab_size) and out.logits.dtype == torch.float32
    assert out.cache.get_seq_length() == P + N

    assert (out.logits - plain).abs().max() <= 1e-4
    assert (out.logits - ref.logits).abs().max() <= 1e-4
    assert torch.equal(out.logits.argmax(-1), plain.argmax(-1))

    # negative control: numbering positions by node id instead of depth must change the logits
    lm.crop(cache, P)
    wrong = lm._forward(cache, input_ids=lm.as_ids(tree.tokens), all_logits=True, attention_mask=mask,
                        position_ids=P + torch.arange(N)[None, :]).logits[0]
    assert (wrong - plain).abs().max() > 1e-2


@pytest.mark.model
def test_real_keep_path_then_next_step(real_lm, case):
    """The compaction itself is exact (the kept rows are the tree forward's rows, bit for bit); the next step
    then matches a fresh forward of prompt + path + bonus to fp32 noise. (That noise is 2-4e-5 on this model
    whenever two forwards differ in shape: measured for a pure crop and for the uncompacted cache under a mask
    too, so a 1e-5 bound would test kernel blocking, not the compaction; a wrong row would move logits by O(1).)"""
    lm, (ids, tree) = real_lm, case
    for path in (deepest_branching_path(tree), [0, 1]):                # a gather, then a chain (crop)
        cache = lm.prefill(ids[:-1]).cache
        P = cache.get_seq_length()
        out = lm.tree_step(tree, cache)
        keep = torch.as_tensor(list(range(P)) + [P + u for u in path])
        expect = [(layer.keys[:, :, keep].clone(), layer.values[:, :, keep].clone()) for layer in cache.layers]
        lm.keep_path(cache, P, path)
        assert cache.get_seq_length() == P + len(path)
        assert all(torch.equal(layer.keys, k) and torch.equal(layer.values, v)
                   for layer, (k, v) in zip(cache.layers, expect))
        tokens = [tree.tokens[u] for u in path]
        bonus = int(out.logits[path[-1]].argmax())
        nxt = lm.step([bonus], cache).logits[0]
        fresh = lm.prefill(ids[:-1] + tokens + [bonus]).logits[0]
        assert (nxt - fresh).abs().max() <= 1e-4, path
        assert int(nxt.argmax()) == int(fresh.argmax())


@pytest.mark.model
def test_real_tree_refusals(real_lm, case, monkeypatch):
    lm, (ids, tree) = real_lm, case
    static = StaticCache(config=lm.model.config, max_cache_len=64)
    with pytest.raises(UserError, match="DynamicCache"):
        lm.tree_step(tree, static)
    monkeypatch.setattr(lm.model.config, "_attn_implementation_internal", "flash_attention_2")
    with pytest.raises(UserError, match="eager or sdpa"):
        lm.tree_step(tree, lm.new_cache())
