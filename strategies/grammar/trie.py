"""The prefix trie of one grammar run, with expected-future-grammaticality (EFG~) bookkeeping.

A node is a prefix u of generated tokens. Once u is expanded it knows its allowed tokens t with P(t|u) and
EFG~(u) <- sum_allowed P(t|u) * EFG~(u.t), with EFG~ = 1 for the children never visited. EFG~ of a node is kept as
mass(u) - sum over visited children c of P(c|u) * (1 - EFG~(c)), which equals that sum; it only ever decreases,
and every change is propagated to every ancestor. A node below which nothing grammatical lies within the token
budget is dead (EFG~ = 0).
gcd keeps no distributions (every step is a forward and a mask, as plain grammar-constrained decoding); asap keeps
them (revisits read the trie, docs/strategies.md#asap), evicting the least recently used ones past
TRIE_CACHE_ENTRIES allowed tokens in all (an evicted node is recomputed on its next visit; EFG~ is kept).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

TRIE_CACHE_ENTRIES = 4_000_000      # allowed tokens with cached P(t|u) kept by asap (~100 MB), LRU beyond that


class Node:
    """A prefix u of generated tokens. `p` = P(token|parent); `mass` = sum over allowed t of P(t|u) once expanded;
    `efg` = EFG~(u): 1 until expanded, then mass - sum over visited children of p_c (1 - efg_c), 0 when dead.
    `ids`/`probs`: the cached distribution (allowed ids, their P), None when not cached; `child_efg`: EFG~ of each
    allowed child ([A] float64, 1 for children never visited), kept beside it."""

    __slots__ = ("parent", "token", "pos", "depth", "p", "children", "mass", "efg", "ids", "probs", "raw_logp",
                 "child_efg", "entropy", "visits", "dead", "node_id")

    def __init__(self, parent, token: int | None, pos: int, p: float, node_id: int):
        self.parent, self.token, self.pos, self.p, self.node_id = parent, token, pos, p, node_id
        self.depth = 0 if parent is None else parent.depth + 1
        self.children: dict[int, Node] = {}
        self.mass: float | None = None
        self.efg = 1.0
        self.ids = self.probs = self.raw_logp = self.child_efg = None
        self.entropy = float("nan")
        self.visits = 0
        self.dead = False

    def prefix(self) -> tuple[int, ...]:
        out, n = [], self
        while n.parent is not None:
            out.append(n.token)
            n = n.parent
        return tuple(reversed(out))


class Trie:
    """The prefix trie of one run, with EFG~ bookkeeping and an LRU cache of node distributions."""

    def __init__(self, cache_entries: int | None = None):
        self.root = Node(None, None, -1, 1.0, 0)
        self.size = 1
        self.cache_entries = TRIE_CACHE_ENTRIES if cache_entries is None else cache_entries
        self.cached: OrderedDict[int, Node] = OrderedDict()
        self.entries = 0

    def child(self, node: Node, pos: int, token: int, p: float) -> Node:
        c = node.children.get(token)
        if c is None:
            c = node.children[token] = Node(node, token, pos, p, self.size)
            self.size += 1
        return c

    @staticmethod
    def recompute(node: Node) -> float:
        if node.dead:
            return 0.0
        if node.mass is None:
            return 1.0
        s = node.mass
        for c in node.children.values():
            s -= c.p * (1.0 - c.efg)
        return max(s, 0.0)

    def propagate(self, node: Node) -> None:
        """Recompute EFG~ of `node` and of every ancestor (each only decreases)."""
        while node is not None:
            node.efg = self.recompute(node)
            parent = node.parent
            if parent is not None and parent.child_efg is not None:
                parent.child_efg[node.pos] = node.efg
            node = parent

    def expand(self, node: Node, ids: torch.Tensor, probs: torch.Tensor, raw_logp, entropy: float,
               keep: bool) -> None:
        """Store the allowed ids and P at `node` (first visit, or a revisit after eviction); update EFG~."""
        node.ids, node.probs, node.raw_logp, node.entropy = ids, probs, raw_logp, entropy
        node.child_efg = torch.ones_like(probs)
        for c in node.children.values():
            node.child_efg[c.pos] = c.efg
        if node.mass is None:
            node.mass = float(probs.sum())
            self.propagate(node)
        if keep:
            self.cached[node.node_id] = node
            self.entries += len(ids)
            while self.entries > self.cache_entries and len(self.cached) > 1:   # `node` is the newest: kept
                _, old = self.cached.popitem(last=False)
                self.entries -= len(old.ids)
                old.ids = old.probs = old.raw_logp = old.child_efg = None

    def touch(self, node: Node) -> None:
        if node.node_id in self.cached:
            self.cached.move_to_end(node.node_id)

    def drop(self, node: Node) -> None:
        """Forget a node's distribution (gcd keeps none)."""
        node.ids = node.probs = node.raw_logp = node.child_efg = None

    def kill(self, node: Node) -> None:
        """Nothing grammatical lies below `node` within the budget: EFG~ = 0, propagated."""
        node.dead = True
        self.propagate(node)

    def nodes(self):
        """Breadth-first."""
        level = [self.root]
        while level:
            yield from level
            level = [c for n in level for c in n.children.values()]
