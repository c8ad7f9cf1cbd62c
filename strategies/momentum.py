"""Momentum decoding: greedy search with a resistance against closing repeated n-gram loops.

Paper: Lan, Su, Liu, Huang, Mao, "Momentum Decoding: Open-ended Text Generation As Graph Exploration"
(arXiv 2212.02175); reference code gmftbyGMFTBY/MomentumDecoding (models/utlis_ngram.py). Spec: docs/strategies.md#momentum.

Generation is a walk on a graph whose nodes are token ids (prompt included) and whose edges are the observed
transitions. Degeneration is the walk going round a loop it has already closed. At each step the top-k tokens by
p are re-scored

    score(v) = p(v) - alpha * R(l(v))                      (raw probability, not log-prob)

where l(v) is the length of the repeated n-gram that v would close: 0 when v was never seen; else the largest
n in 2..max_ngram such that (last n-1 tokens, v) already occurs in prompt + generation; 1 when v was seen but no
such n-gram repeats. The first max of the score (in descending-p order) is emitted. alpha = 0 is greedy.

Paper / reference symbol -> config field:
    alpha (scale_alpha, 0.2 in inference.py) -> alpha
    k (--topk, beam_width)                   -> top_k
    Lmax (max_length = 5)                    -> max_ngram
    R(l) (ngram_lookup_table_*)              -> resistance (table name, see RESISTANCE_TABLES)

Resistance tables (the reference changed R(l) across commits; docs/strategies.md#momentum), R(0..):
    cac238b         0, 1, 3, 4, 5, 5   arXiv v1 date, "for GPT2-XL"; the default (why: docs/strategies.md#momentum)
    2b58b6f         0, 1, 3, 4, 5, 6   first commit
    ngram_blocking  0, 0, 0, 0, 5      HEAD 744ff18 (R(5) = inf: blocks 5-gram repeats outright)
    linear          0, 1, 2, 3, 4, 5   the GPT2-XL alternative listed in a comment at HEAD
    constant        0, then 2          any seen token pays 2
    log / exp       0, then log_6(1+l)/0.2 ; 0, then 1.5^l / 2
As in the reference, an l beyond a table's last entry gets R = inf (only reachable with max_ngram > table length,
or with ngram_blocking and l = 5). With alpha = 0 the penalty is 0 even for R = inf (0 * inf is taken as 0), so
alpha = 0 is exactly greedy.

Implementation: the reference rescans every earlier occurrence of every candidate per step. Here an index maps
each (n-1)-gram context (n = 2..max_ngram) to the set of tokens that followed it, updated incrementally with
max_ngram - 1 set insertions per emitted token, so finding l for the k candidates costs max_ngram - 1 dict look-ups
plus O(k) per step, independent of the sequence length. Ties: candidates are ordered by (logit desc, id asc), so the
top-1 is greedy's argmax (lowest id on ties) and "first max" matches torch.argmax.

Trace: the `candidate` rows are the re-ranked candidates (not the model's generic top-5) with `p`, `repeat_len`
(l), `resistance` (R(l)), `score` and `rank` (by p); when top_k > 50 only the 50 most likely plus the chosen one are
written. The `token` row carries `rank` (chosen rank by p), `p`, `p_top1`, `repeat_len`, `resistance`,
`overridden` (top-1 not chosen), `label` (the reference's is_greedy: 0 top-1 is a new node, 1 top-1 already in the
graph and still chosen, 2 a lower-ranked token chosen) and `revisit` (the chosen token is an existing node).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from declab.core.errors import UserError
from declab.core import Config, RunContext, RunGen, Strategy, param, register
from declab.core.loop import Choice, Selector, token_loop

INF = math.inf
RESISTANCE_TABLES: dict[str, tuple[float, ...] | None] = {
    "cac238b": (0.0, 1.0, 3.0, 4.0, 5.0, 5.0),
    "2b58b6f": (0.0, 1.0, 3.0, 4.0, 5.0, 6.0),
    "ngram_blocking": (0.0, 0.0, 0.0, 0.0, 5.0),
    "linear": (0.0, 1.0, 2.0, 3.0, 4.0, 5.0),
    "constant": None,
    "log": None,
    "exp": None,
}
MAX_TRACED_CANDIDATES = 50


def resistance_value(name: str, length: int) -> float:
    """R(l) of the named table (inf past a table's end, as in the reference)."""
    if name not in RESISTANCE_TABLES:
        raise UserError(f"momentum: resistance must be one of {', '.join(RESISTANCE_TABLES)}, got {name!r}")
    if length == 0:
        return 0.0
    if name == "constant":
        return 2.0
    if name == "log":
        return math.log(1 + length, 6) / 0.2
    if name == "exp":
        return 1.5 ** length / 2
    table = RESISTANCE_TABLES[name]
    return table[length] if length < len(table) else INF


class NgramIndex:
    """The token graph of prompt + generation, indexed for the repeat length l of a candidate.

    `follow[ctx]` is the set of tokens that followed the context tuple `ctx` (lengths 1..max_ngram-1), so
    "(last n-1 tokens, v) already occurred" is `v in follow[tuple(ids[-(n-1):])]`. `count[v]` is how often node v
    occurs; `edges` are the observed transitions (kept for the graph view, not used in scoring, as in the paper)."""

    def __init__(self, max_ngram: int, ids=()):
        self.max_ngram = max_ngram
        self.ids: list[int] = []
        self.count: dict[int, int] = {}
        self.follow: dict[tuple, set] = {}
        self.edges: set[tuple[int, int]] = set()
        for t in ids:
            self.add(int(t))

    def add(self, token: int) -> None:
        ids = self.ids
        ids.append(token)
        self.count[token] = self.count.get(token, 0) + 1
        n = len(ids)
        if n > 1:
            self.edges.add((ids[-2], token))
        for m in range(1, min(self.max_ngram - 1, n - 1) + 1):         # context length m = n-gram length - 1
            key = tuple(ids[n - 1 - m: n - 1])
            bucket = self.follow.get(key)
            if bucket is None:
                self.follow[key] = {token}
            else:
                bucket.add(token)

    def repeat_lengths(self, candidates: list[int]) -> list[int]:
        """l(v) for each candidate v: 0 unseen; else the largest n in 2..max_ngram whose n-gram (last n-1 ids, v)
        already occurred; 1 when none does."""
        ids, n = self.ids, len(self.ids)
        longest: dict[int, int] = {}
        for m in range(1, min(self.max_ngram - 1, n) + 1):              # ascending: longer repeats overwrite
            for v in self.follow.get(tuple(ids[n - m:]), ()):
                longest[v] = m + 1
        count = self.count
        return [longest.get(v, 1) if v in count else 0 for v in candidates]


@dataclass(frozen=True)
class MomentumConfig(Config):
    alpha: float = param(0.2, lo=0.0, hi=10.0,
                         help="α: weight of the resistance, score = p(v) - α·R(l(v)) on the probability scale "
                              "(0 = greedy; reference 0.2).")
    top_k: int = param(5, lo=1, hi=5000,
                       help="k: the most likely k tokens are re-scored each step (reference 5; clamped to the "
                            "vocabulary size).")
    max_ngram: int = param(5, lo=2, hi=8, help="Lmax: longest repeated n-gram looked for, l in 0..Lmax "
                                               "(reference 5).")
    resistance: str = param("cac238b", choices=tuple(RESISTANCE_TABLES),
                            help="R(l) table: cac238b 0,1,3,4,5,5 (paper-era default); 2b58b6f 0,1,3,4,5,6; "
                                 "ngram_blocking 0,0,0,0,5,inf; linear 0..5; constant 0,2,2..; log; exp. "
                                 "l past a table's end gets inf.")


@register
class Momentum(Strategy):
    name = "momentum"
    title = "Momentum decoding"
    paper = ("Lan et al. 2022, Momentum Decoding: Open-ended Text Generation As Graph Exploration "
             "(arXiv 2212.02175)")
    explanation = ("Think of the text as a walk over a graph whose nodes are tokens. Greedy decoding degenerates "
                   "when the walk keeps going round a loop it has already closed. Momentum decoding keeps greedy's "
                   "speed but adds resistance: each of the top-k candidates loses α·R(l), where l is the length "
                   "of the repeated n-gram it would close. A fresh token pays nothing; a token that would repeat a "
                   "long phrase pays a lot, so a slightly less likely fresh token wins.")
    Config = MomentumConfig

    def run(self, ctx: RunContext, cfg: MomentumConfig) -> RunGen:
        return (yield from token_loop(ctx, Resistance(cfg, ctx.lm.vocab_size, ctx.prompt_ids, ctx.lm.device)))


class Resistance(Selector):
    """The re-scoring selector: `apply` ranks the top-k by p - alpha R(l); `accept` adds the emitted token to the
    graph (the walk moves on)."""

    name = "momentum"

    def __init__(self, cfg: MomentumConfig, vocab_size: int, prompt_ids, device):
        self.cfg, self.prompt_ids = cfg, list(prompt_ids)
        self.k = min(cfg.top_k, vocab_size)
        table_len = cfg.max_ngram + 1
        self.r_table = torch.tensor([resistance_value(cfg.resistance, n) for n in range(table_len)],
                                    dtype=torch.float32, device=device)             # [Lmax+1]
        self.penalty_table = self.r_table * cfg.alpha if cfg.alpha > 0 else torch.zeros_like(self.r_table)  # α·R
        self.reset()

    def reset(self) -> None:
        self.graph = NgramIndex(self.cfg.max_ngram, self.prompt_ids)

    def accept(self, token: int) -> None:
        self.graph.add(token)

    def apply(self, logits: torch.Tensor, step: int) -> Choice:
        graph, k, r_table = self.graph, self.k, self.r_table
        vals, idx = torch.topk(logits, k)                                    # [k] by logit, descending
        idx, perm = idx.sort()                                               # ties -> lowest id first
        vals, perm2 = vals[perm].sort(descending=True, stable=True)
        idx = idx[perm2]                                                     # [k] (logit desc, id asc)
        logp = vals - torch.logsumexp(logits, -1)                            # [k] ln p
        p = logp.exp()                                                       # [k]
        cand = idx.tolist()                                                  # host sync 1
        lengths = graph.repeat_lengths(cand)
        l_t = torch.tensor(lengths, dtype=torch.long, device=logits.device)  # [k]
        score = p - self.penalty_table[l_t]                                  # [k]
        rank = int(score.argmax())                                           # host sync 2: first max
        token = cand[rank]
        top1_known = cand[0] in graph.count
        label = 0 if not top1_known else (1 if rank == 0 else 2)
        revisit = token in graph.count
        n_rows = min(k, MAX_TRACED_CANDIDATES)
        p_l, logp_l, s_l, r_l = (t[:n_rows].tolist() for t in (p, logp, score, r_table[l_t]))  # host sync 3
        rows = [{"token_id": cand[i], "logprob": logp_l[i], "score": s_l[i], "rank": i, "p": p_l[i],
                 "repeat_len": lengths[i], "resistance": r_l[i]} for i in range(n_rows)]
        if rank >= n_rows:
            rows.append({"token_id": token, "logprob": float(logp[rank]), "score": float(score[rank]),
                         "rank": rank, "p": float(p[rank]), "repeat_len": lengths[rank],
                         "resistance": float(r_table[lengths[rank]])})
        chosen = rows[rank] if rank < n_rows else rows[-1]
        extra = {"rank": rank, "p": chosen["p"], "p_top1": p_l[0], "repeat_len": lengths[rank],
                 "resistance": chosen["resistance"], "overridden": rank != 0, "label": label,
                 "revisit": revisit}
        return Choice(token, chosen["score"], extra, rows)
