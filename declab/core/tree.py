"""Draft trees: the token tree a drafter proposes in one round and the engine verifies in one target forward.

Node 0 is the root: the last emitted token, whose key/value is not cached yet. Nodes are numbered in topological
order (parent[u] < u), so an ancestor-or-self matrix is one pass (A[u] = A[parent[u]] | e_u) and a root-to-node
path is increasing. Siblings with the same token are merged into one node with a multiplicity (the stochastic
verifiers need it: a repeated draft still updates the residual once per copy).

For each node u that has children, `dist[u]` is the draft distribution the children were drawn from ([V] float
probabilities after the run's warpers; None when the drafter is deterministic, i.e. each child is a point mass), and
`scheme` says how: "iid" (independent draws from dist[u]), "without_replacement" (each draw excludes the earlier
children: RSD, Gumbel-top-k), or "deterministic" (top-k / table lookups, no distribution). Children are kept in the
order they were drawn, which is the order the verifiers visit them in.

Spec: docs/strategies.md#spec_tree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

SCHEMES = ("iid", "without_replacement", "deterministic")


@dataclass
class DraftTree:
    """One round's draft tree. Build with `DraftTree(root_token)` then `add(parent, token, ...)`."""

    tokens: list[int] = field(default_factory=list)          # [N] token of each node (node 0: the root token)
    parent: list[int] = field(default_factory=list)          # [N] parent node (-1 for the root)
    depth: list[int] = field(default_factory=list)           # [N] 0 for the root
    q: list[float] = field(default_factory=list)             # [N] draft probability of the node's token (1.0 root)
    cum_logq: list[float] = field(default_factory=list)      # [N] sum of ln q along the path
    multiplicity: list[int] = field(default_factory=list)    # [N] how many draws gave this node (1 if deterministic)
    source: list[str] = field(default_factory=list)          # [N] what proposed it (drafter-specific label)
    rank: list[int] = field(default_factory=list)            # [N] order among its siblings (0 = drawn first)
    children: list[list[int]] = field(default_factory=list)  # [N] child node ids in draw order
    dist: dict[int, torch.Tensor] = field(default_factory=dict)   # node -> [V] draft distribution of its children
    scheme: str = "deterministic"

    @classmethod
    def rooted(cls, root_token: int, scheme: str = "deterministic") -> "DraftTree":
        if scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
        t = cls(scheme=scheme)
        t.tokens, t.parent, t.depth, t.q, t.cum_logq = [int(root_token)], [-1], [0], [1.0], [0.0]
        t.multiplicity, t.source, t.rank, t.children = [1], ["root"], [0], [[]]
        return t

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, parent: int, token: int, q: float = 1.0, source: str = "") -> int:
        """Add `token` under `parent` (a repeated sibling raises the existing node's multiplicity); returns the
        node id."""
        token = int(token)
        for c in self.children[parent]:
            if self.tokens[c] == token:
                self.multiplicity[c] += 1
                return c
        u = len(self.tokens)
        self.tokens.append(token)
        self.parent.append(parent)
        self.depth.append(self.depth[parent] + 1)
        self.q.append(float(q))
        lq = float(torch.log(torch.tensor(max(float(q), 1e-300), dtype=torch.float64)))
        self.cum_logq.append(self.cum_logq[parent] + lq)
        self.multiplicity.append(1)
        self.source.append(source)
        self.rank.append(len(self.children[parent]))
        self.children[parent].append(u)
        self.children.append([])
        return u

    def child_with(self, u: int, token: int) -> int | None:
        """The child of u whose token is `token`, or None."""
        for c in self.children[u]:
            if self.tokens[c] == token:
                return c
        return None

    def path_to(self, u: int) -> list[int]:
        """Node ids from the root to u, both included (increasing)."""
        out = []
        while u >= 0:
            out.append(u)
            u = self.parent[u]
        return out[::-1]

    def leaves(self) -> list[int]:
        return [u for u in range(len(self)) if not self.children[u]]

    @property
    def max_depth(self) -> int:
        return max(self.depth)

    def ancestor_matrix(self) -> torch.Tensor:
        """[N, N] bool: A[u, v] = v is u or an ancestor of u (what node u may attend to inside the tree)."""
        n = len(self)
        a = torch.zeros(n, n, dtype=torch.bool)
        for u in range(n):
            if self.parent[u] >= 0:
                a[u] = a[self.parent[u]]
            a[u, u] = True
        return a


def additive_mask(allowed: torch.Tensor, dtype, device=None) -> torch.Tensor:
    """bool [T, K] (True = may attend) -> an additive attention mask [1, 1, T, K]: 0 where allowed, the dtype's
    min elsewhere (what a 4-D `attention_mask` of transformers' eager / sdpa attention takes)."""
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None].to(device) if device is not None else mask[None, None]


def causal_mask(prefix: int, n: int, dtype, device=None) -> torch.Tensor:
    """n new positions after `prefix` cached ones, each seeing the prefix and itself and the new ones before it:
    [1, 1, n, prefix + n] additive."""
    allowed = torch.ones(n, prefix + n, dtype=torch.bool)
    allowed[:, prefix:] = torch.tril(torch.ones(n, n, dtype=torch.bool))
    return additive_mask(allowed, dtype, device)
