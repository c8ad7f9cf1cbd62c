"""The sampling loop of the grammar strategies gcd and asap (docs/strategies.md#gcd, #asap), and its trace rows.

Why grammar sampling owns its loop instead of the engine's per-token loop (declab/core/loop.py, one token per
forward for one sequence): a run draws many samples one after another from one trie; a node whose distribution
is cached is revisited without a forward (the matcher still accepts the token); the KV cache is cropped back to
the prompt between samples, and the tokens walked since the last forward are fed in one call when an unexpanded
node is reached. After sampling the run scores the target (exact mode or the explored support) and writes the
kl / target / node rows and the run metrics.

The loop (`run_grammar`), per sample i = 0 .. num_samples-1, all samples one after another from one trie:
  u = root; reset the matcher
  loop (at most max_new_tokens steps, EOS included):
    if u has no cached distribution: one forward for the tokens fed since the last forward (KV cache cropped
        back to the prompt between samples), fill the mask, store the allowed ids and their
        P(t|u) = softmax(logits / temperature)[t]   (full-vocabulary softmax, unmasked: docs/strategies.md#asap)
        and EFG~(u) <- sum_allowed P(t|u) * EFG~(u.t), propagated to every ancestor (strategies/grammar/trie.py)
    q = rule.weights(u)            gcd: P restricted to the allowed set (then top-k / top-p), renormalised
                                   asap: P(t|u) * EFG~(u.t), renormalised
    t ~ q (inverse CDF with one uniform from the run's seeded generator, the same for both strategies, so equal
        distributions give equal draws); stop at EOS; else accept t in the matcher and go to u.t
  a sample that reaches max_new_tokens without EOS, or a node with no allowed token, marks its last node dead
  (EFG~ = 0): within this token budget nothing grammatical lies below it.

Trace rows (besides the base columns): `token` rows per step of every sample, branch_id = parent_id = sample index,
step = position in the sample: `sample`, `allowed` (allowed-token count), `masked_mass` (1 - sum_allowed P(t|u)),
`p_gcd` (the chosen token's probability under GCD), `p_asap` (under ASAp; asap only), `efg_before`/`efg_after`
(EFG~(u) before and after this step's expansion; asap only), `efg_child` (EFG~ of the chosen child before the
draw; asap only), `cached` (the distribution came from the trie, no forward), `fwd_ms`, `mask_ms` (fill the
bitmask and list the allowed ids), `sel_ms`. `logprob`/`entropy` are the untempered model's, `score` is
ln q(token), what was actually sampled from. Up to `num_alternatives` `candidate` rows per step: the allowed
tokens with the largest q. One `finish` row per sample: `score` = ln P(w) (EOS included), `final_rank` = sample
index (samples stay in the order drawn), `complete`, `length`, `efg_root`, `trie_nodes`. After sampling: `kl` rows
(`samples` = n, `kl` = KL(empirical of the first n complete samples || target) in nats, `kl_window` = the same
over the last ceil(n/4) samples, `kl_fixed` = over the reference plot's fixed window of N//4 samples ending at n,
`exact`, `support`, `incomplete`; strategies/grammar/
kl_curves.py), `target` rows (one per sequence of the target: `seq` ids, `q`, `q_gcd` (exact mode), `p_w` = P(w),
`count`), and `node` rows (the trie: `node_id`, `node_parent`, `depth`, `p`, `efg` (asap), `visits`, `dead`);
these three kinds have no step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from declab.core import Progress, RunContext, RunGen, Sequence
from declab.core.errors import UserError
from declab.core.metrics import GrammarMetrics
from declab.core.sampling import entropy_bits
from strategies.grammar.builtin import prepare_grammar
from strategies.grammar.exact import exact_distribution
from strategies.grammar.kl_curves import explored_target, kl, kl_curve
from strategies.grammar.mask import GrammarMask, compiled_grammar
from strategies.grammar.probs import allowed_probs
from strategies.grammar.trie import Node, Trie

MAX_SAMPLES = 5000
MAX_NODE_ROWS = 2000                # `node` rows written (breadth-first)
MAX_TARGET_ROWS = 2000              # `target` rows written (largest q first)


# ================================================================================================ sampling rules
class Rule:
    """How a grammar strategy picks the next token at a node. gcd: plain masking; asap: weighted by EFG~."""

    name = "rule"
    is_gcd = False          # p_gcd is the probability actually sampled from (gcd with its top-k / top-p)
    caches = False          # keep node distributions in the trie (revisits need no forward)
    reports_efg = False

    def weights(self, node: Node) -> torch.Tensor | None:
        """The sampling distribution over node.ids ([A] float64, sums to 1), or None if it has no mass."""
        raise NotImplementedError


def draw_index(q: torch.Tensor, generator: torch.Generator) -> int:
    """One index drawn from the distribution q ([A], sums to 1) by inverse CDF with one uniform from the run's
    generator (gcd and asap draw the same way, so equal distributions give equal draws). Zero entries are never
    drawn."""
    u = float(torch.rand((), dtype=torch.float64, generator=generator))
    if len(q) <= 64:                                   # small sets: plain Python is faster than torch ops
        values = q.tolist()
        x, acc = u * sum(values), 0.0
        for i, v in enumerate(values):
            acc += v
            if x < acc:
                return i
        return max(i for i, v in enumerate(values) if v > 0)
    c = torch.cumsum(q, 0)
    i = int(torch.searchsorted(c, u * c[-1], right=True))
    return i if i < len(q) else int(torch.nonzero(q).max())


# ================================================================================================ the loop
@dataclass
class SampleResult:
    tokens: list[int]
    loglik: float                 # ln P(w), EOS included (the temperature-scaled model)
    complete: bool
    efg_root: float
    key: tuple | None = None      # tuple(tokens) when complete


@dataclass
class GrammarRun:
    """One run's grammar, trie and samples (local to `run_grammar`)."""

    label: str
    text: str
    trie: Trie
    samples: list[SampleResult] = field(default_factory=list)
    exact: object = None          # ExactResult or None
    mask_ms: list[float] = field(default_factory=list)


def run_grammar(ctx: RunContext, cfg, rule: Rule) -> RunGen:
    """The shared sampling loop of gcd and asap (see the module docstring). Returns every sample in order."""
    lm, trace = ctx.lm, ctx.trace
    inputs = ctx.inputs if ctx.inputs.grammar_name else prepare_grammar(cfg, ctx.inputs)   # prepared by the plan
    label, text = inputs.grammar_name, inputs.grammar
    mask = GrammarMask(lm, compiled_grammar(lm, text))
    trie = Trie()
    result = GrammarRun(label=label, text=text, trie=trie)
    eos_ids = lm.eos_ids
    temperature = float(getattr(cfg, "temperature", 1.0))
    n_prompt = len(ctx.prompt_ids)
    if not len(mask.allowed()):
        raise UserError(f"grammar '{label}' allows no token of model '{lm.key}' at the start: this vocabulary cannot "
                        f"begin any sentence of it")
    out = lm.prefill(ctx.prompt_ids)
    root_logits, cache, prefill_ms = out.logits[0], out.cache, out.fwd_ms
    global_step = 0
    stopped = False
    for i in range(cfg.num_samples):
        if ctx.stop.is_set():
            break
        if trie.root.dead or (trie.root.mass is not None and trie.root.efg <= 0.0):
            break                                   # nothing grammatical is left to sample within the budget
        if i:
            lm.crop(cache, n_prompt)
        mask.reset()
        node, pending, tokens = trie.root, [], []
        loglik, complete, last_step = 0.0, False, 0
        for step in range(ctx.max_new_tokens):
            t0 = lm.clock_ms()
            fwd_ms = mask_ms = 0.0
            cached = node.ids is not None
            efg_before = node.efg
            if not cached:
                if step == 0:
                    logits = root_logits
                    fwd_ms = prefill_ms if i == 0 else 0.0
                else:
                    out = lm.step([pending], cache)
                    logits, fwd_ms, pending = out.logits[0], out.fwd_ms, []
                tm = lm.clock_ms()
                ids = mask.allowed()
                mask_ms = lm.clock_ms() - tm
                result.mask_ms.append(mask_ms)
                raw = torch.log_softmax(logits, -1)                              # [V] untempered
                probs = allowed_probs(logits, ids, temperature)                  # [A] float64
                trie.expand(node, ids, probs, None if temperature == 1.0 else raw[ids], float(entropy_bits(raw)),
                            keep=rule.caches)
                ts = lm.clock_ms()
            else:
                trie.touch(node)
                ts = t0
            ids, probs = node.ids, node.probs
            if len(ids) == 0:                                                    # dead end: no token continues
                trie.kill(node)
                break
            q = rule.weights(node)
            if q is None:                                                        # every child known dead
                trie.kill(node)
                break
            idx = draw_index(q, ctx.generator)
            token = int(ids[idx])
            p_tok = float(probs[idx])
            q_tok = float(q[idx])
            p_gcd = q_tok if rule.is_gcd else p_tok / node.mass
            child = trie.child(node, idx, token, p_tok)
            efg_child = child.efg
            child.visits += 1
            is_eos = token in eos_ids
            if not is_eos:
                mask.accept(token)
            sel_ms = lm.clock_ms() - ts
            raw_lp = math.log(p_tok) if node.raw_logp is None else float(node.raw_logp[idx])
            cols = {"sample": i, "allowed": len(ids), "masked_mass": max(0.0, 1.0 - node.mass), "p_gcd": p_gcd,
                    "cached": cached, "fwd_ms": fwd_ms, "mask_ms": mask_ms, "sel_ms": sel_ms}
            if rule.reports_efg:
                cols.update(p_asap=q_tok, efg_before=efg_before, efg_after=node.efg, efg_child=efg_child)
            trace.add("token", step, branch_id=i, parent_id=i, position=n_prompt + step, token_id=token,
                      token_text=lm.token_text(token), logprob=raw_lp, entropy=node.entropy,
                      score=math.log(q_tok), accepted=True, dt_ms=fwd_ms + mask_ms + sel_ms, **cols)
            _candidates(ctx, trie, rule, node, q, token, i, step, n_prompt)
            if not rule.caches:
                trie.drop(node)
            loglik += math.log(p_tok)
            last_step = step
            global_step += 1
            if is_eos:
                complete = True
                break
            tokens.append(token)
            pending.append(token)
            node = child
            yield Progress(global_step, list(tokens))
            if ctx.stop.is_set():
                stopped = True
                break
        else:
            trie.kill(node)                          # the budget ran out below this node
        if stopped:
            break
        sample = SampleResult(tokens=tokens, loglik=loglik, complete=complete, efg_root=trie.root.efg,
                              key=tuple(tokens) if complete else None)
        result.samples.append(sample)
        trace.add("finish", last_step, branch_id=i, parent_id=i, score=loglik, final_rank=i, sample=i,
                  complete=complete, length=len(tokens), efg_root=trie.root.efg, trie_nodes=trie.size)
        yield Progress(global_step, list(tokens))
    lm.crop(cache, n_prompt)
    _after_sampling(ctx, cfg, rule, result, root_logits, cache, temperature)
    return [Sequence(token_ids=s.tokens, score=s.loglik, extra={"sample": k, "complete": s.complete})
            for k, s in enumerate(result.samples)]


def _candidates(ctx, trie, rule, node, q, token, sample, step, n_prompt) -> None:
    """The allowed tokens with the largest sampling probability, as `candidate` rows."""
    k = min(ctx.num_alternatives, len(q))
    if k <= 0:
        return
    if len(q) <= 64:                                  # small sets: Python lists beat tensor indexing
        values = q.tolist()
        positions = sorted(range(len(values)), key=lambda j: -values[j])[:k]
        top_q = [values[j] for j in positions]

        def pick(t):
            full = t.tolist()
            return [full[j] for j in positions]
    else:
        top = torch.topk(q, k)
        top_q, positions = top.values.tolist(), top.indices.tolist()

        def pick(t):
            return t[positions].tolist()
    ids, probs = pick(node.ids), pick(node.probs)
    raw = None if node.raw_logp is None else pick(node.raw_logp)
    efgs = pick(node.child_efg) if rule.reports_efg else None
    lm, mass = ctx.lm, node.mass
    for rank, (qv, tid, p) in enumerate(zip(top_q, ids, probs)):
        raw_lp = math.log(p) if raw is None else raw[rank]
        cols = {"p_gcd": qv if rule.is_gcd else p / mass, "rank": rank}
        if rule.reports_efg:
            cols.update(p_asap=qv, efg=efgs[rank])
        ctx.trace.add("candidate", step, branch_id=sample, parent_id=sample, position=n_prompt + step,
                      token_id=tid, token_text=lm.token_text(tid), logprob=raw_lp, entropy=node.entropy,
                      score=math.log(qv) if qv > 0 else float("-inf"), accepted=(tid == token), **cols)


# ================================================================================================ after sampling
def _after_sampling(ctx, cfg, rule: Rule, result: GrammarRun, root_logits, prompt_cache, temperature: float) -> None:
    """Exact or explored-support target, kl / target / node rows, run metrics."""
    lm, trace, samples = ctx.lm, ctx.trace, result.samples
    exact = None
    if cfg.exact_max_nodes > 0 and samples and not ctx.stop.is_set():
        exact = exact_distribution(lm, compiled_grammar(lm, result.text), ctx.prompt_ids, ctx.max_new_tokens,
                                   temperature, cfg.exact_max_nodes, root_logits,
                                   getattr(cfg, "top_k", 0), getattr(cfg, "top_p", 1.0), prompt_cache)
    result.exact = exact
    if exact is not None:
        target, p_w, q_gcd = exact.q, exact.p, exact.q_gcd
    else:
        (target, p_w), q_gcd = explored_target(samples), {}
    keys = [s.key for s in samples]
    curve = kl_curve(keys, target) if samples and target else []
    for row in curve:
        trace.add("kl", None, exact=exact is not None, support=len(target), **row)
    counts: dict = {}
    for k in keys:
        if k is not None:
            counts[k] = counts.get(k, 0) + 1
    for w in sorted(target, key=lambda w: -target[w])[:MAX_TARGET_ROWS]:
        trace.add("target", None, token_text=lm.decode(w), seq=" ".join(map(str, w)), q=target[w],
                  q_gcd=q_gcd.get(w) if exact is not None else None, p_w=p_w.get(w), count=counts.get(w, 0),
                  exact=exact is not None)
    for k, node in enumerate(result.trie.nodes()):
        if k >= MAX_NODE_ROWS:
            break
        if node.parent is None:
            continue
        trace.add("node", None, token_id=node.token, token_text=lm.token_text(node.token), node_id=node.node_id,
                  node_parent=node.parent.node_id, depth=node.depth, p=node.p,
                  efg=node.efg if rule.reports_efg else None, visits=node.visits, dead=node.dead)
    done = len(samples)
    metrics = GrammarMetrics(grammar=result.label, samples=done,
                             complete_rate=round(sum(s.complete for s in samples) / done, 6) if done else 0.0,
                             trie_nodes=result.trie.size, kl_exact=exact is not None)
    if curve:
        metrics.kl, metrics.kl_window = _finite(curve[-1]["kl"]), _finite(curve[-1]["kl_window"])
    if rule.reports_efg:
        metrics.efg_root = result.trie.root.efg
    if exact is not None:
        metrics.z, metrics.kl_gcd_limit = exact.z, _finite(kl(_normalised(exact.q_gcd), exact.q))
    if result.mask_ms:
        ms = sorted(result.mask_ms)
        metrics.median_mask_ms = ms[len(ms) // 2]
    ctx.metrics = metrics


def _normalised(d: dict) -> dict:
    z = sum(d.values())
    return {k: v / z for k, v in d.items()} if z > 0 else {}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
