"""The generic per-token loop for selector strategies (greedy, sample, mirostat...).

A selector turns one logits row into one token. The loop owns the KV cache, the stop/EOS/limit checks and the
trace: per step one `token` row (model logprob, entropy in bits, the selector's score, forward and selection
time) and `num_alternatives` `candidate` rows with the model's top alternatives, so every selector strategy
shows what it could have picked.
"""

from __future__ import annotations

from typing import Callable

import torch

from declab.sampling import entropy_bits
from strategies.base import Progress, RunContext, RunGen, Sequence

# select(logits [V] float32, step) -> (token_id, score, extra trace columns)
#   or (token_id, score, extra, candidates): a selector that ranks its own candidate set (momentum, ...) returns
#   one dict per candidate ({"token_id", "logprob", **columns}); they are written as the `candidate` rows instead
#   of the model's top alternatives.
Selector = Callable[[torch.Tensor, int], tuple]


def record_token(ctx: RunContext, step: int, token: int, logp: torch.Tensor, score: float, extra: dict,
                 branch_id: int = 0, parent_id: int = 0, dt_ms: float = 0.0, candidates: list[dict] | None = None
                 ) -> dict:
    """Write the `token` row and its top-alternative `candidate` rows for one chosen token. logp: [V] log-probs.
    With `candidates` (dicts with token_id, logprob and extra columns), those are the candidate rows instead."""
    lm, trace = ctx.lm, ctx.trace
    position = len(ctx.prompt_ids) + step
    n_alt = ctx.num_alternatives if candidates is None else 0
    top = torch.topk(logp, n_alt) if n_alt else None
    # one device -> host copy per step: entropy, the token's logprob, the alternatives' logprobs and ids
    # (ids travel as float64: exact for any vocabulary below 2^53)
    parts = [entropy_bits(logp).reshape(1), logp[token].reshape(1)]
    if top is not None:
        parts += [top.values, top.indices]
    host = torch.cat([x.double() for x in parts]).tolist()
    entropy, token_logprob = host[0], host[1]
    row = trace.add("token", step, branch_id=branch_id, parent_id=parent_id, position=position, token_id=token,
                    token_text=lm.token_text(token), logprob=token_logprob, entropy=entropy, score=score,
                    accepted=True, dt_ms=dt_ms, **extra)
    for cand in candidates or ():
        cols = dict(cand)
        tid = int(cols.pop("token_id"))
        trace.add("candidate", step, branch_id=branch_id, parent_id=parent_id, position=position, token_id=tid,
                  token_text=lm.token_text(tid), entropy=entropy, accepted=(tid == token), **cols)
    if top is not None:
        for rank, (lp, tid) in enumerate(zip(host[2:2 + n_alt], map(int, host[2 + n_alt:]))):
            trace.add("candidate", step, branch_id=branch_id, parent_id=parent_id, position=position, token_id=tid,
                      token_text=lm.token_text(tid), logprob=lp, entropy=entropy, accepted=(tid == token), rank=rank)
    return row


def token_loop(ctx: RunContext, select: Selector) -> RunGen:
    """Prefill, then per step: select a token from the last logits, trace it, stop at EOS or the limit."""
    lm = ctx.lm
    out = lm.prefill(ctx.prompt_ids, max_len=len(ctx.prompt_ids) + ctx.max_new_tokens)   # static cache if configured
    generated: list[int] = []
    total_logprob = 0.0
    for step in range(ctx.max_new_tokens):
        t0 = lm.clock_ms()
        logits = out.logits[0]                                   # [V] float32
        token, score, extra, *candidates = select(logits, step)
        sel_ms = lm.clock_ms() - t0
        logp = torch.log_softmax(logits, -1)                     # [V]
        row = record_token(ctx, step, token, logp, score, dict(extra, fwd_ms=out.fwd_ms, sel_ms=sel_ms),
                           dt_ms=out.fwd_ms + sel_ms, candidates=candidates[0] if candidates else None)
        total_logprob += row["logprob"]
        if token in lm.eos_ids:
            break
        generated.append(token)
        yield Progress(step, generated)
        if step + 1 < ctx.max_new_tokens:
            out = lm.step([[token]], out.cache)
    return [Sequence(token_ids=list(generated), score=total_logprob)]
