"""Exact mode of the grammar strategies: the whole grammatical language within the token budget, scored.

Exact mode (`exact_max_nodes` > 0): after sampling, if every grammatical token sequence that fits in
max_new_tokens (EOS included) lies in a trie of at most `exact_max_nodes` prefixes (checked with the matcher alone,
no model: `language_prefixes`), the model scores every prefix (one batched forward per depth on a copy of the
prompt's KV cache) and the run records the exact grammar-conditioned distribution Q(w) = P(w) 1[w in L] / Z, GCD's
exact sampling distribution, and the exact EFG of every prefix (`exact_distribution`). Outcomes are token
sequences: two tokenisations of one string are two outcomes, as in Q's definition over P.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from strategies.grammar.mask import GrammarMask
from strategies.grammar.probs import allowed_probs, gcd_probs

EXACT_BATCH = 32                    # prefixes per forward in exact mode


@dataclass
class ExactResult:
    """The whole grammatical language within the budget, scored by the model."""

    q: dict            # tuple(ids) -> Q(w) = P(w) / Z
    p: dict            # tuple(ids) -> P(w) (EOS included)
    q_gcd: dict        # tuple(ids) -> GCD's probability of producing w (its remaining mass ends in dead ends)
    efg: dict          # prefix -> exact EFG(prefix)
    z: float           # sum of P(w) = EFG(root)
    nodes: int         # internal prefixes scored


def language_prefixes(lm, compiled, max_new_tokens: int, max_nodes: int) -> dict | None:
    """Every prefix that can still end grammatically within max_new_tokens (EOS counted) -> its allowed ids, by
    walking the grammar with the matcher only (no model); None when there are more than max_nodes."""
    mask = GrammarMask(lm, compiled)
    eos = lm.eos_ids
    internal: dict[tuple, torch.Tensor] = {}
    level: list[tuple] = [()]
    while level:
        nxt: list[tuple] = []
        for u in level:
            mask.reset()
            mask.accepts_all(u)
            ids = mask.allowed()
            internal[u] = ids
            if len(u) + 2 <= max_new_tokens:          # a child u.t (depth len(u)+1) can still emit EOS
                nxt.extend(u + (int(t),) for t in ids.tolist() if int(t) not in eos)
            if len(internal) + len(nxt) > max_nodes:
                return None
        level = nxt
    return internal


def exact_distribution(lm, compiled, prompt_ids: list[int], max_new_tokens: int, temperature: float = 1.0,
                       max_nodes: int = 256, root_logits: torch.Tensor | None = None, top_k: int = 0,
                       top_p: float = 1.0, prompt_cache=None) -> ExactResult | None:
    """Exact Q, GCD's distribution and EFG by enumeration (one batched forward per depth and chunk, on a copy of
    the prompt's KV cache: `prompt_cache` holding exactly the prompt, else one prefill), or None when the language
    within the budget has more than max_nodes prefixes."""
    internal = language_prefixes(lm, compiled, max_new_tokens, max_nodes)
    if internal is None:
        return None
    eos = lm.eos_ids
    probs: dict[tuple, torch.Tensor] = {}
    by_depth: dict[int, list[tuple]] = {}
    for u in internal:
        by_depth.setdefault(len(u), []).append(u)
    if root_logits is None or (prompt_cache is None and len(by_depth) > 1):
        out = lm.prefill(list(prompt_ids))
        root_logits, prompt_cache = out.logits[0], out.cache
    probs[()] = allowed_probs(root_logits, internal[()], temperature)
    for depth, prefixes in sorted(by_depth.items()):
        if depth == 0:
            continue
        for k in range(0, len(prefixes), EXACT_BATCH):
            chunk = prefixes[k: k + EXACT_BATCH]
            cache = lm.fork(copy.deepcopy(prompt_cache), len(chunk))
            out = lm.step([list(u) for u in chunk], cache)
            for row, u in enumerate(chunk):
                probs[u] = allowed_probs(out.logits[row], internal[u], temperature)
    efg: dict[tuple, float] = {}
    for u in sorted(internal, key=len, reverse=True):             # deepest first
        total = 0.0
        for t, p in zip(internal[u].tolist(), probs[u].tolist()):
            total += p * (1.0 if t in eos else efg.get(u + (t,), 0.0))
        efg[u] = total
    p_w: dict[tuple, float] = {}
    q_gcd: dict[tuple, float] = {}
    path = {(): (1.0, 1.0)}
    for u in sorted(internal, key=len):                           # shallowest first
        pu, gu = path[u]
        ids, pr = internal[u].tolist(), probs[u]
        g = gcd_probs(pr, top_k, top_p).tolist() if len(ids) else []
        for t, p, gq in zip(ids, pr.tolist(), g):
            if t in eos:
                p_w[u] = p_w.get(u, 0.0) + pu * p
                q_gcd[u] = q_gcd.get(u, 0.0) + gu * gq
            elif u + (t,) in internal:
                path[u + (t,)] = (pu * p, gu * gq)
    z = efg[()]
    q = {w: v / z for w, v in p_w.items()} if z > 0 else {}
    return ExactResult(q=q, p=p_w, q_gcd=q_gcd, efg=efg, z=z, nodes=len(internal))
