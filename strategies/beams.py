"""Shared beam bookkeeping: the n-best list of finished hypotheses and the stopping rule of transformers 4.x.

`BeamHypotheses` reproduces `transformers.generation.beam_search.BeamHypotheses` of 4.36-4.56 (the version that
excludes the prompt from the length): scores are plain Python floats (float32 sums converted with `.item()`),
normalised as `sum_logprobs / generated_len ** length_penalty`, kept in insertion order with the worst evicted, and
`is_done` applies the `early_stopping` rule (True / False / "never"). `pool_ranking` is the final pooled ranking of
BeamSearchScorer.finalize (stable ascending sort, then pop from the end), so ties resolve exactly as there.
Any strategy that keeps an n-best list of finished beams (beam, diverse_beam, ...) can reuse these.

`group_beam_search` is the engine of `beam` and `diverse_beam` (HF 4.36-4.56 group beam search; its exactness
details and trace columns are documented in strategies/diverse_beam.py), with the config helpers they share.

Loop: beam search owns its loop instead of the engine's per-token loop (declab/core/loop.py): every step scores
B rows at once, chooses B of the B x V extensions across rows and reorders the KV cache to the chosen parents; the
shared loop follows one row and one token per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from declab.core.errors import UserError
from declab.core.sampling import entropy_bits
from declab.core import Progress, RunContext, RunGen, Sequence


@dataclass
class Hypothesis:
    """A finished beam: generated ids (prompt and EOS excluded), normalised score and what made it."""

    token_ids: list[int]
    score: float                      # cum_score / gen_len ** length_penalty (what the ranking uses)
    cum_score: float                  # cumulative score, penalties included (float32 value)
    gen_len: int                      # generated length used in the normalisation (EOS counted when eos)
    extra: dict = field(default_factory=dict)   # loglik, penalty, group, eos, trace row ...


class BeamHypotheses:
    """n-best list of one (batch item, group), capacity `num_beams` (the group size S)."""

    def __init__(self, num_beams: int, length_penalty: float, early_stopping: bool | str, max_length: int | None):
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.max_length = max_length          # prompt + new tokens (only used by early_stopping="never")
        self.beams: list[Hypothesis] = []
        self.worst_score = 1e9

    def __len__(self) -> int:
        return len(self.beams)

    def add(self, hyp: Hypothesis) -> bool:
        """Offer a hypothesis (its `score` already normalised); returns whether it entered the list."""
        score = hyp.score
        if len(self) < self.num_beams or score > self.worst_score:
            self.beams.append(hyp)
            if len(self) > self.num_beams:
                ranked = sorted((h.score, i) for i, h in enumerate(self.beams))
                evicted = self.beams[ranked[0][1]]
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
                evicted.extra["evicted"] = True
            else:
                self.worst_score = min(score, self.worst_score)
            return True
        return False

    def is_done(self, best_sum_logprobs: float, cur_len: int, prompt_len: int) -> bool:
        """True when no running beam can beat the worst kept hypothesis (HF's heuristic). cur_len counts the prompt
        plus the tokens after this step."""
        if len(self) < self.num_beams:
            return False
        if self.early_stopping is True:
            return True
        if self.early_stopping is False or self.length_penalty <= 0.0:
            best = best_sum_logprobs / (cur_len - prompt_len) ** self.length_penalty
        else:                                  # "never" with a positive length penalty: the longest possible
            best = best_sum_logprobs / (self.max_length - prompt_len) ** self.length_penalty
        return self.worst_score >= best


def normalised(cum_score: float, gen_len: int, length_penalty: float) -> float:
    """HF's length normalisation, in Python double as in BeamHypotheses.add."""
    return cum_score / (gen_len ** length_penalty)


def pool_ranking(lists: list[BeamHypotheses], n: int) -> list[Hypothesis]:
    """The best `n` hypotheses pooled over `lists` (groups), best first: Python's stable ascending sort by score,
    then pop from the end, as BeamSearchScorer.finalize does (ties: the later one in pooled order wins)."""
    pooled: list[Any] = [h for lst in lists for h in lst.beams]
    ranked = sorted(pooled, key=lambda h: h.score)
    return [ranked.pop() for _ in range(min(n, len(ranked)))]


# ------------------------------------------------------------------------------------------------ shared config pieces
MAX_BEAMS = 16
LN2 = math.log(2.0)
EARLY_STOPPING = ("false", "true", "never")
EARLY_STOPPING_HELP = ("when a group's n-best list is full: false = stop once no running beam can beat its worst "
                       "(HF heuristic at the current length), true = stop at once, never = the exact test (longest "
                       "possible length when length_penalty > 0)")


def early_stopping_value(text: str) -> bool | str:
    return {"false": False, "true": True, "never": "never"}[text]


def normalise_early_stopping(cfg) -> None:
    value = cfg.early_stopping
    if isinstance(value, bool):
        object.__setattr__(cfg, "early_stopping", "true" if value else "false")
    elif isinstance(value, str):
        object.__setattr__(cfg, "early_stopping", value.strip().lower())


def check_common(name: str, num_beams: int, num_return_sequences: int) -> None:
    if num_return_sequences > num_beams:
        raise UserError(f"{name}: num_return_sequences ({num_return_sequences}) must be at most num_beams "
                        f"({num_beams}); 0 returns all {num_beams}")


# ------------------------------------------------------------------------------------------------ the engine
def pad_token_id(lm) -> int:
    """The pad id HF generate would use: generation_config.pad_token_id, else the first EOS id."""
    gen = getattr(getattr(lm, "model", None), "generation_config", None)
    pad = getattr(gen, "pad_token_id", None)
    if isinstance(pad, int):
        return pad
    eos = getattr(gen, "eos_token_id", None)
    if isinstance(eos, int):
        return eos
    if isinstance(eos, (list, tuple)) and eos:
        return int(eos[0])
    return min(lm.eos_ids)


def group_beam_search(ctx: RunContext, *, num_beams: int, num_beam_groups: int, diversity_penalty: float,
                      length_penalty: float, early_stopping: bool | str, num_return_sequences: int) -> RunGen:
    """HF 4.36-4.56 group beam search for one prompt (batch 1); see strategies/diverse_beam.py. Yields Progress per step
    and returns the best `num_return_sequences` Sequences, best first."""
    lm, trace = ctx.lm, ctx.trace
    dev = lm.device
    P = len(ctx.prompt_ids)
    B, G = num_beams, num_beam_groups
    S = B // G
    eos_ids = sorted(int(e) for e in lm.eos_ids)
    eos_set = set(eos_ids)
    K = max(2, 1 + len(eos_ids)) * S                      # candidates per group and step
    pad = pad_token_id(lm)
    lam = float(diversity_penalty)
    hamming = lam > 0.0 and G > 1
    max_length = P + ctx.max_new_tokens
    text = lm.token_text

    out = lm.prefill([ctx.prompt_ids] * B)                # B identical rows, as HF (see diverse_beam.py)
    beam_scores = torch.full((B,), -1e9, dtype=torch.float32, device=dev)
    beam_scores[::S] = 0.0
    # host-side per-beam bookkeeping (B <= 16 floats): sums of raw ln p and of penalties, float32 scores as floats
    loglik, paid, score_host = [0.0] * B, [0.0] * B, beam_scores.tolist()
    seq = torch.zeros((B, 0), dtype=torch.long, device=dev)      # generated ids per beam
    hyps = [BeamHypotheses(S, length_penalty, early_stopping, max_length) for _ in range(G)]
    done = [False] * G
    offered: list[Hypothesis] = []                        # every hypothesis offered to a list, in order
    finish_rows: dict[int, dict] = {}                     # id(Hypothesis) -> its finish row

    def offer(g: int, hyp: Hypothesis, row: dict) -> None:
        row["accepted"] = hyps[g].add(hyp)
        offered.append(hyp)
        finish_rows[id(hyp)] = row

    step = 0
    for step in range(ctx.max_new_tokens):
        t0 = lm.clock_ms()
        lp = torch.log_softmax(out.logits.float(), dim=-1)          # [B, V] float32, raw
        V = lp.shape[-1]
        entropy = _entropy_bits(lp)                                  # [B] bits
        cur = [0] * B                                                # this step's token per row (HF current_tokens)
        reorder = [0] * B
        new_scores = beam_scores.clone()
        new_loglik, new_paid, new_score_host = list(loglik), list(paid), list(score_host)
        token_rows: list[dict] = []
        for g in range(G):
            lo = g * S
            if done[g]:                                              # HF: pad tokens, score 0, from the first beam
                cur[lo:lo + S] = [pad] * S
                reorder[lo:lo + S] = [lo] * S
                new_scores[lo:lo + S] = 0.0
                new_score_host[lo:lo + S] = [0.0] * S
                continue
            glp = lp[lo:lo + S]                                      # [S, V]
            if hamming and g > 0:
                counts = torch.bincount(torch.tensor(cur[:lo], device=dev), minlength=V)
                pen = lam * counts                                   # [V] float32, earlier groups' picks (HF op)
                proc = glp - pen
            else:
                pen = None
                proc = glp
            cand = (proc + beam_scores[lo:lo + S, None]).view(1, S * V)
            top_s, top_i = torch.topk(cand, K, dim=1, largest=True, sorted=True)
            top_s, top_i = top_s[0], top_i[0]                        # [K]
            raw = glp.reshape(-1)[top_i]                             # [K] raw ln p of each candidate
            pen_c = pen[top_i % V] if pen is not None else torch.zeros_like(raw)
            vals, raws, pens = torch.stack([top_s, raw, pen_c]).tolist()
            flat = top_i.tolist()
            parents = [i // V for i in flat]
            toks = [i % V for i in flat]

            kept: list[int] = []
            status = ["pruned"] * K
            for r in range(K):
                if toks[r] in eos_set:
                    if r >= S:
                        status[r] = "eos_skipped"
                        continue
                    status[r] = "finished"
                    p = lo + parents[r]
                    hyp_ll = loglik[p] + raws[r]
                    hyp_pen = paid[p] + pens[r]
                    gen_len = step + 1
                    hyp = Hypothesis(token_ids=seq[p].tolist(), score=normalised(vals[r], gen_len, length_penalty),
                                     cum_score=vals[r], gen_len=gen_len,
                                     extra={"loglik": hyp_ll, "penalty": hyp_pen, "group": g, "eos": True})
                    row = trace.add("finish", step - 1, branch_id=p, parent_id=p, position=P + step,
                                    token_id=toks[r], token_text=text(toks[r]), logprob=raws[r], entropy=entropy[p],
                                    score=hyp.score, group=g, cum_score=vals[r], loglik=hyp_ll, penalty=hyp_pen,
                                    gen_len=gen_len, eos=True, eos_step=step, rank=r)
                    offer(g, hyp, row)
                else:
                    status[r] = "kept"
                    kept.append(r)
                if len(kept) == S:
                    break
            if len(kept) < S:                                        # cannot happen with K >= (1 + #eos)·S
                raise RuntimeError(f"group {g}: only {len(kept)} non-EOS candidates among {K}")
            if hyps[g].is_done(vals[0], P + step + 1, P):
                done[g] = True
                trace.add("group_done", step, branch_id=lo, parent_id=lo, group=g, score=hyps[g].worst_score,
                          finished=len(hyps[g]))

            earlier = set(cur[:lo])
            new_scores[lo:lo + S] = top_s[torch.tensor(kept, dtype=torch.long, device=dev)]   # float32, exact
            for j, r in enumerate(kept):
                p = lo + parents[r]
                cur[lo + j], reorder[lo + j], new_score_host[lo + j] = toks[r], p, vals[r]
                new_loglik[lo + j], new_paid[lo + j] = loglik[p] + raws[r], paid[p] + pens[r]
            for r in range(K):
                p = lo + parents[r]
                trace.add("candidate", step, branch_id=p, parent_id=p, position=P + step, token_id=toks[r],
                          token_text=text(toks[r]), logprob=raws[r], entropy=entropy[p], score=vals[r],
                          accepted=status[r] == "kept", group=g, penalty=pens[r], aug_logprob=raws[r] - pens[r],
                          rank=r, parent_beam=p, status=status[r])
            for j, r in enumerate(kept):
                p = lo + parents[r]
                token_rows.append(trace.add(
                    "token", step, branch_id=lo + j, parent_id=p, position=P + step, token_id=toks[r],
                    token_text=text(toks[r]), logprob=raws[r], entropy=entropy[p], score=vals[r], accepted=True,
                    group=g, penalty=pens[r], collisions=int(toks[r] in earlier), loglik=new_loglik[lo + j], rank=r,
                    parent_beam=p))

        reorder_t = torch.tensor(reorder, dtype=torch.long, device=dev)
        cur_tok = torch.tensor(cur, dtype=torch.long, device=dev)
        seq = torch.cat([seq[reorder_t], cur_tok[:, None]], dim=1)
        beam_scores, loglik, paid, score_host = new_scores, new_loglik, new_paid, new_score_host
        sel_ms = lm.clock_ms() - t0
        if token_rows:
            token_rows[0].update(fwd_ms=out.fwd_ms, sel_ms=sel_ms)
            for row in token_rows:
                row["dt_ms"] = out.fwd_ms + sel_ms
        yield Progress(step, _best_running(seq, score_host, done, hyps, S))
        if all(done) or step + 1 >= ctx.max_new_tokens:
            break
        lm.select(out.cache, reorder_t)                              # one cache reorder per step
        out = lm.step(cur_tok[:, None], out.cache)

    # finalize: running beams of groups not done join their lists, then the pooled ranking
    last = seq.shape[1] - 1
    for g in range(G):
        if done[g]:
            continue
        for i in range(S):
            b = g * S + i
            cum = score_host[b]                                      # == beam_scores[b].item()
            hyp = Hypothesis(token_ids=seq[b].tolist(), score=normalised(cum, seq.shape[1], length_penalty),
                             cum_score=cum, gen_len=seq.shape[1],
                             extra={"loglik": loglik[b], "penalty": paid[b], "group": g, "eos": False})
            row = trace.add("finish", last, branch_id=b, parent_id=b, position=P + last, score=hyp.score, group=g,
                            cum_score=cum, loglik=hyp.extra["loglik"], penalty=hyp.extra["penalty"],
                            gen_len=seq.shape[1], eos=False)
            offer(g, hyp, row)
    for h in offered:
        finish_rows[id(h)]["evicted"] = bool(h.extra.get("evicted"))
    best = pool_ranking(hyps, num_return_sequences)
    for rank, h in enumerate(best):
        finish_rows[id(h)]["final_rank"] = rank
    return [Sequence(token_ids=h.token_ids, score=float(torch.tensor(h.score, dtype=torch.float32)),
                     extra={"loglik": h.extra["loglik"], "cum_score": h.cum_score, "penalty": h.extra["penalty"],
                            "normalised_score": h.score, "gen_len": h.gen_len, "group": h.extra["group"],
                            "eos": h.extra["eos"]})
            for h in best]


def _entropy_bits(lp: torch.Tensor) -> list[float]:
    """Entropy (bits) of each row of log-probs [B, V]: one fused dot product per row (half the cost of
    declab.sampling.entropy_bits); rows with -inf log-probs (0 * -inf = nan) fall back to entropy_bits."""
    h = (torch.linalg.vecdot(lp.exp(), lp) / -LN2).tolist()
    for b, v in enumerate(h):
        if v != v:
            h[b] = float(entropy_bits(lp[b]))
    return h


def _best_running(seq: torch.Tensor, scores: list[float], done: list[bool], hyps, S: int) -> list[int]:
    """Generated ids of the current best running beam (of groups not done), else of the best hypothesis."""
    alive = [b for g, d in enumerate(done) if not d for b in range(g * S, g * S + S)]
    if alive:
        return seq[max(alive, key=lambda b: scores[b])].tolist()
    ranked = pool_ranking(hyps, 1)
    return list(ranked[0].token_ids) if ranked else []
