"""Contrastive search: pick, among the top-k tokens, the one that is likely *and* unlike everything said so far.

Paper: Su, Lan, Wang, Yogatama, Kong, Collier, "A Contrastive Framework for Neural Text Generation" (NeurIPS 2022,
arXiv 2202.06417; code yxuansu/SimCTG). Exact mechanics as in transformers 4.x `_contrastive_search` /
`_ranking_fast` (in core up to 4.55.x; from 4.56 `generate(penalty_alpha=...)` forwards to the Hub repo
transformers-community/contrastive-search, transformers PR #40428; the golden file tests/data/contrastive_search/
golden.json was made with 4.55.4). Spec: docs/strategies.md#contrastive_search.

    x_t = argmax_{v in top-k(p)}  (1 - alpha) * p(v | x_<t)  -  alpha * max_{j < t} cos(h_v, h_j)

p is the softmax of the model's logits (probability, not log-prob). h is the last-layer hidden state
(`hidden_states[-1]`, already final-normed); the context j runs over every position of prompt + generation.
The second term is the degeneration penalty.

Paper symbol -> config field:  alpha -> penalty_alpha,  k -> top_k.

Mechanics (one sequential forward per token, as in transformers): the prefill gives the prompt's hidden states and
the first logits. Each step takes the top-k of p, forks the KV cache to k rows, runs the k candidates as one
batched look-ahead forward (hidden=True), which gives h_v for every candidate *and* each candidate's next-step
logits; the chosen row's cache (LM.select), hidden state and logits are kept, so the next step needs no other
forward. Memory is k times the KV cache. The context's hidden states are kept unit-normalised in a preallocated
buffer, so a step costs one [k, H] x [H, t] product for the cosines.

Deviations: none in the rule. transformers applies the model's generation-config logits processors before the
top-k (e.g. a repetition penalty if the config sets one); this lab uses the raw logits (the embedded model's
generation config sets none, so the golden test against transformers 4.55.4 compares like with like). Ties
break to the first maximum in candidate order (torch.topk order), as transformers does.

Loop: its own, not the engine's per-token loop (declab/core/loop.py): each step's forward is the k-row look-ahead
of the previous step's candidates, and the chosen row's cache, hidden state and logits are selected from it, so the
model side of the step is not the shared loop's one-row forward.

Trace: the `candidate` rows are the k look-ahead candidates with `p`, `degeneration_penalty` (max cosine),
`context_pos` (the position j of that max, prompt positions included), `score` (the contrastive score) and `rank`
(by p). The `token` row carries the chosen `rank`, `p`, `degeneration_penalty`, `context_pos`, `overridden` (top-1
not chosen), `fwd_ms` (the k-row look-ahead forward, plus the prefill at step 0) and `sel_ms` (ranking).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from declab.core.sampling import entropy_bits
from declab.core import Config, Progress, RunContext, RunGen, Sequence, Strategy, param, register


@dataclass(frozen=True)
class ContrastiveSearchConfig(Config):
    penalty_alpha: float = param(0.6, lo=0.0, hi=1.0,
                                 help="α: score = (1-α)·p(v) - α·max cos(h_v, h_j) over the context "
                                      "(0 = greedy; common 0.6).")
    top_k: int = param(4, lo=1, hi=64, help="k: candidates looked ahead per step, one k-row forward each "
                                            "(memory k× the KV cache; common 4-8).")


@dataclass
class CSStep:
    """One step of contrastive search (tensors on the model's device)."""

    step: int
    logits: torch.Tensor          # [V] the logits this step chose from (from the previous look-ahead / prefill)
    cand_ids: torch.Tensor        # [k] top-k ids by p, descending
    cand_p: torch.Tensor          # [k] p of each candidate (softmax of the logits)
    cand_logp: torch.Tensor       # [k] ln p of each candidate
    penalty: torch.Tensor         # [k] degeneration penalty max_j cos(h_v, h_j)
    context_pos: torch.Tensor     # [k] argmax j (absolute position in prompt + generation)
    score: torch.Tensor           # [k] (1-α) p - α penalty
    rank: int                     # chosen index into the candidates
    token: int
    fwd_ms: float
    sel_ms: float


def contrastive_steps(lm, prompt_ids: list[int], penalty_alpha: float, top_k: int, max_new_tokens: int,
                      stop=None) -> Iterator[CSStep]:
    """The search itself, yielding one CSStep per emitted token (EOS included; it stops after EOS)."""
    k = min(top_k, lm.vocab_size)
    out = lm.prefill(prompt_ids, hidden=True)
    cache, logits = out.cache, out.logits[0]                                   # [V]
    h = out.hidden[0].float()                                                  # [P, H]
    P, H = h.shape
    ctx = torch.empty(P + max_new_tokens, H, dtype=torch.float32, device=h.device)   # unit-norm context states
    ctx[:P] = h / h.norm(dim=-1, keepdim=True)
    length = P
    pending_ms = out.fwd_ms
    for step in range(max_new_tokens):
        if stop is not None and stop.is_set():
            return
        cand_p, cand_ids = torch.topk(torch.softmax(logits, -1), k)            # [k], [k] as transformers
        cand_logp = torch.log_softmax(logits, -1)[cand_ids]                    # [k]
        lm.fork(cache, k)
        look = lm.step(cand_ids.view(k, 1), cache, hidden=True)               # logits [k, V], hidden [k, 1, H]
        t0 = lm.clock_ms()
        hv = look.hidden[:, 0].float()                                         # [k, H]
        hv = hv / hv.norm(dim=-1, keepdim=True)
        cos = hv @ ctx[:length].T                                              # [k, length]
        penalty, context_pos = cos.max(dim=-1)                                 # [k], [k]
        score = (1.0 - penalty_alpha) * cand_p - penalty_alpha * penalty       # [k]
        rank = int(score.argmax())                                             # host sync: first max
        lm.select(cache, [rank])
        ctx[length] = hv[rank]
        length += 1
        token = int(cand_ids[rank])
        sel_ms = lm.clock_ms() - t0
        yield CSStep(step, logits, cand_ids, cand_p, cand_logp, penalty, context_pos, score, rank, token,
                     fwd_ms=pending_ms + look.fwd_ms, sel_ms=sel_ms)
        if token in lm.eos_ids:
            return
        logits = look.logits[rank]                                             # [V] next step's logits
        pending_ms = 0.0


@register
class ContrastiveSearch(Strategy):
    name = "contrastive_search"
    title = "Contrastive search"
    paper = "Su et al. 2022, A Contrastive Framework for Neural Text Generation (NeurIPS 2022, arXiv 2202.06417)"
    explanation = ("Each step, the k most likely tokens are all tried one step ahead in a single batched forward. "
                   "Each gets a score: its probability, minus a degeneration penalty: how similar its hidden "
                   "representation is to the most similar token already in the text (prompt included). A token "
                   "that would make the model 'say the same thing again' looks like an earlier one and loses, so "
                   "the text stays coherent (only likely tokens compete) without looping.")
    Config = ContrastiveSearchConfig

    def run(self, ctx: RunContext, cfg: ContrastiveSearchConfig) -> RunGen:
        lm, trace = ctx.lm, ctx.trace
        generated: list[int] = []
        total_logprob = 0.0
        P = len(ctx.prompt_ids)
        for st in contrastive_steps(lm, ctx.prompt_ids, cfg.penalty_alpha, cfg.top_k, ctx.max_new_tokens,
                                    ctx.stop):
            ids, p, logp, pen, pos, score = (t.tolist() for t in (st.cand_ids, st.cand_p, st.cand_logp,
                                                                   st.penalty, st.context_pos, st.score))
            entropy = float(entropy_bits(torch.log_softmax(st.logits, -1)))
            r = st.rank
            position = P + st.step
            trace.add("token", st.step, branch_id=0, parent_id=0, position=position, token_id=st.token,
                      token_text=lm.token_text(st.token), logprob=logp[r], entropy=entropy, score=score[r],
                      accepted=True, dt_ms=st.fwd_ms + st.sel_ms, rank=r, p=p[r],
                      degeneration_penalty=pen[r], context_pos=pos[r], overridden=r != 0, fwd_ms=st.fwd_ms,
                      sel_ms=st.sel_ms)
            for i, tid in enumerate(ids):
                trace.add("candidate", st.step, branch_id=0, parent_id=0, position=position, token_id=tid,
                          token_text=lm.token_text(tid), logprob=logp[i], entropy=entropy, score=score[i],
                          accepted=(i == r), rank=i, p=p[i],
                          degeneration_penalty=pen[i], context_pos=pos[i])
            total_logprob += logp[r]
            if st.token in lm.eos_ids:
                break
            generated.append(st.token)
            yield Progress(st.step, generated)
        return [Sequence(token_ids=list(generated), score=total_logprob)]
