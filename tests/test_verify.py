"""Tree verifiers (declab/core/verify.py): exactness by enumeration, sampling through verify_tree (chi-square),
negative controls, the optimal acceptance bound, K-SEQ's residual, the greedy walk and the chain equivalence with
strategies/two_model.py. CPU, no model."""

from __future__ import annotations

import bisect
import itertools
import math
import random

import pytest
import torch

from declab.core.sampling import draw_from
from declab.core.tree import DraftTree
from declab.core.verify import _arranged, _verify, alpha_star, kseq_params, node_law, verify_tree
from strategies.two_model import speculative_step

F64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: keep torch from paying thread synchronisation on every op (on a busy machine a 2-thread
    softmax of a [5, 50] tensor took 12 ms instead of 2 us)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def chi2_pvalue(x2: float, df: int) -> float:
    """Upper tail of the chi-square distribution: Q(df/2, x2/2) (regularised upper incomplete gamma)."""
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=F64), torch.tensor(x2 / 2, dtype=F64)))


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, float]:
    """Pearson chi-square of counts against probs (cells with zero probability must have zero counts)."""
    counts, probs = counts.flatten().double(), probs.flatten().double()
    assert float(counts[probs == 0].sum()) == 0
    keep = probs > 0
    e = probs[keep] * counts.sum()
    x2 = float(((counts[keep] - e) ** 2 / e).sum())
    return x2, chi2_pvalue(x2, int(keep.sum()) - 1)


def random_pq(gen: torch.Generator, v: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random target / draft pair with varied shapes: peaked, flat, and with zeros in either support."""
    def one():
        x = torch.rand(v, generator=gen, dtype=F64) ** float(torch.randint(1, 5, (), generator=gen))
        if float(torch.rand((), generator=gen)) < 0.3:
            x[int(torch.randint(v, (), generator=gen))] = 0.0
        return x / x.sum()
    return one(), one()


def iid_tuples(q: torch.Tensor, k: int):
    for t in itertools.product(range(q.shape[0]), repeat=k):
        w = math.prod(float(q[x]) for x in t)
        if w > 0:
            yield list(t), w


def wor_tuples(q: torch.Tensor, k: int):
    """Ordered samples without replacement (sequential draws from the renormalised rest) with their probability."""
    for t in itertools.permutations(range(q.shape[0]), k):
        w, used = 1.0, 0.0
        for x in t:
            if float(q[x]) <= 0 or 1.0 - used <= 0:
                w = 0.0
                break
            w *= float(q[x]) / (1.0 - used)
            used += float(q[x])
        if w > 0:
            yield list(t), w


def enumerated(method: str, p: torch.Tensor, q: torch.Tensor, k: int, order=None) -> tuple[torch.Tensor, float]:
    """Exact law of the first emitted token of a depth-1 tree and its acceptance probability, summing node_law over
    every draft tuple. `order` optionally rewrites each i.i.d. tuple (negative controls)."""
    law, acc = torch.zeros_like(p), 0.0
    tuples = wor_tuples(q, k) if method == "rsd" else iid_tuples(q, k)
    for t, w in tuples:
        lw, a = node_law(method, p, q, order(t) if order else t)
        law += w * lw
        acc += w * a
    return law, acc


def grouped(t: list[int]) -> list[int]:
    """Copies of a repeated draft moved right after its first draw (what a merged tree suggests)."""
    return [x for x in dict.fromkeys(t) for _ in range(t.count(x))]


def distinct(t: list[int]) -> list[int]:
    return list(dict.fromkeys(t))


# ------------------------------------------------------------------------------------------------ (a) enumeration
ENUM_ERR: dict[str, float] = {}


@pytest.mark.parametrize("method", ["multi_round", "spectr", "rsd", "point_mass"])
def test_enumeration_emits_p_exactly(method):
    gen = torch.Generator().manual_seed(11)
    worst = 0.0
    for case in range(40):
        v, k = 4 + case % 3, 2 + case % 2
        p, q = random_pq(gen, v)
        if method == "point_mass":       # drafts are a fixed ordered set: every ordered k-subset
            for t in itertools.permutations(range(v), k):
                worst = max(worst, float((node_law(method, p, None, list(t))[0] - p).abs().max()))
            continue
        law, _ = enumerated(method, p, q, k)
        worst = max(worst, float((law - p).abs().max()))
    ENUM_ERR[method] = worst
    assert worst < 1e-12, (method, worst)


def test_enumeration_negative_controls_fail():
    """Skipping the duplicate's residual update (B.1 pitfall), or verifying a duplicate's copies right after its
    first draw (order lost by merging), is not exact; the uniform re-arrangement verify_tree does is."""
    gen = torch.Generator().manual_seed(5)
    worst = {"skip": 0.0, "grouped_mss": 0.0, "grouped_kseq": 0.0}
    for case in range(15):
        p, q = random_pq(gen, 4 + case % 3)
        worst["skip"] = max(worst["skip"], float((enumerated("multi_round", p, q, 3, distinct)[0] - p).abs().max()))
        worst["grouped_mss"] = max(worst["grouped_mss"],
                                   float((enumerated("multi_round", p, q, 3, grouped)[0] - p).abs().max()))
        worst["grouped_kseq"] = max(worst["grouped_kseq"],
                                    float((enumerated("spectr", p, q, 3, grouped)[0] - p).abs().max()))
    ENUM_ERR.update({f"control_{k}": v for k, v in worst.items()})
    assert all(v > 1e-2 for v in worst.values()), worst


def consistent(seq: list[int], kids: list[int], mult: list[int]) -> bool:
    return list(dict.fromkeys(seq)) == kids and all(seq.count(c) == m for c, m in zip(kids, mult))


def test_arrangement_is_uniform_over_consistent_draw_orders():
    tree = DraftTree.rooted(0, "iid")
    for tok in [3, 1, 3, 2, 1, 3]:                       # children 1 (token 3) x3, 2 (token 1) x2, 3 (token 2) x1
        tree.add(0, tok)
    kids, mult = tree.children[0], [tree.multiplicity[c] for c in tree.children[0]]
    support = sorted({s for s in itertools.permutations([c for c, m in zip(kids, mult) for _ in range(m)])
                      if consistent(list(s), kids, mult)})
    index = {s: i for i, s in enumerate(support)}
    gen = torch.Generator().manual_seed(3)
    counts = torch.zeros(len(support))
    for _ in range(6000):
        seq = _arranged(tree, 0, gen)
        assert consistent(seq, kids, mult)
        counts[index[tuple(seq)]] += 1
    _, pv = chi2(counts, torch.full((len(support),), 1.0 / len(support)))
    assert pv > 1e-3, pv


# ------------------------------------------------------------------------------------------------ (b, c) sampling
V, K, DEPTH = 5, 3, 2


def _toy_tables():
    """p(.|context) and q(.|context) on the last <= 2 tokens (31 contexts), q more peaked so duplicates are common."""
    gen = torch.Generator().manual_seed(2024)
    p = (torch.randn(31, V, generator=gen, dtype=F64) * 1.2).softmax(-1)
    q = (torch.randn(31, V, generator=gen, dtype=F64) * 2.0).softmax(-1)
    return p, q


P_TAB, Q_TAB = _toy_tables()
Q_CDF = [list(itertools.accumulate(row)) for row in Q_TAB.tolist()]
Q_TOP = [torch.topk(row, K).indices.tolist() for row in Q_TAB]


def ctx_index(ctx: tuple[int, ...]) -> int:
    ctx = ctx[-2:]
    return 0 if not ctx else 1 + ctx[0] if len(ctx) == 1 else 1 + V + V * ctx[0] + ctx[1]


def draft(ctx: tuple[int, ...], root: int, scheme: str, rng: random.Random) -> tuple[DraftTree, torch.Tensor]:
    """A depth-2 tree with K draws per node from q(.|context), as a drafter would (seeded), and its target rows."""
    tree = DraftTree.rooted(root, scheme)
    ctxs, frontier = [ctx], [0]
    for _ in range(DEPTH):
        nxt = []
        for u in frontier:
            i = ctx_index(ctxs[u])
            if scheme == "deterministic":
                toks = Q_TOP[i]
            else:
                tree.dist[u] = Q_TAB[i]
                if scheme == "iid":
                    toks = [min(bisect.bisect_right(Q_CDF[i], rng.random() * Q_CDF[i][-1]), V - 1) for _ in range(K)]
                else:                                       # sequential draws from the renormalised rest
                    toks, w = [], Q_TAB[i].tolist()
                    for _ in range(K):
                        cdf = list(itertools.accumulate(w))
                        t = min(bisect.bisect_right(cdf, rng.random() * cdf[-1]), V - 1)
                        while w[t] == 0:                    # rounding at the top end: the last positive one
                            t -= 1
                        toks.append(t)
                        w[t] = 0.0
            for t in toks:
                n0 = len(tree)
                c = tree.add(u, t, float(Q_TAB[i][t]))
                if len(tree) > n0:
                    ctxs.append(ctxs[u] + (t,))
                    nxt.append(c)
        frontier = nxt
    return tree, P_TAB[[ctx_index(c) for c in ctxs]]


def joint_counts(method: str, scheme: str, rounds: int, seed: int, **flags) -> torch.Tensor:
    """Counts of the first two emitted tokens (a second round when the first emits only one)."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    counts = torch.zeros(V, V)
    for _ in range(rounds):
        tree, rows = draft((), 0, scheme, rng)
        out = _verify(tree, rows, method, gen, **flags).emitted
        if len(out) < 2:
            tree, rows = draft((out[0],), out[0], scheme, rng)
            out = out + _verify(tree, rows, method, gen, **flags).emitted
        counts[out[0], out[1]] += 1
    return counts


EXACT_JOINT = P_TAB[0][:, None] * P_TAB[1:1 + V]          # p(t1) p(t2 | t1)
ROUNDS = 3000
CHI2: dict[str, float] = {}


@pytest.mark.parametrize("method,scheme", [("multi_round", "iid"), ("spectr", "iid"), ("rsd", "without_replacement"),
                                           ("multi_round", "deterministic"), ("point_mass", "iid")])
def test_verify_tree_samples_the_target(method, scheme):
    _, pv = chi2(joint_counts(method, scheme, ROUNDS, seed=7), EXACT_JOINT)
    CHI2[f"{method}/{scheme}"] = pv
    assert pv > 1e-3, pv


def test_verify_tree_negative_control_fails():
    """The B.1 pitfall (a merged duplicate tested once, without its copies' residual updates) fails the same
    check."""
    _, pv = chi2(joint_counts("multi_round", "iid", ROUNDS, seed=7, duplicate_updates=False), EXACT_JOINT)
    CHI2["control_skip_duplicates"] = pv
    assert pv < 1e-3, pv


# ------------------------------------------------------------------------------------------------ (d) alpha*
def brute_alpha_star(p, q, k, scheme):
    v, best = p.shape[0], 1.0
    for bits in range(1 << v):
        a = [i for i in range(v) if bits >> i & 1]
        pa, qa = float(p[a].sum()) if a else 0.0, float(q[a].sum()) if a else 0.0
        if scheme == "iid":
            qall = qa ** k
        else:                               # k = 2 without replacement
            qall = sum(float(q[x]) * (qa - float(q[x])) / (1 - float(q[x])) for x in a)
        best = min(best, pa + 1 - qall)
    return best


def test_alpha_star_prefix_equals_brute_force_and_bounds_acceptance():
    gen = torch.Generator().manual_seed(17)
    gaps = {}
    for case in range(24):
        v = 4 + case % 3
        p, q = random_pq(gen, v)
        tv = 0.5 * float((p - q).abs().sum())
        for k in (1, 2, 3):
            a_iid = alpha_star(p, q, k, "iid")
            assert abs(a_iid - brute_alpha_star(p, q, k, "iid")) < 1e-12
            for method in ("multi_round", "spectr"):
                _, acc = enumerated(method, p, q, k)
                assert acc <= a_iid + 1e-12, (method, k, acc, a_iid)
                if k == 1:
                    assert abs(acc - (1 - tv)) < 1e-12 and abs(a_iid - (1 - tv)) < 1e-12
                gaps.setdefault((method, k), []).append(a_iid - acc)
        if int((q > 0).sum()) >= 2:
            a_wor = alpha_star(p, q, 2, "without_replacement")
            assert abs(a_wor - brute_alpha_star(p, q, 2, "wor")) < 1e-12
            _, acc = enumerated("rsd", p, q, 2)
            assert acc <= a_wor + 1e-12
            gaps.setdefault(("rsd", 2), []).append(a_wor - acc)
        _, acc = enumerated("rsd", p, q, 1)
        assert abs(acc - (1 - tv)) < 1e-12 and abs(alpha_star(p, q, 1, "without_replacement") - (1 - tv)) < 1e-12
    assert alpha_star(p, q, 3, "without_replacement") is None and alpha_star(p, q, 2, "deterministic") is None
    assert all(min(g) >= -1e-12 for g in gaps.values())


def test_closed_form_alpha_matches_enumeration():
    """alpha[u] of verify_tree: multi_round and K-SEQ closed forms = the enumerated acceptance; point masses sum p."""
    gen = torch.Generator().manual_seed(23)
    for case in range(20):
        v, k = 4 + case % 3, 2 + case % 2
        p, q = random_pq(gen, v)
        for method in ("multi_round", "spectr"):
            tree = DraftTree.rooted(0, "iid")
            tree.dist[0] = q
            for x in torch.multinomial(q, k, replacement=True, generator=gen).tolist():
                tree.add(0, x, float(q[x]))
            res = verify_tree(tree, torch.stack([p] * len(tree)), method, gen)
            assert abs(res.alpha[0] - enumerated(method, p, q, k)[1]) < 1e-12
        tree = DraftTree.rooted(0, "deterministic")
        for x in range(k):
            tree.add(0, x)
        res = verify_tree(tree, torch.stack([p] * len(tree)), "rsd", gen)
        assert abs(res.alpha[0] - float(p[:k].sum())) < 1e-12


# ------------------------------------------------------------------------------------------------ (e) K-SEQ residual
def test_kseq_residual_is_a_distribution():
    gen = torch.Generator().manual_seed(31)
    worst = 0.0
    for case in range(400):
        v = int(torch.randint(2, 40, (), generator=gen))
        k = int(torch.randint(1, 9, (), generator=gen))
        p, q = random_pq(gen, v)
        if case % 4 == 0:
            q = 0.5 * (p + q)                                  # close pairs: beta near 1
        rho, beta, p_res = kseq_params(p, q, k)
        worst = min(worst, float(p_res.min()))
        assert 1.0 <= rho <= k + 1e-12
        if beta > 0:                                           # what reaches the emitted law: s^k (sum - 1)
            assert (1 - beta) ** k * abs(float(p_res.sum()) - 1) < 1e-13
        if rho > 1 + 1e-9:                                     # smallest: a bit less is not valid
            r2 = rho - 1e-6
            b2 = float(torch.minimum(q, p / r2).sum())
            assert b2 <= 0 or r2 < (1 - (1 - b2) ** k) / b2 + 1e-12   # the same rule, margin included
    assert worst >= -1e-12, worst


# ------------------------------------------------------------------------------------------------ (f) greedy
def random_tree(gen: torch.Generator, v: int, n: int, scheme: str = "deterministic") -> DraftTree:
    tree = DraftTree.rooted(int(torch.randint(v, (), generator=gen)), scheme)
    while len(tree) < n:
        u = int(torch.randint(len(tree), (), generator=gen))
        tree.add(u, int(torch.randint(v, (), generator=gen)))
    return tree


def test_greedy_walk_is_the_longest_matching_path_plus_bonus():
    gen = torch.Generator().manual_seed(41)
    for case in range(300):
        v = 3 + case % 4
        tree = random_tree(gen, v, 2 + case % 12)
        logits = torch.randn(len(tree), v, generator=gen)
        if case % 2:                                          # make matches likely: argmax = some child's token
            for u in range(len(tree)):
                if tree.children[u] and float(torch.rand((), generator=gen)) < 0.7:
                    c = tree.children[u][int(torch.randint(len(tree.children[u]), (), generator=gen))]
                    logits[u, tree.tokens[c]] = 10.0
        rows = logits.softmax(-1) if case % 3 else torch.zeros_like(logits).scatter(-1, logits.argmax(-1, True), 1.0)
        am = rows.argmax(-1).tolist()
        ok = [u == 0 or am[tree.parent[u]] == tree.tokens[u] for u in range(len(tree))]
        best = max((u for u in range(len(tree)) if all(ok[w] for w in tree.path_to(u))), key=lambda u: tree.depth[u])
        state = gen.get_state()
        res = verify_tree(tree, rows, "greedy", gen)
        assert torch.equal(gen.get_state(), state)            # no randomness
        assert res.path == tree.path_to(best)
        assert res.emitted == [tree.tokens[w] for w in res.path[1:]] + [am[best]]
        assert res.final_origin == ("bonus" if not tree.children[best] else "resampled")
        assert all(res.verdicts[w] == "accepted" for w in res.path[1:])
        eos = {tree.tokens[res.path[1]]} if len(res.path) > 1 else set()
        if eos:                                               # an accepted EOS ends the walk there
            r2 = verify_tree(tree, rows, "greedy", gen, eos_ids=frozenset(eos))
            assert r2.emitted == [tree.tokens[res.path[1]]] and r2.final_origin == "none" and r2.path == res.path[:2]


# ------------------------------------------------------------------------------------------------ (g) chain
@pytest.mark.parametrize("deterministic", [False, True])
def test_chain_matches_speculative_step(deterministic):
    """A chain tree with multi_round (or point masses) draws exactly what repeated speculative_step calls draw:
    same tokens, same generator state afterwards, round after round."""
    v, gamma = 50, 4
    gd = torch.Generator().manual_seed(0)
    g_tree, g_chain = torch.Generator().manual_seed(99), torch.Generator().manual_seed(99)
    accepted_total = 0
    for rnd in range(300):
        temp = 0.7 + 0.2 * (rnd % 3)
        p_rows = (torch.randn(gamma + 1, v, generator=gd) * 2 / temp).softmax(-1)           # float32
        q_rows = (0.6 * p_rows.log() + 0.8 * torch.randn(gamma + 1, v, generator=gd)).softmax(-1)
        tree = DraftTree.rooted(1, "deterministic" if deterministic else "iid")
        u, drafts, qs = 0, [], []
        for i in range(gamma):
            q = torch.zeros(v).scatter(0, q_rows[i].argmax().view(1), 1.0) if deterministic else q_rows[i]
            x = int(q_rows[i].argmax()) if deterministic else draw_from(q, gd)
            if not deterministic:
                tree.dist[u] = q
            u = tree.add(u, x, float(q[x]))
            drafts.append(x)
            qs.append(q)
        chain = []
        for i, x in enumerate(drafts):
            ok, tok, _ = speculative_step(p_rows[i], qs[i], x, g_chain)
            chain.append(tok)
            if not ok:
                break
        else:
            chain.append(draw_from(p_rows[gamma], g_chain))
        res = verify_tree(tree, p_rows, "multi_round", g_tree)
        assert res.emitted == chain, rnd
        assert torch.equal(g_tree.get_state(), g_chain.get_state()), rnd
        accepted_total += len(res.path) - 1
    assert 0 < accepted_total < 300 * gamma                    # both branches exercised


# ------------------------------------------------------------------------------------------------ misc
def test_trace_fields_and_errors():
    gen = torch.Generator().manual_seed(1)
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64)
    q = torch.tensor([0.7, 0.1, 0.1, 0.1], dtype=F64)
    tree = DraftTree.rooted(0, "iid")
    tree.dist[0] = q
    for x in (0, 0, 0):                                       # one node, multiplicity 3
        tree.add(0, x, 0.7)
    tree.add(1, 2, 0.5)
    tree.dist[1] = q
    res = verify_tree(tree, torch.stack([p, p, p]), "multi_round", gen)
    assert res.checks[0].node == 1 and res.checks[0].multiplicity == 3
    assert [c.copy for c in res.checks if c.node == 1] == list(range(len([c for c in res.checks if c.node == 1])))
    assert set(res.verdicts) == {1, 2}
    if res.path == [0]:
        assert len(res.checks) == 3 and res.checks[1].accept_prob == 0.0 and res.final_origin == "resampled"
    with pytest.raises(ValueError):
        verify_tree(tree, torch.stack([p, p, p]), "rsd", gen)       # rsd needs draws without replacement
    with pytest.raises(ValueError):
        verify_tree(tree, torch.stack([p, p]), "multi_round", gen)  # one row per node
    del tree.dist[0]
    with pytest.raises(ValueError):
        verify_tree(tree, torch.stack([p, p, p]), "spectr", gen)    # no draft distribution
    assert set(verify_tree(tree, torch.stack([p, p, p]), "point_mass", gen).verdicts) == {1, 2}
