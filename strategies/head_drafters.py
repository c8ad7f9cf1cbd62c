"""Trained-head drafters of the tree speculative strategy `spec_tree`: Medusa, Hydra and EAGLE read the target's own
last-layer state f_t (after the final norm, the state its LM head reads) and propose a token tree that the target
verifies in one forward. Their weights are trained on the target's own greedy answers (tools/heads_build.py) and
shipped beside the model (declab/models/heads.py); the embedding and the LM head are the target's, frozen.

Where f_t comes from: the strategy asks the verification forward for the last-layer states (`needs_hidden`) and
hands over those of the accepted positions (`take_states`). Round r's root is the token the target emitted last
(not yet in its cache); f_t is the state of the position before it, whose logits gave the root, so head k predicts
the node at depth k. The first round has no f_t yet: it proposes the root only (the prompt's prefill then yields
every prompt state).

    medusa   K heads h_k = ResBlock_k(f_t) -> LM head; head k gives depth k's candidates, all read from f_t at
             once (no dependence on the parent's token: a Cartesian tree). The tree: node (c_1..c_d) = top-c_d of
             head d; nodes chosen by decreasing prod_d acc_d(c_d), acc_d(c) = head d's held-out accuracy at rank
             c (Medusa's tree from accuracies), within tree_budget / tree_depth / branching.
    hydra    head i reads [f_t, E(root), E(x_1) .. E(x_{i-1})] (the tokens on the node's own path): each depth is
             one batched head call over the frontier; the tree grows EAGLE-2-style (below).
    eagle    one decoder layer over (E(x_{j+1}), f_j) pairs with its own KV cache: first the newly accepted
             positions with the target's true features, then the tree level by level, each node feeding its
             parent's predicted feature f^ under a tree mask.
    EAGLE-2 tree (hydra, eagle): per depth, top-`branching` children of every frontier node; the frontier keeps
             the `branching` nodes of best cumulative ln q; the tree is the `tree_budget` best nodes by cumulative
             ln q (prefix-closed: ln q only falls along a path; ties go to the shallower node).

Nodes are top-k point masses (`scheme = "deterministic"`), so greedy verification reproduces target greedy decoding
and the stochastic verifiers stay exact. Candidates come from the drafter vocabulary stored with the heads (the
embedded draft's FR-Spec 16k most frequent tokens): a cheaper LM-head product, still exact after verification.

Paper symbol -> parameter: K (Medusa heads, Hydra heads) -> the trained file's num_heads (depth <= K); TOPK ->
branching; tree size N -> tree_budget; EAGLE-2 depth / top_k / total_token -> tree_depth / branching / tree_budget.
Deviations: Medusa's typical acceptance (lossy) is not offered (verification is the lab's exact rules); Hydra's
per-head LM heads are the shared frozen base head (see declab/models/heads.py HydraHeads); EAGLE-1's static tree is
replaced by EAGLE-2's dynamic one for both hydra and eagle.

Papers: Cai et al. 2024 "Medusa" (arXiv 2401.10774); Ankner et al. 2024 "Hydra" (arXiv 2402.05109); Li et al.
2024 "EAGLE" (arXiv 2401.15077) and "EAGLE-2" (arXiv 2406.16858). Spec: docs/strategies.md#spec_tree.
"""

from __future__ import annotations

import heapq

import torch
from transformers import DynamicCache

from declab.core.errors import UserError
from declab.core.tree import DraftTree, additive_mask, causal_mask
from strategies.tree_drafters import TreeDrafter

HEAD_DRAFTERS = ("medusa", "hydra", "eagle")        # kangaroo: strategies/kangaroo.py


class HeadDrafter(TreeDrafter):
    """Shared state of the trained-head drafters: the target's states of the accepted positions. `head`: the LM's
    TrainedHead (module, info, drafting-vocabulary head; `lm.trained_head(kind)`), or one given by a test."""

    needs_hidden = True
    kind = ""

    def __init__(self, lm, head=None):
        if head is None:
            if not hasattr(lm, "trained_head"):
                raise UserError(f"model '{lm.key}' has no trained drafting heads; drafter '{self.kind}' needs them: "
                                f"use smollm2-135m-instruct")
            head = lm.trained_head(self.kind)
        self.lm, self.eos_ids = lm, lm.eos_ids
        self.module, self.info, self.head = head.module, head.info, head.vocab
        self.name = self.kind
        self.feats = torch.zeros(0, lm.model.config.hidden_size, dtype=lm.embedding_matrix.dtype, device=lm.device)
        self.last: dict = {}

    def reset(self, prompt_ids: list[int]) -> None:
        self.feats = self.feats[:0]

    def take_states(self, start: int, states: torch.Tensor) -> None:
        self.feats = torch.cat([self.feats[:start], states.to(self.feats.dtype)])  # [start + n, H]

    def embed(self, tokens) -> torch.Tensor:
        return self.lm.model.get_input_embeddings()(self.lm.as_ids(tokens)[0])   # [T, H]

    def propose(self, seq: list[int], budget: int, depth: int, branching: int, generator) -> DraftTree:
        t0 = self.lm.clock_ms()
        tree = DraftTree.rooted(seq[-1])
        depth = min(depth, self.max_depth)
        if len(self.feats) >= len(seq) - 1 >= 1 and budget > 0 and depth > 0 and branching > 0:
            with torch.inference_mode():
                self.grow(tree, seq, budget, depth, branching)
        self.fwd_ms = self.lm.clock_ms() - t0
        return tree

    @property
    def max_depth(self) -> int:
        return 64

    def grow(self, tree: DraftTree, seq: list[int], budget: int, depth: int, branching: int) -> None:
        raise NotImplementedError

    def info(self) -> dict:
        return dict(self.last)


def beam_tree(tree: DraftTree, expand, budget: int, depth: int, branching: int, eos_ids, source: str) -> None:
    """EAGLE-2's tree: `expand(frontier)` -> (ids [F, k], probs [F, k]) for frontier entries (tuples
    (cum_logq, path tokens, key)); per depth the best `branching` nodes by cumulative ln q form the frontier; the
    final tree holds the `budget` best nodes by cumulative ln q (shallower first on ties), added in depth order."""
    frontier = [(0.0, (), None)]                                  # (cum ln q, path tokens below the root, key)
    chosen: list[tuple[float, int, tuple[int, ...], float]] = []  # (cum, depth, path, q)
    for d in range(1, depth + 1):
        grow = [fr for fr in frontier if not (fr[1] and fr[1][-1] in eos_ids)]
        if not grow:
            break
        ids, probs = expand(grow, d)                              # [F, k], [F, k]
        cand = []
        for (cum, path, _key), row_ids, row_p in zip(grow, ids.tolist(), probs.tolist()):
            for t, p in zip(row_ids[:branching], row_p[:branching]):
                c = cum + float(torch.log(torch.tensor(max(p, 1e-30))))
                cand.append((c, path + (int(t),), p))
        for c, path, p in cand:
            chosen.append((c, d, path, p))
        best = heapq.nlargest(branching, cand, key=lambda x: x[0])
        frontier = [(c, path, i) for i, (c, path, _p) in enumerate(best)]
    keep = sorted(chosen, key=lambda x: (-x[0], x[1]))[:budget]
    node_of = {(): 0}
    for _c, _d, path, p in sorted(keep, key=lambda x: (x[1], -x[0])):
        parent = node_of.get(path[:-1])
        if parent is not None:                                    # always: the kept set is prefix-closed
            node_of[path] = tree.add(parent, path[-1], p, source=source)


# ------------------------------------------------------------------------------------------------ Medusa
class MedusaDrafter(HeadDrafter):
    """Medusa-1 heads (legacy form: the target's own LM head) with the accuracy-ranked Cartesian tree."""

    kind = "medusa"

    @property
    def max_depth(self) -> int:
        return len(self.module.heads)

    def rank_accuracy(self) -> list[list[float]]:
        """acc[d-1][c] = held-out probability that head d's rank-c token (0-based) is the right one."""
        acc = self.info.get("held_out", {}).get("rank_accuracy")
        if acc:
            return acc
        return [[1.0 / (c + 1) / (d + 1) for c in range(10)] for d in range(self.max_depth)]   # untrained: ranks

    def template(self, budget: int, depth: int, branching: int) -> list[tuple[int, ...]]:
        """Rank paths (c_1 .. c_d) of the best `budget` nodes by prod acc_d(c_d), best-first (prefix-closed)."""
        acc = self.rank_accuracy()
        width = min(branching, len(acc[0]))
        heap = [(-acc[0][c], (c,)) for c in range(width)]
        heapq.heapify(heap)
        out = []
        while heap and len(out) < budget:
            neg, path = heapq.heappop(heap)
            out.append(path)
            if len(path) < depth:
                for c in range(width):
                    heapq.heappush(heap, (neg * acc[len(path)][c], path + (c,)))
        return out

    def grow(self, tree: DraftTree, seq: list[int], budget: int, depth: int, branching: int) -> None:
        f = self.feats[len(seq) - 2]                                               # [H] f_t
        states = self.module(f[None])[:, 0]                                        # [K, H]
        ids, probs = self.head.topk(states[:depth], branching)                     # [depth, b], [depth, b]
        ids, probs = ids.tolist(), probs.tolist()
        node_of = {(): 0}
        for path in self.template(budget, depth, branching):                       # parents come first
            parent = node_of.get(path[:-1])
            if parent is None or (parent != 0 and tree.tokens[parent] in self.eos_ids):
                continue                                                           # nothing after an EOS
            d, c = len(path), path[-1]
            node_of[path] = tree.add(parent, ids[d - 1][c], probs[d - 1][c], source=f"medusa head {d}")
        self.last = {"top1_by_head": [ids[d][0] for d in range(len(ids))]}


# ------------------------------------------------------------------------------------------------ Hydra
class HydraDrafter(HeadDrafter):
    """Hydra heads: each depth's head reads the embeddings of the tokens on the node's own path."""

    kind = "hydra"

    @property
    def max_depth(self) -> int:
        return len(self.module.heads)

    def grow(self, tree: DraftTree, seq: list[int], budget: int, depth: int, branching: int) -> None:
        f = self.feats[len(seq) - 2]                                               # [H] f_t

        def expand(frontier, d):
            paths = [[seq[-1], *path] for _cum, path, _key in frontier]           # [F][d] root + drafted tokens
            emb = self.embed([t for p in paths for t in p]).view(len(paths), d, -1)  # [F, d, H]
            state = self.module.forward_head(d, f.expand(len(paths), -1), emb)     # [F, H]
            return self.head.topk(state, branching)

        beam_tree(tree, expand, budget, depth, branching, self.eos_ids, "hydra")


# ------------------------------------------------------------------------------------------------ EAGLE
class EagleDrafter(HeadDrafter):
    """EAGLE's feature drafter: one decoder layer with its own KV cache over the target's true features."""

    kind = "eagle"

    def reset(self, prompt_ids: list[int]) -> None:
        super().reset(prompt_ids)
        self.cache = DynamicCache()                    # one layer (the drafter's layer_idx 0)
        self.fed = 0                                   # cache entries j < fed hold (E(x_{j+1}), true f_j)

    def take_states(self, start: int, states: torch.Tensor) -> None:
        super().take_states(start, states)
        if start < self.fed:                           # a state it had read was replaced: drop what came after
            self.lm.crop(self.cache, start)
            self.fed = start

    def layer(self, embeds, feats, positions, mask=None):
        """One drafter forward: embeds / feats [1, T, H] at `positions` [T] -> f^ [1, T, H]."""
        rot = self.lm.model.model.rotary_emb(feats, self.lm.as_ids(positions))    # cos, sin [1, T, D]
        return self.module(embeds, feats, rot, attention_mask=mask, cache=self.cache)

    def grow(self, tree: DraftTree, seq: list[int], budget: int, depth: int, branching: int) -> None:
        S = len(seq)
        lo = self.fed                                                              # catch up: j = fed .. S-2
        emb = self.embed(seq[lo + 1:S])[None]                                      # [1, T, H] E(x_{j+1})
        fhat = self.layer(emb, self.feats[lo:S - 1][None], list(range(lo, S - 1)),
                          causal_mask(lo, S - 1 - lo, self.feats.dtype, self.lm.device))[0, -1]   # [H] root's f^
        self.fed = S - 1
        entries: dict[tuple[int, ...], int] = {}       # tree path -> its drafter-cache index
        fhats: dict[tuple[int, ...], torch.Tensor] = {(): fhat}

        def expand(frontier, d):
            if d == 1:
                return self.head.topk(fhat[None], branching)
            paths = [path for _cum, path, _key in frontier]
            base = self.cache.get_seq_length()
            for i, path in enumerate(paths):
                entries[path] = base + i
            T = len(paths)
            allowed = torch.zeros(T, base + T, dtype=torch.bool)                  # [T, P+T]
            allowed[:, :S - 1] = True                                              # every true position
            for i, path in enumerate(paths):
                for k in range(1, len(path) + 1):                                  # its ancestors in the tree
                    if path[:k] in entries:
                        allowed[i, entries[path[:k]]] = True
            mask = additive_mask(allowed, self.feats.dtype, self.lm.device)
            feats = torch.stack([fhats[p[:-1]] for p in paths])[None]              # [1, T, H] parents' f^
            out = self.layer(self.embed([p[-1] for p in paths])[None], feats,
                             [S - 2 + len(p) for p in paths], mask)[0]             # [T, H]
            for i, path in enumerate(paths):
                fhats[path] = out[i]
            return self.head.topk(out, branching)

        beam_tree(tree, expand, budget, depth, branching, self.eos_ids, "eagle")
        self.lm.crop(self.cache, S - 1)                                            # keep true features only


DRAFTER_CLASSES = {"medusa": MedusaDrafter, "hydra": HydraDrafter, "eagle": EagleDrafter}


def make_head_drafter(name: str, lm, head=None) -> HeadDrafter:
    return DRAFTER_CLASSES[name](lm, head)
