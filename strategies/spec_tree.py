"""Tree speculative decoding: a drafter proposes a token tree, the target verifies the whole tree in one forward.

Papers: SpecInfer (Miao et al., arXiv 2305.09781: token trees, tree attention, multi-round rejection), SpecTr (Sun
et al., arXiv 2310.15141: k-sequential selection), Recursive Speculative Decoding (Jeon et al., arXiv 2402.14160:
drafts without replacement), DySpec (Xiong et al., arXiv 2410.11744: trees grown by draft probability); drafters
from ADED (arXiv 2407.12021), Token Recycling (arXiv 2408.08696), Alipay's Lookahead (arXiv 2312.12728) and prompt
lookup (transformers). Spec: docs/strategies.md#spec_tree.

One round (the root is the last emitted token, not yet in the target's cache):
    tree  = drafter.propose(seq, budget, depth, branching)      # at most tree_budget nodes, depth <= tree_depth
    p_u   = warp(target logits after node u)  for every node u   # one forward: 4-D tree mask, positions P + depth
    path, emitted = verify_tree(tree, p, verify)                # declab/core/verify.py
    the target cache is compacted to the accepted path; the last emitted token is the next root
A tree in which every node has at most one child is a chain: it goes through the same forward and cache handling
as `speculative`, so `branching = 1` with the model drafter is chain speculative decoding, token for token for the
same seed.

Verification (`verify`): `greedy` (temperature 0: walk down while the target's argmax is a child, then emit the
argmax: the output equals target greedy decoding), `multi_round` (SpecInfer), `spectr` (K-SEQ), `rsd` (children
without replacement). `auto` = greedy at temperature 0, else multi_round. All three stochastic rules keep the
output distribution exactly the warped target distribution. Model-free drafters propose point masses (no draft
distribution), which every stochastic rule verifies with the point-mass rule (accept a child with the probability
the residual gives it).

Paper / reference symbol -> config field:
    node budget (SpecInfer tree size; DySpec max_tree_nodes)      -> tree_budget
    tree depth / draft length gamma                               -> tree_depth
    children per node k (SpecInfer / SpecTr k; RSD branching)     -> branching
    SpecInfer MSS / SpecTr K-SEQ / RSD-C                          -> verify = multi_round / spectr / rsd
    DySpec's greedy expansion by the product of draft probabilities -> expand = dynamic (static: breadth first)
    warpers on p and q alike                                      -> temperature, top_k, top_p
    drafter                                                       -> drafter: model (the paired draft model, or
        draft_model = a models.yaml key), aded (MCTS over the tri-gram matrix, mcts_iterations), token_recycling
        (adjacency matrix of the target's own top-k), lookahead (trie of the context), prompt_lookup (every match
        of the context as a branch, ngram_size)

The model drafter. With branching 1 it drafts like `speculative`'s model drafter (one draft forward per token).
With branching > 1 it grows the tree level by level: one draft forward over the tree built so far (the same 4-D
tree mask) gives every frontier node's distribution q; a frontier node gets `branching` children: greedy, its
top-`branching` tokens; multi_round / spectr, `branching` i.i.d. draws from q (repeats merge into one node with a
multiplicity); rsd, `branching` draws without replacement (Gumbel-top-k). Frontier nodes are expanded in node order
(static) or by their path's draft probability (dynamic), each fully or, when the budget runs out, with as many
children as it has room for (decided before drawing, so the draws stay exact for the verifier).

Deviations, on purpose: DySpec's heap expands one child at a time across depths; here the frontier is expanded
level by level (one draft forward per level); RSD's stochastic-beam variant (RSD-S) is left out (RSD-C, a constant
branching per node, is implemented); ADED's and Token Recycling's tables start empty for each run (their
references keep them across prompts) and ADED's table is built from the context, not a corpus (see
strategies/tree_drafters.py).

Trace, per round r (`round`): one `propose` row per drafted node (branch_id = node, parent_id = its parent node,
`node`, `depth`, `q`, `cum_logq`, `source`, `rank`, `multiplicity`, `tree_size`, `draft_ms` on the first row); one
`accept` / `reject` row per drafted node with `verdict` accepted | rejected | unverified (never reached), the
target's warped `p` of the node's token, `accept_prob` and `u` where a test ran, `verify_ms` on the first row; one
`token` row per emitted token (one chain: branch_id = parent_id = 0) with `origin` accepted | bonus | resampled,
`node` = the tree node it came from (the bonus / resampled token: -1) and `parent_node` (the node whose target
logits gave it), and on the round's last token row `round_ms`, `verify_ms`, `draft_ms`,
`bookkeeping_ms` (the round minus the target's and the draft model's forwards: building the tree, the mask,
verifying, compacting). `step` is the index of the generated token a row is about. Metrics: TreeMetrics
(declab/core/metrics.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from declab.core import (Config, ModelNeed, Needs, Progress, RunContext, RunGen, Sequence, Strategy, UserError,
                         param, register)
from declab.core.metrics import TreeMetrics
from declab.core.sampling import draw_from, entropy_bits
from declab.core.tree import DraftTree
from declab.core.verify import verify_tree, verify_typical
from strategies.head_drafters import HEAD_DRAFTERS, make_head_drafter
from strategies.kangaroo import KangarooDrafter
from strategies.tree_drafters import TreeDrafter, make_tree_drafter
from strategies.two_model import (DRAFTER_ADVICE, ModelDrafter, ModelState, common_prefix, named_model, probs,
                                  record_speedup)

DRAFTERS = ("model", "aded", "token_recycling", "lookahead", "prompt_lookup") + HEAD_DRAFTERS + ("kangaroo",)
VERIFY = ("auto", "greedy", "multi_round", "spectr", "rsd", "typical")
MAX_TREE_NODES = 64


@dataclass(frozen=True)
class SpecTreeConfig(Config):
    drafter: str = param("model", choices=DRAFTERS,
                         help="Who proposes the tree: model (the draft model), aded (MCTS over a tri-gram matrix), "
                              "token_recycling (the target's own top-k), lookahead (a trie of the context), "
                              "prompt_lookup (every match of the context); trained heads on the target's own "
                              "features: medusa, hydra, eagle; kangaroo (the target's first layers + an adapter, "
                              "a chain).")
    draft_model: str = param("model", help="drafter=model: 'model' (the second model beside the model, e.g. the "
                                           "embedded default's distilled draft) or a models.yaml key.")
    tree_budget: int = param(8, lo=1, hi=MAX_TREE_NODES, help="Drafted nodes per round (the root excluded).")
    tree_depth: int = param(4, lo=1, hi=32, help="Deepest draft position per round (gamma of a chain).")
    branching: int = param(2, lo=1, hi=8, help="Children per node (1 = a chain: speculative decoding).")
    expand: str = param("static", choices=("static", "dynamic"),
                        help="drafter=model: expand frontier nodes breadth first (static) or by their path's draft "
                             "probability, DySpec-style (dynamic).")
    verify: str = param("auto", choices=VERIFY,
                        help="auto (greedy at temperature 0, else multi_round), greedy, multi_round (SpecInfer), "
                             "spectr (K-SEQ), rsd (drafts without replacement); typical = Medusa's typical "
                             "acceptance (lossy: NOT the target's distribution).")
    posterior_threshold: float = param(0.09, lo=0.0, hi=1.0, help="verify=typical: epsilon, the acceptance "
                                                                  "threshold's cap (Medusa 0.09).")
    posterior_alpha: float = param(0.3, lo=0.0, hi=1.0, help="verify=typical: delta, the entropy-scaled "
                                                             "threshold delta exp(-H) (Medusa 0.3).")
    temperature: float = param(0.0, lo=0.0, hi=100.0, help="0 = greedy verification (output equals target greedy); "
                                                           ">0 = tree speculative sampling at this temperature.")
    top_k: int = param(0, lo=0, hi=1_000_000, help="Top-k warper on both p and q (0 = off).")
    top_p: float = param(1.0, lo=0.0, hi=1.0, lo_open=True, help="Top-p warper on both p and q (1 = off).")
    ngram_size: int = param(3, lo=1, hi=8, help="prompt_lookup: the longest trailing n-gram matched.")
    mcts_iterations: int = param(150, lo=1, hi=5000, help="aded: MCTS iterations per round (reference 150).")
    confidence_threshold: float = param(0.6, lo=0.0, hi=1.0,
                                        help="kangaroo: stop drafting after a token whose top-1 draft probability is "
                                             "below this (Kangaroo's eta, 0.6).")
    measure_speedup: bool = param(True, help="After the run, time target-only decoding of the same length and report "
                                             "the speedup (adds that run's time).")

    def check(self) -> None:
        name = self.strategy_name()
        if self.temperature == 0 and self.verify not in ("auto", "greedy"):
            raise UserError(f"{name}: verify must be auto or greedy when temperature is 0, got {self.verify!r} "
                            f"(the stochastic rules need temperature > 0)")
        if self.temperature > 0 and self.verify == "greedy":
            raise UserError(f"{name}: verify=greedy needs temperature 0; with temperature > 0 use auto, "
                            f"multi_round, spectr or rsd")

    @property
    def method(self) -> str:
        if self.verify == "auto":
            return "greedy" if self.temperature == 0 else "multi_round"
        return self.verify


# ------------------------------------------------------------------------------------------------ model drafter
def sync_prefix(state: ModelState, ids: list[int], hidden: bool = False) -> float:
    """Make `state`'s cache hold exactly `ids` (crop what differs, feed what is missing in one forward). Returns the
    forward time it took (0 when nothing was fed). hidden=True: `state.fed_hidden` = (first fed position, [T, H]
    last-layer states of the fed positions), None when nothing was fed."""
    lm = state.lm
    fwd_ms = 0.0
    state.fed_hidden = None
    if state.cache is None:
        if ids:
            out = lm.prefill(ids, hidden=hidden)
            state.cache, fwd_ms = out.cache, out.fwd_ms
            state.forwards += 1
            state.fed_hidden = (0, out.hidden[0]) if hidden else None
        else:
            state.cache = lm.new_cache()
        state.ids = list(ids)
    else:
        keep = common_prefix(state.ids, ids)
        if keep < len(state.ids):
            lm.crop(state.cache, keep)
            del state.ids[keep:]
        if keep < len(ids):
            out = lm.step([ids[keep:]], state.cache, hidden=hidden)
            state.cache, fwd_ms = out.cache, out.fwd_ms
            state.ids.extend(ids[keep:])
            state.forwards += 1
            state.fed_hidden = (keep, out.hidden[0]) if hidden else None
    state.verified = len(ids)
    state.fwd_ms += fwd_ms
    return fwd_ms


def gumbel_top_k(q: torch.Tensor, k: int, generator: torch.Generator) -> list[int]:
    """k draws without replacement from q [V], in draw order: the k largest ln q + Gumbel keys (Gumbel-top-k)."""
    u = torch.rand(q.shape, generator=generator, dtype=torch.float64, device=q.device)        # [V]
    keys = torch.where(q > 0, q.double().log() - torch.log(-torch.log(u.clamp_min(1e-300))),
                       torch.full_like(u, -math.inf))                                           # [V]
    k = min(k, int((q > 0).sum()))
    return torch.topk(keys, k).indices.tolist()


class ModelTreeDrafter(TreeDrafter):
    """The draft model as a tree drafter (see the module docstring)."""

    def __init__(self, lm, cfg: SpecTreeConfig, generator: torch.Generator, eos_ids):
        self.lm, self.cfg, self.eos_ids = lm, cfg, eos_ids
        self.name = lm.key
        self.chain = ModelDrafter(lm, cfg, generator, eos_ids)          # branching 1: speculative's drafter
        self.scheme = {"greedy": "deterministic", "rsd": "without_replacement"}.get(cfg.method, "iid")
        self.fwd_ms = 0.0                                                # draft forward time of the last propose

    @property
    def state(self) -> ModelState:
        return self.chain.state

    def propose(self, seq: list[int], budget: int, depth: int, branching: int, generator) -> DraftTree:
        """A chain (branching 1) or a tree; `fwd_ms` is the draft model's forward time in it."""
        self.fwd_ms = 0.0
        if branching == 1:
            return self._chain(seq, min(budget, depth))
        return self._tree(seq, budget, depth, branching, generator)

    def _chain(self, seq: list[int], gamma: int) -> DraftTree:
        tree = DraftTree.rooted(seq[-1], self.scheme)
        if gamma <= 0:
            return tree
        t0 = self.lm.clock_ms()
        props, _catch_up = self.chain.propose(seq, gamma, lambda confs: True)
        self.fwd_ms = self.lm.clock_ms() - t0                  # one draft forward per token: the chain is forwards
        u = 0
        for pr in props:
            if pr.q is not None:
                tree.dist[u] = pr.q
            u = tree.add(u, pr.token, pr.q_token, source="model")
        return tree

    def _tree(self, seq: list[int], budget: int, depth: int, branching: int, generator) -> DraftTree:
        cfg, lm, state = self.cfg, self.lm, self.state
        self.fwd_ms += sync_prefix(state, seq[:-1])
        tree = DraftTree.rooted(seq[-1], self.scheme)
        frontier = [0]
        while len(tree) - 1 < budget:
            grow = [u for u in frontier if tree.depth[u] < depth and tree.tokens[u] not in self.eos_ids]
            if not grow:                                                           # nothing can grow: no forward
                break
            out = lm.tree_step(tree, state.cache)                                  # logits [N, V]
            self.fwd_ms += out.fwd_ms
            state.forwards += 1
            lm.crop(state.cache, len(seq) - 1)
            if cfg.expand == "dynamic":
                grow.sort(key=lambda u: -tree.cum_logq[u])                         # stable: node order on ties
            added: list[int] = []
            for u in grow:
                room = budget - (len(tree) - 1)
                if room <= 0:
                    break
                k = min(branching, room)
                logits = out.logits[u]                                             # [V]
                if cfg.method == "greedy":
                    p = logits.softmax(-1)
                    top = torch.topk(p, k)
                    children = list(zip(top.indices.tolist(), top.values.tolist()))
                else:
                    q = probs(logits, cfg.temperature, cfg.top_k, cfg.top_p)       # [V]
                    tree.dist[u] = q
                    toks = gumbel_top_k(q, k, generator) if cfg.method == "rsd" else \
                        [draw_from(q, generator) for _ in range(k)]
                    children = [(t, float(q[t])) for t in toks]
                for tok, qt in children:
                    c = tree.add(u, tok, qt, source="model")
                    if c not in added:
                        added.append(c)
            frontier = added
        state.ids = list(seq[:-1])
        return tree


# ------------------------------------------------------------------------------------------------ strategy
@register
class SpecTree(Strategy):
    name = "spec_tree"
    title = "Tree speculative decoding (draft trees, multi-draft verification)"
    paper = ("Miao et al. 2023, SpecInfer; Sun et al. 2023, SpecTr; Jeon et al. 2024, Recursive Speculative "
             "Decoding; drafters from ADED, Token Recycling, Lookahead, prompt lookup")
    advice = DRAFTER_ADVICE
    explanation = ("Speculative decoding with a tree instead of a chain: the drafter proposes several alternatives at "
                   "each position, and the big model checks the whole tree in one forward pass, every node seeing "
                   "only its own ancestors. The longest branch the big model agrees with is kept, plus one token of "
                   "its own. More guesses per pass means a longer accepted stretch on average, at the price of a "
                   "bigger pass; the stochastic rules keep the text exactly the big model's distribution.")
    Config = SpecTreeConfig
    deterministic = False
    roles = ("draft",)

    def needs(self, cfg: SpecTreeConfig) -> Needs:
        """The draft model for drafter=model (the key draft_model names, else the paired one); none otherwise."""
        if cfg.drafter != "model":
            return Needs()
        return Needs(models=(ModelNeed("draft", named_model(cfg.draft_model) or ""),))

    def make_drafter(self, ctx: RunContext, cfg: SpecTreeConfig):
        if cfg.drafter == "model":
            return ModelTreeDrafter(ctx.model("draft"), cfg, ctx.generator, ctx.lm.eos_ids)
        if cfg.drafter in HEAD_DRAFTERS:
            return make_head_drafter(cfg.drafter, ctx.lm)
        if cfg.drafter == "kangaroo":
            return KangarooDrafter(ctx.lm, cfg.confidence_threshold, ctx.lm.eos_ids)
        return make_tree_drafter(cfg.drafter, ctx.lm.vocab_size, ctx.lm.eos_ids, ngram_size=cfg.ngram_size,
                                 mcts_iterations=cfg.mcts_iterations)

    def run(self, ctx: RunContext, cfg: SpecTreeConfig) -> RunGen:
        lm, trace = ctx.lm, ctx.trace
        drafter = self.make_drafter(ctx, cfg)
        drafter.reset(list(ctx.prompt_ids))
        target = ModelState(lm, "target")
        method = cfg.method
        seq = list(ctx.prompt_ids)
        generated: list[int] = []
        total_logprob = 0.0
        stats = Tally()
        t_start = lm.clock_ms()
        finished = False
        rnd = 0
        while not finished and len(generated) < ctx.max_new_tokens:
            t_round = lm.clock_ms()
            remaining = ctx.max_new_tokens - len(generated)
            depth = min(cfg.tree_depth, remaining - 1)
            step0, pos0 = len(generated), len(seq) - 1                     # the root's step and position
            t0 = lm.clock_ms()
            tree = drafter.propose(seq, cfg.tree_budget, depth, cfg.branching, ctx.generator) if depth > 0 \
                else DraftTree.rooted(seq[-1])
            draft_ms = lm.clock_ms() - t0
            draft_fwd_ms = drafter.fwd_ms if depth > 0 else 0.0
            verify = getattr(drafter, "verify_forward", None) or self.verify_forward   # kangaroo: its own
            logits, verify_ms, states = verify(target, seq, tree, drafter.needs_hidden)   # [N, V]
            p_rows = probs(logits, cfg.temperature, cfg.top_k, cfg.top_p)  # [N, V] warped (one-hot at T = 0)
            result = verify_typical(tree, p_rows, ctx.generator, lm.eos_ids, cfg.posterior_threshold,
                                    cfg.posterior_alpha) if method == "typical" else \
                verify_tree(tree, p_rows, method, ctx.generator, lm.eos_ids)
            if not is_chain(tree):                                          # compact the target cache to the path
                lm.keep_path(target.cache, pos0, result.path)
                target.ids = list(seq[:-1]) + [tree.tokens[u] for u in result.path]
                target.verified = len(target.ids)
            logp = logits.log_softmax(-1)                                   # [N, V]
            ent = entropy_bits(logp).tolist()                               # [N]
            self.trace_tree(ctx, tree, result, p_rows, logp, ent, rnd, step0, pos0, drafter, draft_ms, verify_ms)
            # ---- emit
            origins = ["accepted"] * (len(result.path) - 1) + [result.final_origin]
            n_emitted = 0
            for k, tok in enumerate(result.emitted):
                row = result.path[k]                                        # the node whose logits gave this token
                lp = float(logp[row, tok])
                node = result.path[k + 1] if k + 1 < len(result.path) else -1
                last = k == len(result.emitted) - 1
                round_ms = lm.clock_ms() - t_round
                extra = dict(round_ms=round_ms, verify_ms=verify_ms, draft_ms=draft_ms,
                             bookkeeping_ms=max(0.0, round_ms - verify_ms - draft_fwd_ms)) if last else {}
                trace.add("token", step0 + k, branch_id=0, parent_id=0, position=pos0 + 1 + k, token_id=tok,
                          token_text=lm.token_text(tok), logprob=lp, entropy=ent[row], score=lp, accepted=True,
                          round=rnd, depth=k + 1, origin=origins[k], node=node, parent_node=row, **extra)
                total_logprob += lp
                n_emitted += 1
                if tok in lm.eos_ids:
                    finished = True
                    break
                generated.append(tok)
                seq.append(tok)
            if states is not None:                                          # the target's states, accepted part
                start, pre, node_h = states                                 # [m, H] before the root, [N, H]
                drafter.take_states(start, torch.cat([pre, node_h[result.path]]))
            drafter.observe(seq, tree, logits, result.path)
            stats.add(tree, result, n_emitted)
            rnd += 1
            ctx.metrics = stats.metrics(drafter)
            yield Progress(max(0, len(generated) - 1), generated)
        metrics = stats.metrics(drafter)
        metrics.target_exact = method != "typical"
        record_speedup(ctx, metrics, stats.emitted, lm.clock_ms() - t_start, cfg.measure_speedup)
        ctx.metrics = metrics
        return [Sequence(token_ids=list(generated), score=total_logprob)]

    @staticmethod
    def verify_forward(target: ModelState, seq: list[int], tree: DraftTree, hidden: bool = False):
        """(logits [N, V] after every node, forward ms, states) from one target forward. A chain goes through
        `ModelState.advance` exactly as `speculative` does (a causal forward over [root, drafts]); a tree through
        the 4-D tree mask on a cache holding exactly seq[:-1]. states: None, or with hidden=True (a drafter that
        reads the target's features) (first position, [m, H] states of the m catch-up positions before the root,
        [N, H] states of the nodes)."""
        lm = target.lm
        n = len(tree)
        if is_chain(tree):
            out, _fed = target.advance(seq, extra=tree.tokens[1:], all_logits=True, hidden=hidden)
            states = (target.last_keep, out.hidden[0, :-n], out.hidden[0, -n:]) if hidden else None
            return out.logits[0, -n:], out.fwd_ms, states
        catch_up_ms = sync_prefix(target, seq[:-1], hidden)                # the prompt's prefill on a first tree round
        out = lm.tree_step(tree, target.cache, hidden=hidden)
        target.forwards += 1
        target.fwd_ms += out.fwd_ms
        states = None
        if hidden:
            start, pre = target.fed_hidden or (len(seq) - 1, out.hidden[:0])
            states = (start, pre, out.hidden)
        return out.logits, out.fwd_ms + catch_up_ms, states

    @staticmethod
    def trace_tree(ctx, tree, result, p_rows, logp, ent, rnd, step0, pos0, drafter, draft_ms, verify_ms) -> None:
        """propose and accept/reject rows for every drafted node of this round."""
        lm, trace = ctx.lm, ctx.trace
        checks = {c.node: c for c in result.checks}
        for u in range(1, len(tree)):
            par, tok, d = tree.parent[u], tree.tokens[u], tree.depth[u]
            trace.add("propose", step0 + d - 1, branch_id=u, parent_id=par, position=pos0 + d, token_id=tok,
                      token_text=lm.token_text(tok), model=drafter.name, accepted=None, round=rnd, node=u, depth=d,
                      q=tree.q[u], cum_logq=tree.cum_logq[u], source=tree.source[u], rank=tree.rank[u],
                      multiplicity=tree.multiplicity[u], tree_size=len(tree) - 1,
                      draft_ms=draft_ms if u == 1 else None)
        for u in range(1, len(tree)):
            par, tok, d = tree.parent[u], tree.tokens[u], tree.depth[u]
            verdict = result.verdicts.get(u, "unverified")
            verdict = "unverified" if verdict == "unreached" else verdict
            c = checks.get(u)
            trace.add("accept" if verdict == "accepted" else "reject", step0 + d - 1, branch_id=u, parent_id=par,
                      position=pos0 + d, token_id=tok, token_text=lm.token_text(tok), logprob=float(logp[par, tok]),
                      entropy=ent[par], accepted=verdict == "accepted", round=rnd, node=u, depth=d,
                      p=float(p_rows[par, tok]), q=tree.q[u], accept_prob=None if c is None else c.accept_prob,
                      u=None if c is None else c.u, verdict=verdict, verify_ms=verify_ms if u == 1 else None)


def is_chain(tree: DraftTree) -> bool:
    return all(len(c) <= 1 for c in tree.children)


class Tally:
    """Per-run counts behind TreeMetrics."""

    def __init__(self):
        self.rounds = self.drafted = self.accepted = self.emitted = 0
        self.expected = 0.0
        self.has_probs = False
        self.reached: dict[int, int] = {}         # depth d -> rounds whose path reached depth d
        self.offered: dict[int, int] = {}         # depth d -> rounds whose path reached d-1 with a node at depth d

    def add(self, tree: DraftTree, result, emitted: int) -> None:
        self.rounds += 1
        self.drafted += len(tree) - 1
        self.accepted += len(result.path) - 1
        self.emitted += emitted
        reach = len(result.path) - 1
        depths = set(tree.depth[1:])
        for d in depths:
            if reach >= d - 1:
                self.offered[d] = self.offered.get(d, 0) + 1
                self.reached[d] = self.reached.get(d, 0) + (reach >= d)
        if tree.scheme != "deterministic" or any(q < 1.0 for q in tree.q[1:]):
            self.has_probs = True
        self.expected += sum(math.exp(c) for c in tree.cum_logq[1:])

    def metrics(self, drafter) -> TreeMetrics:
        r = max(self.rounds, 1)
        mean_len = self.emitted / r
        nodes = self.drafted / r
        model = isinstance(drafter, ModelTreeDrafter)
        return TreeMetrics(
            drafter=drafter.name, rounds=self.rounds, target_forwards=self.rounds, tree_nodes_mean=round(nodes, 4),
            drafted=self.drafted, accepted=self.accepted,
            acceptance_rate=round(self.accepted / self.drafted, 6) if self.drafted else None,
            mean_accepted_length=round(mean_len, 6),
            acceptance_by_depth={str(d): round(self.reached[d] / n, 4) for d, n in sorted(self.offered.items()) if n},
            node_efficiency=round((mean_len - 1) / nodes, 6) if nodes else None,
            expected_accepted_length=round(1 + self.expected / r, 6) if model and self.has_probs else None,
            table_coverage=drafter.coverage)
