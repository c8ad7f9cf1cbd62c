"""The per-token loop, and the selector interface its strategies plug into.

A `Selector` turns one logits row into one token. Its interface is llama.cpp's sampler interface
(`llama_sampler_i`: a name, `apply` to a logits row, `accept` the token the loop emitted, `reset` before a run), so
state that a selector carries from step to step has its place: mirostat's mu is committed in `accept`, momentum's
token graph grows there, contrastive decoding's amateur is fed the emitted token there. `apply` returns a `Choice`.

`token_loop(ctx, selector)` owns the KV cache, the stop/EOS/limit checks and the trace: per step one `token` row
(model logprob, entropy in bits, the selector's score, `kept`, forward and selection time) and `num_alternatives`
`candidate` rows with the model's top alternatives (or the selector's own candidates), so every selector strategy
shows what it could have picked. Strategies whose mechanism needs another loop (several rows per step, several
models taking turns, a trie of samples) say why in their module docstring.

`kept` is the number of tokens with nonzero probability in the distribution the token was chosen from: a selector
that draws from a distribution sets `columns["kept"]` (e.g. `declab.core.sampling.kept_count` of its warped row);
otherwise the loop writes 1, an argmax's point mass. A `Choice`'s score and columns may be 0-d tensors still on
the device: `record_token` folds them into the one device -> host copy it makes per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from declab.core.context import Progress, RunContext, RunGen, Sequence
from declab.core.sampling import entropy_bits


@dataclass
class Choice:
    """What a selector picked from one logits row."""

    token: int
    score: float | torch.Tensor                   # the trace's `score`: ln p of the token where it was drawn from
                                                  # (a 0-d tensor is copied to the host with the step's numbers)
    columns: dict = field(default_factory=dict)   # strategy-specific trace columns of the `token` row (0-d tensor
                                                  # values likewise); `kept` defaults to 1
    candidates: list[dict] | None = None          # own candidate rows ({"token_id", "logprob", **columns}), or None
    fwd_ms: float = 0.0                           # forward time the selector spent itself (a second model)


class Selector:
    """llama.cpp's sampler interface. Subclasses override `apply`, and `accept` / `reset` when they keep state."""

    name: str = "selector"
    sums_score: bool = False      # the sequence's score: the sum of the choices' (finite) scores, else the model's
                                  # log-likelihood of the tokens

    def reset(self) -> None:
        """Forget per-run state; the loop calls it once before the first step."""

    def apply(self, logits: torch.Tensor, step: int) -> Choice:  # pragma: no cover - interface
        """logits: [V] float32, the model's next-token logits at this step."""
        raise NotImplementedError

    def accept(self, token: int) -> None:
        """The loop emitted `token` (after writing its trace row): update the state that depends on it."""


def record_token(ctx: RunContext, step: int, token: int, logp: torch.Tensor, score: float, extra: dict,
                 branch_id: int = 0, parent_id: int = 0, dt_ms: float = 0.0, candidates: list[dict] | None = None
                 ) -> dict:
    """Write the `token` row and its top-alternative `candidate` rows for one chosen token. logp: [V] log-probs.
    With `candidates` (dicts with token_id, logprob and extra columns), those are the candidate rows instead.
    `score` and the values of `extra` may be 0-d tensors: they travel in the step's one host copy (integer and
    bool tensors come back as int)."""
    lm, trace = ctx.lm, ctx.trace
    position = len(ctx.prompt_ids) + step
    n_alt = ctx.num_alternatives if candidates is None else 0
    top = torch.topk(logp, n_alt) if n_alt else None
    # one device -> host copy per step: entropy, the token's logprob, the score and extra columns still on the
    # device, the alternatives' logprobs and ids (ids and counts travel as float64: exact below 2^53)
    pending = [("score", score)] if isinstance(score, torch.Tensor) else []
    pending += [(k, v) for k, v in extra.items() if isinstance(v, torch.Tensor)]
    parts = [entropy_bits(logp).reshape(1), logp[token].reshape(1)] + [v.reshape(1) for _, v in pending]
    if top is not None:
        parts += [top.values, top.indices]
    host = torch.cat([x.double() for x in parts]).tolist()
    entropy, token_logprob = host[0], host[1]
    if pending:
        extra = dict(extra)
        for i, (name, v) in enumerate(pending):
            value = host[2 + i]
            value = value if v.is_floating_point() else int(value)
            if name == "score":
                score = value
            else:
                extra[name] = value
        host = host[:2] + host[2 + len(pending):]
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


def token_loop(ctx: RunContext, selector: Selector) -> RunGen:
    """Prefill, then per step: the selector picks a token from the last logits, the loop traces it, the selector
    accepts it; stop at EOS or the limit."""
    lm = ctx.lm
    selector.reset()
    out = lm.prefill(ctx.prompt_ids, max_len=len(ctx.prompt_ids) + ctx.max_new_tokens)   # static cache if configured
    generated: list[int] = []
    total_logprob = 0.0
    for step in range(ctx.max_new_tokens):
        t0 = lm.clock_ms()
        logits = out.logits[0]                                   # [V] float32
        choice = selector.apply(logits, step)
        sel_ms = lm.clock_ms() - t0 - choice.fwd_ms
        logp = torch.log_softmax(logits, -1)                     # [V]
        columns = dict(choice.columns, fwd_ms=out.fwd_ms, sel_ms=sel_ms)
        columns.setdefault("kept", 1)                            # an argmax: one token
        row = record_token(ctx, step, choice.token, logp, choice.score, columns,
                           dt_ms=out.fwd_ms + choice.fwd_ms + sel_ms, candidates=choice.candidates)
        total_logprob += (row["score"] if math.isfinite(row["score"]) else 0.0) if selector.sums_score \
            else row["logprob"]
        selector.accept(choice.token)
        if choice.token in lm.eos_ids:
            break
        generated.append(choice.token)
        yield Progress(step, generated)
        if step + 1 < ctx.max_new_tokens:
            out = lm.step([[choice.token]], out.cache)
    return [Sequence(token_ids=list(generated), score=total_logprob)]
