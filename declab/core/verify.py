"""Tree verifiers: given a draft tree and the target's distributions at its nodes, walk down the tree accepting at
most one child per node, and emit the accepted tokens plus one final token (a bonus after an accepted leaf, or a
token resampled where the walk stopped). Pure functions on tensors; all randomness comes from the run's generator.

Methods (`verify_tree(..., method=...)`; spec: docs/strategies.md#spec_tree):

* "greedy" (A.4): while argmax p_u is the token of a child of u, descend; then emit argmax p_u. No randomness.
* "multi_round" (B.1, SpecInfer multi-round rejection; children i.i.d. from dist[u]): r <- p; for each draw x_j:
  accept with probability min(1, r(x_j)/q(x_j)), else r <- norm(max(0, r - q)). None accepted: emit y ~ r.
  A merged duplicate (multiplicity m) is tested once per copy, so the residual is updated once per copy.
* "rsd" (B.2, Recursive Speculative Decoding; children drawn without replacement): the same loop with q_j = dist[u]
  restricted to the tokens not drawn before x_j, renormalised.
* "spectr" (B.3, SpecTr K-SEQ; children i.i.d.): rho in [1, k] the smallest value with (1 - (1-beta)^k)/beta <= rho
  (bisection), beta = sum_v min(q(v), p(v)/rho); accept x_j with probability min(1, p(x_j)/(rho q(x_j))), p is not
  updated; none accepted: y ~ p_res = [p - min(q, p/rho)(1 - (1-beta)^k)/beta] / (1-beta)^k. Computed in float64
  on normalised p, q, with a 1e-12 margin on the rho condition so p_res >= 0 survives rounding (`kseq_params`).
* "point_mass" (B.4): accept x_j with probability r(x_j), else r(x_j) <- 0 and renormalise; after all children
  y ~ r. Exact for any set of drafts chosen without looking at the verifier's uniforms. **A tree with scheme
  "deterministic" (dist[u] is None: top-k / table drafters) is verified with this rule whatever stochastic method is
  asked for** (there is no q to use); an explicit "point_mass" works on any tree (a lower-acceptance baseline).

multi_round and spectr need scheme "iid", rsd needs "without_replacement" (anything else raises ValueError: the
other combinations are not exact).

Draw order of merged duplicates. The tree merges repeated sibling tokens into one node (first-draw order plus a
multiplicity), which loses where the later copies were drawn. Verifying the copies right after the first one is not
exact (max error 0.073 on V = 5, k = 3 toys, measured by enumeration). Under i.i.d. drafting every draw sequence consistent with the
children's first-draw order and multiplicities is equally likely, so the verifier draws one such sequence uniformly
and verifies in that order, which is exact. Built from the last-drawn child backwards: the sequence of children
i..n-1 starts with child i and its other m_i - 1 copies take a uniformly chosen set of the remaining slots.

Random stream (fixed order). Walking from the root, at each visited node u:
1. only for multi_round / spectr when a child of u has multiplicity > 1: for each child i (last-drawn first) with
   m_i > 1 and later-drawn siblings, one `torch.randperm(L + m_i - 1, generator=generator)` (L = copies of the
   later-drawn children), whose first m_i - 1 entries place the extra copies;
2. for each tested draw, in the draw order: one `u = float(torch.rand((), generator=generator, device=p.device))`
   (default float32 dtype), accepted iff u < accept_prob (copies of a point-mass child are not tested: they cannot
   change anything);
3. the first accepted draw ends the node (descend to it); if none is accepted, one `draw_from(residual, generator)`
   and the walk stops ("resampled"). A node without children emits `draw_from(p_u, generator)` ("bonus").
An accepted EOS token ends the walk at once (nothing more is drawn; final_origin "none").

For a chain tree (one child per node) with multi_round this is exactly the chain speculative sampling of
strategies/two_model.py (`speculative_step` per draft, then `draw_from(p_leaf)`), uniform for uniform, in the same
dtype, so the tokens and the generator's state match; a deterministic chain likewise matches `speculative_step`
with a one-hot q.

Medusa's typical acceptance (`verify_typical`, D.1; lossy, not the target's distribution): node c under u is
accepted iff p_u(x_c) > min(epsilon, delta exp(-H_u)), H_u = -sum_v p_u(v) ln(p_u(v) + 1e-5); of the root-to-node
paths whose every node is accepted the longest is kept (ties: the highest sum of ln p_u(x_c)); the final token is
drawn from p at the path's end with the tokens at or below that node's threshold removed (renormalised). One
`draw_from` per round, nothing else random.

Diagnostics: `alpha[u]` = the node's acceptance probability in closed form where one exists (greedy 1/0; point
masses sum_j p(x_j); K-SEQ 1 - (1-beta)^k; multi_round 1 - prod_j (1 - sum_v min(q, r_{j-1})) over the k draws, since
the residual after j rejections does not depend on which tokens were rejected [derived]); `alpha_star(p, q, k, scheme)`
is the optimal acceptance of any verifier for that draft scheme (B.5). `node_law` gives the exact law of the token a
node emits for a given draw sequence (the tests enumerate it).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch

from declab.core.sampling import draw_from
from declab.core.tree import DraftTree

METHODS = ("greedy", "multi_round", "rsd", "spectr", "point_mass")
TYPICAL_THRESHOLD, TYPICAL_ALPHA = 0.09, 0.3   # Medusa's posterior_threshold (epsilon), posterior_alpha (delta)
NEEDS_SCHEME = {"multi_round": "iid", "spectr": "iid", "rsd": "without_replacement"}


@dataclass
class ChildCheck:
    """One tested draw of a child (one accept/reject trace row). For a merged duplicate there is one row per tested
    copy (`copy` = 0 for the first)."""

    node: int
    token: int
    q: float                     # the draft probability the test used (q_j(x) for rsd, 1.0 for point masses)
    p: float                     # target probability p_u(x)
    r_before: float              # current residual r(x) before the test (p(x) for spectr / greedy)
    accept_prob: float
    u: float | None              # the uniform (None for greedy)
    verdict: str                 # accepted | rejected
    residual_mass: float | None  # unnormalised mass of the residual after a rejection (None otherwise)
    multiplicity: int
    copy: int = 0


@dataclass
class TreeResult:
    path: list[int]              # accepted node ids, root first
    emitted: list[int]           # tokens of path[1:], then the final token; cut after the first EOS
    final_origin: str            # "bonus" | "resampled" | "none" (the walk ended on an accepted EOS)
    checks: list[ChildCheck]     # every tested draw, in visit order
    verdicts: dict[int, str]     # every non-root node -> accepted | rejected | unreached
    alpha: dict[int, float] = field(default_factory=dict)   # visited node -> closed-form acceptance probability
    rho: dict[int, float] = field(default_factory=dict)     # visited node -> K-SEQ rho
    final_token: int | None = None                          # the bonus / resampled token (None after an EOS)


# ------------------------------------------------------------------------------------------------ node rules
def _residual(r: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, float]:
    """norm(max(0, r - q)) and its unnormalised mass; falls back to r when the difference has no mass (rounding).
    The same arithmetic as strategies/two_model.py `residual`, so chains match bit for bit."""
    d = (r - q).clamp_min(0)
    s = float(d.sum())
    return (d / s if s > 1e-12 else r), s


class _MultiRound:
    """The residual after j rejections does not depend on which tokens were rejected (q is the same for every
    draw), so the sequence r_0 = p, r_1, ... is computed once and shared by the test and the closed-form alpha."""

    def __init__(self, p: torch.Tensor, q: torch.Tensor):
        self.p, self.q = p, q
        self.rs, self.masses, self.j = [p], [], 0

    def _upto(self, j: int) -> None:
        while len(self.rs) <= j:
            r, s = _residual(self.rs[-1], self.q)
            self.rs.append(r)
            self.masses.append(s)

    @property
    def r(self) -> torch.Tensor:
        return self.rs[self.j]

    def test(self, x: int) -> tuple[float, float, float]:
        qx, rx = float(self.q[x]), float(self.r[x])
        return (1.0 if qx <= 0 else min(1.0, rx / qx)), qx, rx

    def reject(self, x: int) -> float | None:
        self.j += 1
        self._upto(self.j)
        return self.masses[self.j - 1]

    def final(self) -> torch.Tensor:
        return self.r

    def alpha(self, k: int) -> float:
        """1 - prod_{j<k} (1 - sum_v min(q, r_j)): the acceptance probability over k i.i.d. draws [derived]."""
        self._upto(k - 1)
        miss = 1.0
        for r in self.rs[:k]:
            miss *= max(0.0, 1.0 - float(torch.minimum(self.q, r).sum()))
        return 1.0 - miss


class _RSD:
    def __init__(self, p: torch.Tensor, q: torch.Tensor):
        self.p, self.q, self.r = p, q, p
        self.q0, self.drawn = q, []

    def test(self, x: int) -> tuple[float, float, float]:
        qx, rx = float(self.q[x]), float(self.r[x])
        return (1.0 if qx <= 0 else min(1.0, rx / qx)), qx, rx

    def reject(self, x: int) -> float | None:
        self.r, s = _residual(self.r, self.q)          # r <- norm(max(0, r - q_j)), then q_{j+1} excludes x
        self.drawn.append(int(x))
        rest = self.q0.clone()
        rest[self.drawn] = 0
        m = float(rest.sum())
        self.q = rest / m if m > 0 else rest
        return s

    def final(self) -> torch.Tensor:
        return self.r


class _KSeq:
    def __init__(self, p: torch.Tensor, q: torch.Tensor, k: int):
        self.rho, self.beta, self.p_res = kseq_params(p, q, k)
        self.p, self.q = p.double() / p.double().sum(), q.double() / q.double().sum()
        self.k = k

    def test(self, x: int) -> tuple[float, float, float]:
        qx, px = float(self.q[x]), float(self.p[x])
        return (1.0 if qx <= 0 else min(1.0, px / (self.rho * qx))), qx, px

    def reject(self, x: int) -> float | None:
        return None

    def final(self) -> torch.Tensor:
        return self.p_res.clamp_min(0)


class _PointMass:
    def __init__(self, p: torch.Tensor):
        self.p, self.r = p, p

    def test(self, x: int) -> tuple[float, float, float]:
        rx = float(self.r[x])
        return min(1.0, rx), 1.0, rx

    def reject(self, x: int) -> float | None:
        d = self.r.clone()                       # = (r - onehot(x)).clamp_min(0), bit for bit
        d[int(x)] = 0
        s = float(d.sum())
        self.r = d / s if s > 1e-12 else self.r
        return s

    def final(self) -> torch.Tensor:
        return self.r


def _rule(method: str, p: torch.Tensor, q: torch.Tensor | None, k: int):
    if method == "point_mass":
        return _PointMass(p)
    if q is None:
        raise ValueError(f"method {method!r} needs the draft distribution of the node's children")
    if method == "multi_round":
        return _MultiRound(p, q)
    if method == "rsd":
        return _RSD(p, q)
    if method == "spectr":
        return _KSeq(p, q, k)
    raise ValueError(f"unknown method {method!r}")


def node_law(method: str, p: torch.Tensor, q: torch.Tensor | None, draws: list[int]) -> tuple[torch.Tensor, float]:
    """The exact law ([V] float64) of the token one node emits when its children were drawn as the ordered
    sequence `draws` (repeats allowed for i.i.d. draws), and the probability that one of them is accepted. The
    same arithmetic as `verify_tree` (point_mass tests each distinct token once, as there)."""
    if method == "point_mass":
        seen: list[int] = []
        for x in draws:
            if x not in seen:
                seen.append(x)
        draws = seen
    rule = _rule(method, p, q, len(draws))
    law = torch.zeros(p.shape[-1], dtype=torch.float64)
    reach = 1.0
    for x in draws:
        a, _, _ = rule.test(int(x))
        law[int(x)] += reach * a
        reach *= 1.0 - a
        rule.reject(int(x))
    fin = rule.final().double()
    law += reach * fin.cpu() / float(fin.sum())
    return law, 1.0 - reach


# ------------------------------------------------------------------------------------------------ K-SEQ
def kseq_params(p: torch.Tensor, q: torch.Tensor, k: int, tol: float = 1e-13) -> tuple[float, float, torch.Tensor]:
    """SpecTr K-SEQ for k i.i.d. drafts: (rho, beta, p_res [V] float64, not clamped), p and q taken in float64 and
    normalised. rho is the smallest value in [1, k] (bisection to `tol`) with h = (1 - (1-beta)^k)/beta <= rho, with
    a 1e-12 margin so that p_res >= 0 survives rounding. Computed from s = 1 - beta = sum_v max(0, q - p/rho) (one
    sort of p/q; no cancellation when beta is near 1), h = sum_{i<k} s^i, and
        p_res = p (rho - h)/rho / s^k                      where p/rho < q,
                ((p - q) - q (h - 1)) / s^k                elsewhere,
    which is the spec's formula rearranged so that both parts are >= 0 term by term."""
    pd, qd = p.double().flatten(), q.double().flatten()
    pd, qd = pd / pd.sum(), qd / qd.sum()
    ratio = torch.where(qd > 0, pd / qd.clamp_min(1e-300), torch.full_like(pd, float("inf")))
    order = torch.argsort(ratio)
    rs = ratio[order].tolist()
    pc = [0.0] + pd[order].cumsum(0).tolist()
    qc = [0.0] + qd[order].cumsum(0).tolist()

    def h_of(rho: float) -> float:               # s = sum over ratio < rho of (q - p/rho)
        i = bisect.bisect_left(rs, rho)
        s = max(0.0, qc[i] - pc[i] / rho)
        return sum(s ** j for j in range(k))

    if k <= 1:
        rho = 1.0
    else:
        lo, hi = 1.0, float(k)
        while hi - lo > tol:
            mid = 0.5 * (lo + hi)
            if mid >= h_of(mid) + 1e-12:
                hi = mid
            else:
                lo = mid
        rho = hi
    low = pd / rho < qd                                              # min(q, p/rho) = p/rho
    s = float(torch.where(low, qd - pd / rho, torch.zeros_like(qd)).sum())
    beta = 1.0 - s
    miss = s ** k
    hm1 = sum(s ** j for j in range(1, k))                          # h - 1
    if miss <= 0 or beta <= 0:
        p_res = pd.clone()          # never used (acceptance 1) / no overlap: nothing is ever accepted
    else:
        p_res = torch.where(low, pd * ((rho - 1.0 - hm1) / rho), (pd - qd) - qd * hm1) / miss
    return rho, beta, p_res


# ------------------------------------------------------------------------------------------------ alpha*
def alpha_star(p: torch.Tensor, q: torch.Tensor, k: int, scheme: str = "iid") -> float | None:
    """The optimal acceptance probability of any exact verifier for k drafts from q (B.5): min over token sets A of
    p(A) + 1 - Q(all k drafts in A), attained on a prefix of the tokens sorted by p/q ascending. "iid": Q = q(A)^k,
    any k; "without_replacement": k <= 2 (Q = sum_{a in A} q(a)(q(A) - q(a))/(1 - q(a)) at k = 2). None where this
    is not computable (deterministic drafts, without replacement k > 2 or with fewer than k tokens in q's support)."""
    if k < 1 or scheme not in ("iid", "without_replacement"):
        return None
    pd, qd = p.double().flatten(), q.double().flatten()
    pd, qd = pd / pd.sum(), qd / qd.sum()
    ratio = torch.where(qd > 0, pd / qd.clamp_min(1e-300), torch.full_like(pd, float("inf")))
    order = torch.argsort(ratio, stable=True)
    ps, qs = pd[order], qd[order]
    zero = torch.zeros(1, dtype=torch.float64)
    pa = torch.cat([zero, ps.cumsum(0)])                    # [V+1] p(A) over the prefixes
    qa = torch.cat([zero, qs.cumsum(0)])
    if scheme == "iid" or k == 1:
        qall = qa ** k
    elif k == 2:
        if int((qd > 0).sum()) < 2 or float(qd.max()) >= 1.0 - 1e-15:
            return None
        w = qs / (1.0 - qs)
        qall = qa * torch.cat([zero, w.cumsum(0)]) - torch.cat([zero, (qs * w).cumsum(0)])
    else:
        return None
    return float((pa + 1.0 - qall).min().clamp(0.0, 1.0))


# ------------------------------------------------------------------------------------------------ the walk
def _arranged(tree: DraftTree, u: int, generator: torch.Generator) -> list[int]:
    """A uniformly random draw sequence (child ids, copies repeated) consistent with the children's first-draw
    order and multiplicities (see the module docstring)."""
    kids = tree.children[u]
    seq: list[int] = []
    for c in reversed(kids):
        m = tree.multiplicity[c]
        if m > 1 and seq:
            n = len(seq) + m - 1
            extra = set(torch.randperm(n, generator=generator, device=generator.device)[:m - 1].tolist())
            rest = iter(seq)
            seq = [c] + [c if i in extra else next(rest) for i in range(n)]
        else:
            seq = [c] * m + seq
    return seq


def verify_tree(tree: DraftTree, target_probs: torch.Tensor, method: str, generator: torch.Generator,
                eos_ids=frozenset()) -> TreeResult:
    """Verify one draft tree. target_probs: [N, V], row u = the target's warped next-token distribution after node
    u (one-hot argmax rows are fine for greedy). See the module docstring for the methods and the random stream."""
    return _verify(tree, target_probs, method, generator, eos_ids)


def _verify(tree: DraftTree, target_probs: torch.Tensor, method: str, generator: torch.Generator,
            eos_ids=frozenset(), *, arrange: bool = True, duplicate_updates: bool = True) -> TreeResult:
    """verify_tree with two switches for negative controls only: arrange=False verifies a duplicate's copies right
    after its first draw; duplicate_updates=False tests each merged node once (the B.1 pitfall). Both are inexact."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    n = len(tree)
    if target_probs.dim() != 2 or target_probs.shape[0] != n:
        raise ValueError(f"target_probs must be [N={n}, V], got {tuple(target_probs.shape)}")
    rule_name = method
    if method != "greedy":
        if tree.scheme == "deterministic":
            rule_name = "point_mass"
        elif method in NEEDS_SCHEME and tree.scheme != NEEDS_SCHEME[method]:
            raise ValueError(f"method {method!r} needs drafts drawn with scheme {NEEDS_SCHEME[method]!r}, "
                             f"the tree has {tree.scheme!r}")
    eos = frozenset(int(e) for e in eos_ids)
    path, checks = [0], []
    verdicts = {v: "unreached" for v in range(1, n)}
    alpha: dict[int, float] = {}
    rho: dict[int, float] = {}
    u, final, origin = 0, None, "none"
    while True:
        p = target_probs[u]
        kids = tree.children[u]
        if method == "greedy":
            t = int(p.argmax())
            hit = None
            for c in kids:
                ok = tree.tokens[c] == t
                px = float(p[tree.tokens[c]])
                checks.append(ChildCheck(c, tree.tokens[c], tree.q[c], px, px, float(ok), None,
                                         "accepted" if ok else "rejected", None, tree.multiplicity[c]))
                verdicts[c] = "accepted" if ok else "rejected"
                hit = c if ok else hit
            if kids:
                alpha[u] = 1.0 if hit is not None else 0.0
            if hit is None:
                final, origin = t, ("resampled" if kids else "bonus")
                break
            accepted = hit
        else:
            if not kids:
                final, origin = draw_from(p, generator), "bonus"
                break
            q = tree.dist.get(u)
            if rule_name == "point_mass":
                seq = list(kids)
            elif rule_name == "rsd":
                if any(tree.multiplicity[c] > 1 for c in kids):
                    raise ValueError(f"node {u}: a duplicate child under scheme 'without_replacement'")
                seq = list(kids)
            elif not duplicate_updates:
                seq = list(kids)
            elif arrange:
                seq = _arranged(tree, u, generator)
            else:
                seq = [c for c in kids for _ in range(tree.multiplicity[c])]
            rule = _rule(rule_name, p, q, len(seq))
            if rule_name == "point_mass":
                alpha[u] = min(1.0, float(sum(float(p[tree.tokens[c]]) for c in kids)))
            elif rule_name == "spectr":
                rho[u] = rule.rho
                alpha[u] = 1.0 - (1.0 - rule.beta) ** len(seq)
            elif rule_name == "multi_round":
                alpha[u] = rule.alpha(len(seq))
            accepted, copies = None, {}
            for c in seq:
                x = tree.tokens[c]
                a, qx, rx = rule.test(x)
                uu = float(torch.rand((), generator=generator, device=p.device))
                cp = copies.get(c, 0)
                copies[c] = cp + 1
                ok = uu < a
                mass = None if ok else rule.reject(x)
                checks.append(ChildCheck(c, x, qx, float(p[x]), rx, a, uu, "accepted" if ok else "rejected", mass,
                                         tree.multiplicity[c], cp))
                verdicts[c] = "accepted" if ok else "rejected"
                if ok:
                    accepted = c
                    break
            if accepted is None:
                final, origin = draw_from(rule.final(), generator), "resampled"
                break
        path.append(accepted)
        if tree.tokens[accepted] in eos:
            break
        u = accepted
    emitted = [tree.tokens[c] for c in path[1:]] + ([] if final is None else [int(final)])
    for i, t in enumerate(emitted):
        if t in eos:
            emitted = emitted[:i + 1]
            break
    return TreeResult(path, emitted, origin, checks, verdicts, alpha, rho, None if final is None else int(final))


def typical_threshold(p: torch.Tensor, epsilon: float = TYPICAL_THRESHOLD, delta: float = TYPICAL_ALPHA) -> float:
    """min(epsilon, delta exp(-H)), H = -sum p ln(p + 1e-5) (Medusa's `get_typical_posterior_mask`)."""
    h = float(-(p * torch.log(p + 1e-5)).sum())
    return min(epsilon, delta * float(torch.exp(torch.tensor(-h))))


def verify_typical(tree: DraftTree, target_probs: torch.Tensor, generator: torch.Generator, eos_ids=frozenset(),
                   epsilon: float = TYPICAL_THRESHOLD, delta: float = TYPICAL_ALPHA) -> TreeResult:
    """Medusa's typical acceptance (see the module docstring). target_probs: [N, V] warped target distributions."""
    n = len(tree)
    if target_probs.dim() != 2 or target_probs.shape[0] != n:
        raise ValueError(f"target_probs must be [N={n}, V], got {tuple(target_probs.shape)}")
    eos = frozenset(int(e) for e in eos_ids)
    thresholds = [typical_threshold(target_probs[u], epsilon, delta) for u in range(n)]
    ok = {0: True}
    score = {0: 0.0}
    checks, verdicts = [], {}
    for c in range(1, n):                                        # parents come first (topological order)
        u, x = tree.parent[c], tree.tokens[c]
        px = float(target_probs[u, x])
        good = bool(ok.get(u, False)) and (u == 0 or tree.tokens[u] not in eos) and px > thresholds[u]
        if ok.get(u, False) and (u == 0 or tree.tokens[u] not in eos):
            checks.append(ChildCheck(c, x, tree.q[c], px, px, float(px > thresholds[u]), None,
                                     "accepted" if px > thresholds[u] else "rejected", None, tree.multiplicity[c]))
            verdicts[c] = "accepted" if px > thresholds[u] else "rejected"
        else:
            verdicts[c] = "unreached"
        ok[c] = good
        score[c] = score[u] + float(torch.log(torch.tensor(max(px, 1e-30))))
    best = max((c for c in range(n) if ok[c]), key=lambda c: (tree.depth[c], score[c], -c))
    path = tree.path_to(best)
    for c in range(1, n):                     # accepted = on the kept path (a typical node off it was not used)
        if verdicts[c] == "accepted" and c not in path:
            verdicts[c] = "rejected"
    end = path[-1]
    if end and tree.tokens[end] in eos:
        final, origin = None, "none"
    else:
        p = target_probs[end].clone()
        p[p <= thresholds[end]] = 0.0
        if float(p.sum()) <= 0:
            p = target_probs[end]
        final = draw_from(p / p.sum(), generator)
        origin = "bonus" if not tree.children[end] else "resampled"
    emitted = [tree.tokens[c] for c in path[1:]] + ([] if final is None else [int(final)])
    for i, t in enumerate(emitted):
        if t in eos:
            emitted = emitted[:i + 1]
            break
    return TreeResult(path, emitted, origin, checks, verdicts, final_token=None if final is None else int(final))
