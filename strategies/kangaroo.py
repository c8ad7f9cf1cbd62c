"""Kangaroo: lossless self-speculative decoding by double early exiting, as a drafter of the tree speculative
strategy `spec_tree` (`drafter = kangaroo`). Spec: docs/strategies.md#spec_tree; dossier D.4.

Paper: Liu et al., "Kangaroo: Lossless Self-Speculative Decoding via Double Early Exiting", arXiv 2404.18911;
reference code Equationliu/Kangaroo (kangaroo/adapter.py, evaluation/inference_kangaroo.py, train.py).

The draft model is the target itself cut at layer E: its shallow layers [0, E) (the target's weights and the
target's own KV cache), then a small trained adapter (RMSNorm -> self-attention with residual, no MLP -> final
RMSNorm; `declab.models.split.KangarooAdapter`, its own one-layer KV cache), then the target's frozen LM head. The
first early exit is that shallow sub-network; the second is the draft loop stopping as soon as the adapter is
unsure. One round:

    propose:  per drafted token, layers [0, E) on the previous token (their KV go into the target's cache), the
              adapter, the LM head; the token is the argmax; stop after a token whose top-1 probability < eta (that
              token is still proposed and verified), after an EOS, or at the cap min(tree_budget, tree_depth)
    verify:   layers [0, E) on the last drafted token (not needed for drafting), then ONLY layers [E, L) on the
              stacked shallow states of [root + drafts]: one round costs (L - E) / L of a target forward plus the
              drafting, which is what the paper counts
    observe:  every layer of the target's cache and the adapter's cache is cropped to the accepted length
              (prefix + root + accepted drafts = len(seq) - 1); when every draft was accepted the adapter lacks the
              last draft's position, which the next round feeds together with the new root (the reference's
              `hidden_state_early_last`)

Kangaroo drafts a CHAIN: `branching` is ignored (the reference drafts one token per step; a tree would need one
adapter and shallow forward per frontier node). Drafts are argmaxes (point masses, scheme "deterministic"), so greedy
verification reproduces target greedy decoding token for token and every stochastic rule of spec_tree stays exact.
Each node's q is the adapter's top-1 probability (for the trace; the stop rule reads it).

Paper / reference symbol -> parameter:
    E (EARLY_STOP_LAYER, exit layer; 2)           -> `exit_layer` in the heads file's info (the adapter is trained
                                                     for one E)
    eta (threshold; 0.6)                           -> eta = spec_tree `confidence_threshold`
    SPECULATIVE_DECODING_STEPS (max draft steps 6) -> min(tree_budget, tree_depth)
    adapter A                                      -> KangarooAdapter, trained by tools/heads_kangaroo.py, stored in
                                                     declab/models/heads/<model>/kangaroo.safetensors

Costs: `fwd_ms` (the drafter's forward time in the last propose: shallow layers, adapter, head) and the ms that
`verify_forward` returns (the deep layers, the last draft's shallow layers, and on the first round the prompt's
prefill) are disjoint. On the first round the drafter prefills seq[:-1] with a full target forward (split: shallow
then deep) and the adapter over the prompt's h_E; the target's share is reported in the first verify_forward.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from declab.core.errors import UserError
from declab.core.tree import DraftTree
from strategies.tree_drafters import TreeDrafter
from strategies.two_model import ModelState, common_prefix


def load_adapter(lm):
    """(the trained adapter of `lm`, the file's info): `lm.trained_head("kangaroo")` (declab/models/heads.py,
    loaded once per model and shared, frozen, on the model's device and dtype; a UserError when there is none). The
    adapter is a `declab.models.split.KangarooAdapter`, which also carries the target's split forward."""
    if not hasattr(lm, "trained_head"):
        raise UserError(f"model '{lm.key}' has no trained drafting heads; drafter 'kangaroo' needs them: use "
                        f"smollm2-135m-instruct")
    head = lm.trained_head("kangaroo")
    return head.module, head.info


class KangarooDrafter(TreeDrafter):
    """Kangaroo's self-draft (see the module docstring). One object per run: it holds the run's shared target cache
    (handed to the strategy's target ModelState in the first verify_forward) and the adapter's cache.

    lm: the target LM; eta: the confidence threshold (stop after a draft whose top-1 probability < eta; 0 = never
    stop early, 1 = always one token); eos_ids: drafting stops after one of them; adapter: a KangarooAdapter (None:
    the trained one of `lm`), its `exit_layer` is E."""

    name = "kangaroo"
    scheme = "deterministic"
    needs_hidden = False

    def __init__(self, lm, eta: float, eos_ids, adapter=None):
        self.lm, self.eta, self.eos_ids = lm, float(eta), frozenset(int(t) for t in eos_ids)
        self.info_file: dict = {}
        if adapter is None:
            adapter, self.info_file = load_adapter(lm)
        self.adapter = adapter                                                 # frozen, eval (shared when loaded)
        self.exit_layer = int(adapter.exit_layer)                              # E
        self.num_layers = len(lm.model.model.layers)                           # L
        if not 1 <= self.exit_layer < self.num_layers:
            raise UserError(f"kangaroo exit layer must be in [1, {self.num_layers - 1}], got {self.exit_layer}")
        self.head = lm.model.lm_head                                           # the target's frozen LM head
        self.fwd_ms = 0.0
        self.reset([])

    # ------------------------------------------------------------------------------------------- state
    def reset(self, prompt_ids: list[int]) -> None:
        self.cache = None                  # the shared target cache (layers < E may run ahead while drafting)
        self.acache = None                 # the adapter's one-layer cache
        self.ids: list[int] = []           # tokens whose KV every target layer holds (after observe: seq[:-1])
        self.pending = None                # [1, m, H] h_E of the positions after the adapter's cache, up to ids
        self.node_h: list[torch.Tensor] = []   # this round's shallow states, node u -> [1, 1, H] at position P + u
        self.round_len = -1                # len(seq) of the last propose
        self.target_ms = 0.0               # target forward ms spent outside verify_forward (prefill / catch-up)
        self.target_forwards = 0
        self.target: ModelState | None = None  # the strategy's target state (set by verify_forward)
        self.last = {}

    def _adapter_len(self) -> int:
        lens = self.adapter.cache_lengths(self.acache)
        return lens[0] if lens else 0

    def _adapt(self, h_e: torch.Tensor) -> torch.Tensor:
        """The adapter on the pending h_E and then h_e [1, T, H] (appended to its cache). Returns the post-norm
        states [1, m+T, H]."""
        if self.pending is not None:
            h_e = torch.cat([self.pending, h_e], dim=1)                        # [1, m+T, H]
            self.pending = None
        with torch.inference_mode():
            return self.adapter(h_e, self.acache)                              # [1, m+T, H]

    def _sync(self, seq: list[int]) -> None:
        """Make every target layer hold exactly seq[:-1] and the adapter's cache (plus `pending`) the same: crop what
        differs, feed what is missing with a full split forward (the first round's prefill). Normally nothing is
        to do: observe left the caches at seq[:-1]."""
        lm, ad = self.lm, self.adapter
        want = list(seq[:-1])
        if self.cache is None:
            self.cache, self.acache, self.ids, self.pending = DynamicCache(config=lm.model.config), DynamicCache(), \
                [], None
        keep = common_prefix(self.ids, want)
        if keep < len(self.ids) or set(ad.cache_lengths(self.cache)) != {len(self.ids)}:
            keep = min([keep] + ad.cache_lengths(self.cache))
            ad.crop(self.cache, keep)
            a = self._adapter_len()
            if keep < a:
                ad.crop(self.acache, keep)
                self.pending = None
            elif self.pending is not None:
                self.pending = self.pending[:, : keep - a] if keep > a else None
            del self.ids[keep:]
        if keep < len(want):                                                   # prefill / catch-up
            t0 = lm.clock_ms()
            h_e = ad.shallow(lm, want[keep:], self.cache)                      # [1, T, H]
            ad.deep_states(lm, h_e, self.cache, head=False)                     # layers [E, L): their KV only
            t1 = lm.clock_ms()
            self.target_ms += t1 - t0
            self.target_forwards += 1
            self._adapt(h_e)
            self.fwd_ms += lm.clock_ms() - t1
            self.ids = want

    # ------------------------------------------------------------------------------------------- rounds
    def propose(self, seq: list[int], budget: int, depth: int, branching: int, generator) -> DraftTree:
        """A chain of at most min(budget, depth) argmax drafts after the root seq[-1] (`branching` is ignored:
        Kangaroo drafts a chain). Stops after a draft whose probability < eta, after an EOS, or at the cap."""
        lm, E = self.lm, self.exit_layer
        self.fwd_ms = 0.0
        self._sync(seq)
        self.round_len, self.node_h = len(seq), []
        tree = DraftTree.rooted(seq[-1], self.scheme)
        cap = min(int(budget), int(depth))
        stop, conf = "cap", None
        t0 = lm.clock_ms()
        u, x = 0, int(seq[-1])
        while len(tree) - 1 < cap:
            h = self.adapter.shallow(lm, [x], self.cache)                      # [1, 1, H]: KV of x into layers < E
            self.node_h.append(h)
            z = self._adapt(h)[:, -1]                                          # [1, H]
            with torch.inference_mode():
                p = self.head(z)[0].float().softmax(-1)                        # [V]
            q, tok = p.max(-1)
            conf, x = float(q), int(tok)
            u = tree.add(u, x, q=conf, source="kangaroo")
            if x in self.eos_ids:
                stop = "eos"
                break
            if conf < self.eta:
                stop = "confidence"
                break
        self.fwd_ms += lm.clock_ms() - t0
        self.last = {"drafted": len(tree) - 1, "stop": stop if cap > 0 else "cap", "last_q": conf,
                     "exit_layer": E, "eta": self.eta}
        return tree

    def verify_forward(self, target: ModelState, seq: list[int], tree: DraftTree, hidden: bool = False):
        """(logits [N, V] float32 of the target after the root and after each drafted node, ms, states): the
        shallow layers on the nodes not run yet (the last draft; the root when no propose came this round), then
        ONLY layers [E, L) on the stacked shallow states of [root + drafts]. The first call hands the shared cache
        to `target` and adds the prefill (done in the first propose) to ms and target.forwards / target.fwd_ms.
        states: None, or with hidden=True (len(seq) - 1, [0, H], [N, H] post-norm states of the nodes)."""
        lm, ad = self.lm, self.adapter
        if self.round_len != len(seq):                                         # a round without propose (depth 0)
            self._sync(seq)
            self.round_len, self.node_h = len(seq), []
        t0 = lm.clock_ms()
        n = len(tree)
        if len(self.node_h) < n:                                               # the chain's tail: one forward
            rest = ad.shallow(lm, tree.tokens[len(self.node_h):], self.cache)  # [1, n - done, H]
            self.node_h.extend(rest.split(1, dim=1))
        h_e = torch.cat(self.node_h[:n], dim=1)                                # [1, N, H]
        f = ad.deep_states(lm, h_e, self.cache)                                # [N, H] layers [E, L) + norm
        with torch.inference_mode():
            logits = self.head(f).float()                                      # [N, V]
        ms = lm.clock_ms() - t0
        target.cache, self.target = self.cache, target
        target.fwd_ms += ms + self.target_ms
        target.forwards += 1 + self.target_forwards
        target.tokens_fed += n
        ms += self.target_ms
        self.target_ms, self.target_forwards = 0.0, 0
        target.ids = list(seq[:-1]) + list(tree.tokens)
        target.last_keep = len(seq) - 1
        target.verified = len(seq)
        states = (len(seq) - 1, f[:0], f) if hidden else None
        return logits, ms, states

    def observe(self, seq: list[int], tree: DraftTree, target_logits, path: list[int]) -> None:
        """Crop the target's cache (every layer) and the adapter's to the accepted length len(seq) - 1 = prefix +
        root + accepted drafts; the accepted positions the adapter has not seen yet become `pending`."""
        n = len(seq) - 1
        p0 = self.round_len - 1                                                # P: the root's position
        self.adapter.crop(self.cache, n)
        a = self._adapter_len()
        if a > n:
            self.adapter.crop(self.acache, n)
            a = n
        # positions [a, n): the pending states not fed this round (a round without drafts) cover [a, P), then
        # this round's nodes from P on
        missing = ([self.pending] if self.pending is not None else []) + self.node_h[max(a, p0) - p0: n - p0]
        self.pending = torch.cat(missing, dim=1) if missing else None         # [1, n - a, H]
        self.ids = list(seq[:-1])
        self.round_len, self.node_h = -1, []
        if self.target is not None:                                            # what the target's cache holds now
            self.target.ids, self.target.verified = list(self.ids), len(self.ids)

    def info(self) -> dict:
        return dict(self.last)
