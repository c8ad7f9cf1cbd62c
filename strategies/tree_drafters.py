"""Model-free drafters of the tree speculative strategy `spec_tree`: each proposes a token tree from tables built
out of the context (and, for Token Recycling, out of the target's own verification logits); the strategy verifies
the tree in one target forward. None has a draft distribution: every node is a point mass (`scheme =
"deterministic"`, q = 1), so greedy tree verification reproduces target greedy decoding and the point-mass rule
keeps sampling exact whatever the drafter proposes.

Interface (one object per run; the strategy calls, in order):

    reset(prompt_ids)                                   a run starts: tables are fresh unless the method keeps
                                                        state across prompts and `hot_start` asks for it
    propose(seq, budget, depth, branching, generator) -> DraftTree
                                                        seq = prompt + emitted so far; root = seq[-1]; at most
                                                        `budget` nodes besides the root, depth <= `depth`, at most
                                                        `branching` children per node, siblings distinct,
                                                        multiplicity 1; root only when there is nothing to propose.
                                                        `generator` (the run's torch.Generator) is the only source
                                                        of randomness (ADED's rollouts); never Python's random
    take_states(start, states)                          needs_hidden drafters only, right before observe: the
                                                        target's last-layer states [n, H] of the accepted positions
                                                        start .. start+n-1 (catch-up, root, accepted nodes)
    observe(seq, tree, target_logits, path)             after the target verified `tree`: target_logits [N, V] raw
                                                        next-token logits after each node, path = accepted node ids
                                                        (root first); seq already includes the emitted tokens
    verify_forward(target, seq, tree, hidden)           optional: a drafter that shares the target's cache
                                                        (kangaroo) verifies in its own way; returns what
                                                        SpecTree.verify_forward returns
    info() -> dict                                      JSON-friendly extras about the last propose, for the trace

Drafters (`make_tree_drafter(name, ...)`): `aded` (ADED's tri-gram matrix + MCTS), `token_recycling` (Token
Recycling's adjacency matrix + static template), `lookahead` (Alipay Lookahead's per-token trie), `prompt_lookup`
(transformers' prompt lookup, every match a branch). Hao-ai-lab's Jacobi-window Lookahead decoding is a different
method (it needs its own forward layout) and is not here.

Shared tree rules (`insert_branch`): a branch is walked from the root through existing children (no duplicate
sibling, multiplicity stays 1) and extended while the node budget, the depth and the per-node branching allow; an
EOS token is kept as the last token of its branch (nothing is proposed after it).

Spec: docs/strategies.md#spec_tree.
"""

from __future__ import annotations

import heapq
import inspect
import math
from collections import Counter, defaultdict
from fractions import Fraction
from functools import lru_cache

import torch

from declab.core.errors import UserError
from declab.core.tree import DraftTree


# ------------------------------------------------------------------------------------------------ shared
class TreeDrafter:
    """Base of the model-free tree drafters (see the module docstring for the call order)."""

    name: str = ""
    scheme = "deterministic"          # point masses: no draft distribution
    fwd_ms = 0.0                      # model forward time spent in the last propose (a model drafter's)
    needs_hidden = False              # True: the strategy hands over the target's last-layer states (take_states)
    coverage: int | None = None       # rows of the drafter's table ever filled, where it has one

    def reset(self, prompt_ids: list[int]) -> None:
        pass

    def propose(self, seq: list[int], budget: int, depth: int, branching: int, generator) -> DraftTree:
        raise NotImplementedError

    def observe(self, seq: list[int], tree: DraftTree, target_logits, path: list[int]) -> None:
        pass

    def take_states(self, start: int, states: torch.Tensor) -> None:
        """needs_hidden drafters: the target's last-layer states (after the final norm) [n, H] of the accepted
        positions start .. start+n-1 (everything from `start` on replaces what was there)."""

    def info(self) -> dict:
        return {}


def insert_branch(tree: DraftTree, tokens, budget: int, depth: int, branching: int, eos_ids,
                  source: str, parent: int = 0) -> int:
    """Walk `tokens` down from `parent`, reusing existing children and adding new nodes while the tree has fewer
    than `budget` nodes besides the root, the node is shallower than `depth` and has fewer than `branching`
    children; stop after an EOS token. Returns the number of nodes added."""
    u, added = parent, 0
    for t in tokens:
        t = int(t)
        if tree.depth[u] >= depth:
            break
        c = tree.child_with(u, t)
        if c is None:
            if len(tree) - 1 >= budget or len(tree.children[u]) >= branching:
                break
            c = tree.add(u, t, q=1.0, source=source)
            added += 1
        u = c
        if t in eos_ids:
            break
    return added


def _full(tree: DraftTree, budget: int) -> bool:
    return len(tree) - 1 >= budget


def _check_shape(budget: int, depth: int, branching: int) -> None:
    if budget < 0 or depth < 0 or branching < 0:
        raise UserError(f"tree budget, depth and branching must be >= 0, got {budget}, {depth}, {branching}")


# ------------------------------------------------------------------------------------------------ ADED
class _MctsNode:
    __slots__ = ("token", "state", "prior", "depth", "n", "w", "children", "expanded", "parent")

    def __init__(self, token, state, prior, depth, parent):
        self.token, self.state, self.prior, self.depth, self.parent = token, state, prior, depth, parent
        self.n, self.w = 0, 0.0
        self.children: list[_MctsNode] = []
        self.expanded = False


class AdedDrafter(TreeDrafter):
    """ADED (Liu et al., "Adaptive Draft-Verification for Efficient Large Language Model Decoding", arXiv
    2407.12021; code liuxukun2000/Adaptix DraftRetriever): a tri-gram matrix searched by MCTS.

    Paper / reference symbol -> parameter:
        tri-gram matrix T[(a,b)] -> {c: weight}        the context's tri-gram table, weight(a,b,c) =
                                                        min(cap, count(a,b,c)/count(a,b,.) + bonus(a,b,c));
                                                        bigram back-off count(b,c)/count(b,.) when (a,b) is unseen
        12 kept successors per key                     top_successors (12; best weight, then most recent, then id)
        adaptation += 0.04 per call, capped at 3.0     reinforce (0.04), cap (3.0): every propose call adds
                                                        `reinforce` to bonus(a,b,c) of every tri-gram occurrence in
                                                        the last `window` (16) context tokens
        MCTS iterations                                mcts_iterations (150)
        sentence_length (path length)                  the round's `depth`
        c1, c2 in Q/n + (c1 + ln((N+c2+1)/c2)) P sqrt(N)/(1+n)   c1 (32), c2 (8); P = the edge's weight T,
                                                        N = the parent's visits, n the child's; unvisited = +inf
                                                        (first in successor order wins ties)
        kept paths (top by visit count)                num_paths (24)
    One iteration: select down the search tree; expand a leaf (depth < `depth`, not after EOS) with all its
    successors at once and step into the first; roll out to length `depth` sampling successors in proportion to T
    (one uniform from `generator` per step, a fixed block of mcts_iterations x depth uniforms per call); value =
    1 + sum of T over every transition of the path (search part and rollout); back the value up the search path.
    Paths: the visited leaves of the search tree (most visits first, then mean value, then tokens), the first
    `num_paths` kept, each shorter than `depth` extended by its argmax successor (the reference's extension), then
    inserted into the DraftTree in that order (shared prefixes merged) until the budget / branching are met.
    `last_paths` holds per kept path its tokens, visits, mean value and the nodes it added (for the trace).

    Differences from the reference, on purpose: the table is built from the context (prompt + every emitted token,
    as the lab's `ngram` chain drafter) instead of a corpus; the bonus is kept apart from the count ratio so new
    context counts and reinforcement compose; bigrams are not reinforced; rollouts use the run's seeded generator
    (the Rust code uses an unseeded thread RNG); the tree is bounded by the round's node budget / depth / branching
    rather than by a distinct-token limit and Medusa buffers; no hit proposes nothing (the reference drafts id 100).
    Fresh per run (no corpus, so nothing to keep across prompts).

    Spec: docs/strategies.md#spec_tree (dossier C.1).
    """

    name = "aded"

    def __init__(self, eos_ids=(), mcts_iterations: int = 150, num_paths: int = 24, top_successors: int = 12,
                 c1: float = 32.0, c2: float = 8.0, reinforce: float = 0.04, cap: float = 3.0, window: int = 16):
        if mcts_iterations < 1 or num_paths < 1 or top_successors < 1 or c2 <= 0 or window < 3:
            raise UserError("aded: mcts_iterations, num_paths, top_successors >= 1, c2 > 0 and window >= 3")
        self.eos_ids = frozenset(int(e) for e in eos_ids)
        self.mcts_iterations, self.num_paths, self.top_successors = mcts_iterations, num_paths, top_successors
        self.c1, self.c2, self.reinforce, self.cap, self.window = float(c1), float(c2), reinforce, cap, window
        self._fresh()

    def _fresh(self) -> None:
        self.tri: dict[tuple[int, int], Counter] = defaultdict(Counter)
        self.bi: dict[int, Counter] = defaultdict(Counter)
        self.bonus: dict[tuple[int, int, int], float] = {}
        self.last_seen: dict[tuple, int] = {}
        self.seen = 0
        self.last_paths: list[dict] = []
        self._memo: dict = {}

    # -- table
    def reset(self, prompt_ids: list[int]) -> None:
        self._fresh()
        self._sync(prompt_ids)

    def _sync(self, seq: list[int]) -> None:
        for i in range(max(self.seen, 1), len(seq)):
            b, c = int(seq[i - 1]), int(seq[i])
            self.bi[b][c] += 1
            self.last_seen[(b, c)] = i
            if i >= 2:
                a = int(seq[i - 2])
                self.tri[(a, b)][c] += 1
                self.last_seen[(a, b, c)] = i
        self.seen = max(self.seen, len(seq))

    def reinforce_window(self, seq: list[int]) -> None:
        """Add `reinforce` to every tri-gram occurrence in the last `window` tokens (capped at `cap`)."""
        w = [int(t) for t in seq[-self.window:]]
        for j in range(len(w) - 2):
            key = (w[j], w[j + 1], w[j + 2])
            self.bonus[key] = min(self.cap, self.bonus.get(key, 0.0) + self.reinforce)

    def weight(self, a: int | None, b: int, c: int) -> float:
        """T[(a,b)][c] as MCTS sees it (bigram back-off when (a,b) has no successor)."""
        return dict(self.successors(a, b, limit=None)).get(int(c), 0.0)

    def successors(self, a: int | None, b: int, limit: int | None = -1) -> list[tuple[int, float]]:
        """(token, weight) of the state (a, b), best first; `limit` -1 = top_successors, None = all."""
        limit = self.top_successors if limit == -1 else limit
        if a is not None and self.tri.get((a, b)):
            counts, key = self.tri[(a, b)], (a, b)
            total = sum(counts.values())
            rows = [(c, min(self.cap, n / total + self.bonus.get((a, b, c), 0.0))) for c, n in counts.items()]
        elif self.bi.get(b):
            counts, key = self.bi[b], (b,)
            total = sum(counts.values())
            rows = [(c, n / total) for c, n in counts.items()]
        else:
            return []
        rows.sort(key=lambda r: (-r[1], -self.last_seen.get(key + (r[0],), -1), r[0]))
        return rows if limit is None else rows[:limit]

    def _succ(self, state) -> list[tuple[int, float]]:
        if state[1] in self.eos_ids:
            return []
        out = self._memo.get(state)
        if out is None:
            out = self._memo[state] = self.successors(state[0], state[1])
        return out

    # -- MCTS
    def _select(self, node: _MctsNode) -> _MctsNode:
        big_n = node.n
        explore = (self.c1 + math.log((big_n + self.c2 + 1.0) / self.c2)) * math.sqrt(big_n)
        best, best_score = None, -math.inf
        for ch in node.children:
            if ch.n == 0:
                return ch
            score = ch.w / ch.n + explore * ch.prior / (1.0 + ch.n)
            if score > best_score:
                best, best_score = ch, score
        return best

    def _expand(self, node: _MctsNode) -> None:
        node.expanded = True
        for c, wgt in self._succ(node.state):
            node.children.append(_MctsNode(c, (node.state[1], c), wgt, node.depth + 1, node))

    def search(self, seq: list[int], depth: int, generator) -> list[dict]:
        """Run the MCTS from the last two tokens; returns the kept paths (tokens, visits, value), best first."""
        self._memo = {}
        root_state = (int(seq[-2]) if len(seq) > 1 else None, int(seq[-1]))
        root = _MctsNode(int(seq[-1]), root_state, 1.0, 0, None)
        if depth < 1 or not self._succ(root_state):
            return []
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        us = torch.rand(self.mcts_iterations * depth, generator=generator, dtype=torch.float64).tolist()
        for it in range(self.mcts_iterations):
            node, trail, total = root, [root], 0.0
            while node.expanded and node.children:
                node = self._select(node)
                trail.append(node)
                total += node.prior
            if not node.expanded and node.depth < depth and node.token not in self.eos_ids:
                self._expand(node)
                if node.children:
                    node = self._select(node)
                    trail.append(node)
                    total += node.prior
            state, d, step = node.state, node.depth, 0
            while d < depth:
                succ = self._succ(state)
                if not succ:
                    break
                u = us[it * depth + step] * sum(w for _, w in succ)
                pick = succ[-1]
                for c, w in succ:
                    u -= w
                    if u < 0:
                        pick = (c, w)
                        break
                total += pick[1]
                state, d, step = (state[1], pick[0]), d + 1, step + 1
            value = 1.0 + total
            for nd in trail:
                nd.n += 1
                nd.w += value
        leaves, stack = [], [root]
        while stack:
            nd = stack.pop()
            visited = [ch for ch in nd.children if ch.n > 0]
            if nd is not root and not visited:
                leaves.append(nd)
            stack.extend(visited)
        paths = []
        for nd in leaves:
            toks, x = [], nd
            while x is not root:
                toks.append(x.token)
                x = x.parent
            paths.append({"tokens": toks[::-1], "visits": nd.n, "value": nd.w / nd.n, "state": nd.state})
        paths.sort(key=lambda p: (-p["visits"], -p["value"], p["tokens"]))
        kept, seen = [], set()
        for p in paths[:self.num_paths]:
            if len(p["tokens"]) < depth and p["tokens"][-1] not in self.eos_ids:
                succ = self._succ(p.pop("state"))
                if succ:
                    p["tokens"].append(succ[0][0])
            p.pop("state", None)
            if tuple(p["tokens"]) not in seen:
                seen.add(tuple(p["tokens"]))
                kept.append(p)
        return kept

    def propose(self, seq: list[int], budget: int, depth: int, branching: int, generator) -> DraftTree:
        _check_shape(budget, depth, branching)
        self._sync(seq)
        self.reinforce_window(seq)
        tree = DraftTree.rooted(int(seq[-1]))
        self.last_paths = self.search(seq, depth, generator) if budget > 0 and branching > 0 else []
        for p in self.last_paths:
            p["added"] = 0 if _full(tree, budget) else insert_branch(
                tree, p["tokens"], budget, depth, branching, self.eos_ids, self.name)
        return tree

    def observe(self, seq: list[int], tree: DraftTree, target_logits, path: list[int]) -> None:
        self._sync(seq)

    def info(self) -> dict:
        return {"paths": [{k: p[k] for k in ("tokens", "visits", "value", "added")} for p in self.last_paths]}


# ------------------------------------------------------------------------------------------------ Token Recycling
RANK_DECAY = Fraction(3, 5)           # a rank-r child is worth RANK_DECAY / (1 + r) of its parent


@lru_cache(maxsize=64)
def rank_template(budget: int, depth: int, branching: int) -> tuple[tuple[int, ...], ...]:
    """A static tree template (A.1): the `budget` rank paths (child rank at each depth) with the largest
    prod_i RANK_DECAY / (1 + r_i), ties to the shorter then the lexicographically smaller path; ranks <
    `branching`, length <= `depth`. Every child scores below its parent, so the set is prefix-closed, and the
    branching falls with depth (budget 16, depth 4, branching 4: 4 root children, rank-0 chain to depth 4).
    Returned breadth-first: sorted by (length, lexicographic), as Medusa / Token Recycling order theirs."""
    if budget <= 0 or depth <= 0 or branching <= 0:
        return ()
    heap = [(-RANK_DECAY / (1 + r), 1, (r,)) for r in range(branching)]
    heapq.heapify(heap)
    out = []
    while heap and len(out) < budget:
        neg, n, p = heapq.heappop(heap)
        out.append(p)
        if n < depth:
            for r in range(branching):
                heapq.heappush(heap, (neg * RANK_DECAY / (1 + r), n + 1, p + (r,)))
    return tuple(sorted(out, key=lambda p: (len(p), p)))


class TokenRecyclingDrafter(TreeDrafter):
    """Token Recycling (Luo et al., "Turning Trash into Treasure: Accelerating Inference of Large Language Models
    with Token Recycling", arXiv 2408.08696; code Luowaterbi/TokenRecycling evaluation/inference_recycling.py).

    Paper / reference symbol -> parameter:
        adjacency matrix M in Z^{V x k}               `M` ([vocab_size, topk] int64), `-1` = empty row
        k = output_id_topk = 8                         topk (8)
        tree_template ("2.2.2", 80 nodes + root)       template (None: `rank_template(budget, depth, branching)`,
                                                        a prefix-closed rank-path list sized to the round; or an
                                                        explicit list of rank paths, cut to the round's limits)
        hot start (M kept across prompts)              hot_start (False: a fresh M per run; True keeps M on the
                                                        drafter object across runs)
    Draft: node u of the template gets token(u) = M[token(parent(u)), rank(u)], filled breadth-first from the root
    (the last emitted token); entries of an empty row, and everything below them, are skipped. Update, after every
    verification: for EVERY node u of the verified tree, accepted or not, M[token(u)] <- the top-k ids of the
    target's logits after u; duplicate tokens in one tree: last write wins in node order. Prompt tokens never update
    M (prefill logits are not used). Metric: `coverage` = rows of M ever written.

    Differences from the reference, on purpose: M starts at -1 (the reference's zeros would draft token 0 from an
    unseen row); hot start is off by default so runs are independent (the reference's eval keeps a global M); the
    template is sized to the CPU budget instead of the 81-token "2.2.2".

    Spec: docs/strategies.md#spec_tree (dossier C.2, templates A.1).
    """

    name = "token_recycling"

    def __init__(self, vocab_size: int, eos_ids=(), topk: int = 8, hot_start: bool = False, template=None):
        if vocab_size < 1 or topk < 1:
            raise UserError(f"token_recycling: vocab_size and topk must be >= 1, got {vocab_size}, {topk}")
        self.vocab_size, self.topk, self.hot_start = int(vocab_size), int(topk), bool(hot_start)
        self.eos_ids = frozenset(int(e) for e in eos_ids)
        self.template = None if template is None else self._check_template(template)
        self.M = torch.full((self.vocab_size, self.topk), -1, dtype=torch.int64)
        self.written = torch.zeros(self.vocab_size, dtype=torch.bool)
        self.last_filled = 0

    @staticmethod
    def _check_template(template) -> tuple[tuple[int, ...], ...]:
        paths = sorted({tuple(int(r) for r in p) for p in template}, key=lambda p: (len(p), p))
        have = set(paths)
        for p in paths:
            if not p or min(p) < 0 or (len(p) > 1 and p[:-1] not in have):
                raise UserError(f"token_recycling: the template must be a prefix-closed list of non-empty rank "
                                f"paths, got {p}")
        return tuple(paths)

    @property
    def coverage(self) -> int:
        """Rows of M ever written."""
        return int(self.written.sum())

    def reset(self, prompt_ids: list[int]) -> None:
        if not self.hot_start:
            self.M.fill_(-1)
            self.written.zero_()

    def template_for(self, budget: int, depth: int, branching: int) -> tuple[tuple[int, ...], ...]:
        branching = min(branching, self.topk)
        if self.template is None:
            return rank_template(budget, depth, branching)
        out = [p for p in self.template if len(p) <= depth and max(p) < branching]
        have = set(out)
        out = [p for p in out if all(p[:i] in have for i in range(1, len(p)))]
        return tuple(out[:budget])

    def propose(self, seq: list[int], budget: int, depth: int, branching: int, generator) -> DraftTree:
        _check_shape(budget, depth, branching)
        tree = DraftTree.rooted(int(seq[-1]))
        node_of: dict[tuple[int, ...], int] = {(): 0}
        for p in self.template_for(budget, depth, branching):
            parent = node_of.get(p[:-1])
            if parent is None:
                continue
            pt = tree.tokens[parent]
            if pt in self.eos_ids or not 0 <= pt < self.vocab_size:
                continue
            t = int(self.M[pt, p[-1]])
            if t < 0 or tree.child_with(parent, t) is not None:
                continue
            node_of[p] = tree.add(parent, t, q=1.0, source=self.name)
        self.last_filled = len(tree) - 1
        return tree

    def observe(self, seq: list[int], tree: DraftTree, target_logits, path: list[int]) -> None:
        n = len(tree)
        logits = torch.as_tensor(target_logits)[:n].detach()                     # [N, V]
        ids = torch.topk(logits, min(self.topk, logits.shape[-1]), dim=-1).indices.cpu()  # [N, k]
        for u in range(n):                          # node order: a repeated token keeps the last node's row
            t = tree.tokens[u]
            if 0 <= t < self.vocab_size:
                self.M[t, :ids.shape[1]] = ids[u]
                self.written[t] = True

    def info(self) -> dict:
        return {"coverage": self.coverage, "filled": self.last_filled}


# ------------------------------------------------------------------------------------------------ Alipay Lookahead
class _TrieNode:
    __slots__ = ("children", "f_in", "f_out")

    def __init__(self):
        self.children: dict[int, _TrieNode] = {}
        self.f_in = 0.0
        self.f_out = 0.0


class LookaheadDrafter(TreeDrafter):
    """Alipay Lookahead (Zhao et al., "Lookahead: An Inference Acceleration Framework for Large Language Model with
    Lossless Generation Accuracy", arXiv 2312.12728; code alipay/PainlessInferenceAcceleration
    lookahead/common/lookahead_cache.py): a trie per token of the continuations that followed it.

    Paper / reference symbol -> parameter:
        branch_length (12)                            branch_length (12): tokens stored after each key position
        max_query_length (2)                          max_query_length (2)
        output_weight w (1e-4)                        output_weight (1e-4): fm = (1-w) f_in + w f_out
        decoding_length (64 nodes)                    the round's `budget`; retrieval depth min(depth, branch_length)
        per-request reset of input frequencies        reset(); hot_start (False) keeps the tries' output
                                                        frequencies across runs (input frequencies are zeroed)
    Memory: tries[t] holds, for every position i with seq[i] = t, the path seq[i+1 .. i+branch_length]; every node on
    it counts +1 in f_in (the prompt, inserted at reset) or f_out (generated text, streamed in once a position has
    branch_length tokens after it; the first output key is the prompt's last token). Query with the last
    max_query_length tokens q: try tries[q[0]] descended by q[1:], then shorter suffixes down to tries[q[-1]]
    alone; the first try retrieving >= min(branch_length, depth, budget) nodes wins, else the largest (ties: the
    longer query). Retrieve by DFS, children in decreasing fm (ties: first inserted), the first `branching` of each
    node, until the budget; an EOS ends its branch.

    Differences from the reference, on purpose: the reference falls back to the last (shortest) try when no try is
    long enough, we take the largest; frequency halving / pruning at max_node / max_output_node and the
    min_output_size slots are left out (a run's trie stays small; with hot_start the tries grow across runs); modes
    `par` / `one` are not offered (this is `hier`, the reference's default). The Jacobi-window Lookahead decoding of
    hao-ai-lab (dossier C.3) is a different drafter and not part of this one.

    Spec: docs/strategies.md#spec_tree (dossier C.4).
    """

    name = "lookahead"

    def __init__(self, eos_ids=(), branch_length: int = 12, max_query_length: int = 2,
                 output_weight: float = 1e-4, hot_start: bool = False):
        if branch_length < 1 or max_query_length < 1 or not 0.0 <= output_weight <= 1.0:
            raise UserError("lookahead: branch_length, max_query_length >= 1 and 0 <= output_weight <= 1")
        self.eos_ids = frozenset(int(e) for e in eos_ids)
        self.branch_length, self.max_query_length = int(branch_length), int(max_query_length)
        self.output_weight, self.hot_start = float(output_weight), bool(hot_start)
        self.tries: dict[int, _TrieNode] = {}
        self._prompt_len: int | None = None
        self._next_out = 0
        self._seq: list[int] = []
        self.last_query: dict = {}

    # -- memory
    def insert(self, key: int, cont, source: str) -> None:
        """Count the path `cont` under tries[key] (source "input" or "output"); stops after an EOS."""
        node = self.tries.setdefault(int(key), _TrieNode())
        for t in cont:
            t = int(t)
            node = node.children.setdefault(t, _TrieNode())
            if source == "input":
                node.f_in += 1
            else:
                node.f_out += 1
            if t in self.eos_ids:
                break

    def _stream(self, seq: list[int], final: bool = False) -> None:
        last = len(seq) - 1 if final else len(seq) - 1 - self.branch_length
        while self._next_out <= last and self._next_out < len(seq) - 1:
            i = self._next_out
            self.insert(seq[i], seq[i + 1:i + 1 + self.branch_length], "output")
            self._next_out += 1
        self._seq = list(seq)

    def reset(self, prompt_ids: list[int]) -> None:
        if self.hot_start and self._prompt_len is not None:
            self._stream(self._seq, final=True)             # the previous run's tail
            for root in self.tries.values():
                _zero_inputs(root)
            self.tries = {k: r for k, r in self.tries.items() if r.children}
        else:
            self.tries = {}
        prompt = [int(t) for t in prompt_ids]
        for i in range(len(prompt) - 1):
            self.insert(prompt[i], prompt[i + 1:i + 1 + self.branch_length], "input")
        self._prompt_len = len(prompt)
        self._next_out = max(len(prompt) - 1, 0)
        self._seq = prompt

    def observe(self, seq: list[int], tree: DraftTree, target_logits, path: list[int]) -> None:
        self._stream(seq)

    # -- retrieval
    def _fm(self, node: _TrieNode) -> float:
        return (1.0 - self.output_weight) * node.f_in + self.output_weight * node.f_out

    def _retrieve(self, start: _TrieNode, root_token: int, budget: int, depth: int, branching: int) -> DraftTree:
        tree = DraftTree.rooted(root_token)

        def dfs(tnode: _TrieNode, u: int) -> None:
            if tree.depth[u] >= depth or tree.tokens[u] in self.eos_ids and u != 0:
                return
            kids = sorted(tnode.children.items(), key=lambda kv: -self._fm(kv[1]))[:branching]
            for tok, child in kids:
                if _full(tree, budget):
                    return
                dfs(child, tree.add(u, tok, q=1.0, source=self.name))

        dfs(start, 0)
        return tree

    def propose(self, seq: list[int], budget: int, depth: int, branching: int, generator) -> DraftTree:
        _check_shape(budget, depth, branching)
        if self._prompt_len is None:
            self.reset(seq)
        self._stream(seq)
        q = [int(t) for t in seq[-self.max_query_length:]]
        need = min(self.branch_length, depth, budget)
        best, tries = DraftTree.rooted(int(seq[-1])), []
        for s in range(len(q)):
            node = self.tries.get(q[s])
            for t in q[s + 1:]:
                if node is None:
                    break
                node = node.children.get(t)
            got = 0
            if node is not None:
                tree = self._retrieve(node, int(seq[-1]), budget, min(depth, self.branch_length), branching)
                got = len(tree) - 1
                if got > len(best) - 1:
                    best = tree
            tries.append({"query": q[s:], "nodes": got})
            if got >= max(need, 1):
                break
        self.last_query = {"tries": tries, "nodes": len(best) - 1}
        return best

    def info(self) -> dict:
        return dict(self.last_query)


def _zero_inputs(node: _TrieNode) -> None:
    """Zero the input frequencies under `node` and drop the children nothing counts any more."""
    for tok, ch in list(node.children.items()):
        ch.f_in = 0.0
        _zero_inputs(ch)
        if ch.f_out <= 0 and not ch.children:
            del node.children[tok]


# ------------------------------------------------------------------------------------------------ prompt lookup
class PromptLookupTreeDrafter(TreeDrafter):
    """Prompt lookup decoding as a tree (Saxena 2023; transformers' PromptLookupCandidateGenerator, dossier C.7).

    Paper / reference symbol -> parameter:
        max_matching_ngram_size (2)                   ngram_size (2)
        num_output_tokens (prompt_lookup_num_tokens)  the round's `depth` (tokens copied per branch)
        first match wins                              branches in match order: n = min(ngram_size, len(seq)-1)
                                                        down to 1, windows left to right; rank 0 of the root is
                                                        transformers' chain
        tree extension                                the round's `branching` (distinct first tokens = sibling
                                                        branches; deeper nodes are capped the same way)
    Every earlier window equal to the last n tokens (the trailing n-gram itself excluded) gives the <= `depth`
    tokens that followed it as a branch; branches share merged prefixes; the scan stops at the node budget; an EOS
    is kept as the last token of its branch (transformers cuts before it: the tree verifier handles EOS itself).
    The candidates transformers' logits processors forbid are not cut here (no processors in spec_tree). Stateless.

    Spec: docs/strategies.md#spec_tree (dossier C.7).
    """

    name = "prompt_lookup"

    def __init__(self, eos_ids=(), ngram_size: int = 2):
        if ngram_size < 1:
            raise UserError(f"prompt_lookup: ngram_size must be >= 1, got {ngram_size}")
        self.eos_ids = frozenset(int(e) for e in eos_ids)
        self.ngram_size = int(ngram_size)
        self.last_matches: list[dict] = []

    def propose(self, seq: list[int], budget: int, depth: int, branching: int, generator) -> DraftTree:
        _check_shape(budget, depth, branching)
        seq = [int(t) for t in seq]
        tree = DraftTree.rooted(seq[-1])
        self.last_matches = []
        if budget == 0 or depth == 0 or branching == 0:
            return tree
        for n in range(min(self.ngram_size, len(seq) - 1), 0, -1):
            tail = seq[-n:]
            for start in range(0, len(seq) - n):
                if _full(tree, budget):
                    return tree
                if seq[start:start + n] != tail:
                    continue
                cont = seq[start + n:start + n + depth]
                added = insert_branch(tree, cont, budget, depth, branching, self.eos_ids, f"ngram{n}")
                self.last_matches.append({"n": n, "start": start, "added": added})
        return tree

    def info(self) -> dict:
        return {"matches": len(self.last_matches), "branches": sum(1 for m in self.last_matches if m["added"])}


# ------------------------------------------------------------------------------------------------ factory
TREE_DRAFTERS = {"aded": AdedDrafter, "token_recycling": TokenRecyclingDrafter, "lookahead": LookaheadDrafter,
                 "prompt_lookup": PromptLookupTreeDrafter}


def make_tree_drafter(name: str, vocab_size: int, eos_ids, **params) -> TreeDrafter:
    """The model-free tree drafter `name` (aded | token_recycling | lookahead | prompt_lookup). `params` may hold
    the whole strategy's drafter settings: each drafter takes the ones its constructor names (`drafter_params`)
    and ignores the rest, so one call serves every drafter."""
    cls = TREE_DRAFTERS.get(name)
    if cls is None:
        raise UserError(f"unknown tree drafter {name!r}; model-free drafters: {', '.join(TREE_DRAFTERS)}")
    accepted = drafter_params(name)
    kwargs = {k: v for k, v in params.items() if k in accepted}
    kwargs["eos_ids"] = tuple(eos_ids)
    if "vocab_size" in accepted:
        kwargs["vocab_size"] = vocab_size
    return cls(**kwargs)


def drafter_params(name: str) -> tuple[str, ...]:
    """The keyword parameters the drafter `name`'s constructor takes (eos_ids / vocab_size included)."""
    sig = inspect.signature(TREE_DRAFTERS[name].__init__)
    return tuple(p for p in sig.parameters if p != "self")
