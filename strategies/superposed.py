"""Superposed Decoding: k drafts from one autoregressive pass (Shen et al., "Superposed Decoding: Multiple
Generations from a Single Autoregressive Inference Pass", NeurIPS 2024, arXiv 2405.18400; reference code
RAIVNLab/SuperposedDecoding `superposed/llama/superpose.py`; docs/strategies.md#superposed).

The k drafts share ONE KV cache. The prompt is prefilled with input_ids; then every step feeds a single superposed
input embedding e = m·E (E: the input embedding matrix, m: the drafts' last tokens weighted by their normalised
scores, duplicates adding up) through `LM.step(inputs_embeds=[1, 1, H])`, so the cache grows by exactly one
position per step whatever k is, and k drafts cost one forward per token.

Per step t (symbols of the paper / reference -> config fields):
  p~ = top `num_token_sample` (n_tok) tokens of softmax(logits / `temperature` (tau)), renormalised; ONE
       distribution shared by all drafts
  q_d(v) = sum_n w_n P_n(v | last n-1 tokens of draft d), orders n = 2..(1+len(`ngram_weights`)), w = `ngram_weights`;
       an order whose context is unseen (or longer than prompt+draft) adds 0; q is not renormalised (weights sum 0.5)
  s_d(v) = (1-`alpha`) ln p~(v) + alpha ln q_d(v)   (q = 0 -> -inf: the n-grams exclude the token);
       a draft none of whose candidates has a finite score falls back to (1-alpha) ln p~(v) - `penalty`
  LP_d + s_d(v) over the k x n_tok pairs (first step: the n_tok tokens of draft 0, the drafts being identical);
       the best 2k candidates; alive <- the best k non-EOS ones; finished pool <- best k by LP of the old pool and
       the EOS candidates
  weights omega_d = softmax_d(LP_d) over the alive drafts; m[last token of d] += omega_d; e = m·E
End: the alive and finished drafts are pooled and ranked by pseudo-perplexity exp(-LP_d / gen_len) (gen_len counts a
finishing EOS, as the reference's fin lengths do); the best k are returned, best first, as `sequences`.
`alpha = 0` uses no n-grams at all (none are built or loaded): then s_d(v) = ln p~(v).

n-gram models: strategies/superposed_ngrams.py (default corpus: CPython's own documentation prose, the only
English text on every machine without network; `ngram_corpus` points at a user's text file or folder).

Deviations from the reference, and why:
- Defaults are the reference's `params/p15_d3_mixed.json` (k=3, n_tok=9, tau=0.06, alpha=0.54, weights
  [0.01, 0.04, 0.15, 0.18, 0.12] for orders 2..6, penalty 200), but its n-grams were built from 200k RedPajama
  documents with the Llama tokenizer; ours are much smaller (see superposed_ngrams), so more steps take the
  fallback path.
- Early stop (`early_stop`, on by default): the reference always decodes to the full length; we stop once the
  finished pool holds k drafts and every alive draft's LP is below the worst finished LP (an alive draft can still
  win on pseudo-perplexity by growing longer, so this is a heuristic; turn it off for reference behaviour). With
  k = 1 it makes a greedy run that ends in EOS end there too.
- p~ as the reference computes it (`float32_exclusion`, on by default): the reference takes softmax(logits / tau)
  in float32 over the whole vocabulary and keeps its top n_tok entries; with tau = 0.06 a top token more than
  ~104 nats below the best (6.2 logits) has probability exactly 0 there, so ln p~ = -inf and it is excluded (its
  n-gram term is masked to 0 too). Our ln p~ is a float64 log_softmax over the n_tok kept logits, which would keep
  such a token at ln p~ ~ -104 or below; the exclusion is applied from the float32 softmax itself, token for
  token. Off: the float64 values stand.
- Ties in the pair ranking break to the lower (draft, token-rank) index (stable sort), so runs are reproducible.
- Batch size 1 (one prompt), see docs/strategies.md#superposed; no `still_prompt`/`is_first` masks are needed.

Loop: its own, not the engine's per-token loop (declab/core/loop.py): one step emits a token for each of k drafts
(k trace rows and a pool of finished drafts) and feeds the model a mixed input embedding instead of a token id.

Trace: per step one `token` row per alive draft (branch_id = draft slot, parent_id = the slot it came from; the
drafts are the branches of the token tree) with the model's raw logprob and entropy of the superposed position,
`score` = LP_d after the step, `step_score` = s_d(v), `ln_ptilde`, `ngram_q`, `ngram_orders` (orders whose n-gram
(context, v) was seen, e.g. "2 3 4"), `ngram_hits` (how many), `ngram_ctx_orders` (orders whose context was seen),
`fallback` (the no-hit penalty path), `weight` (omega_d, the draft's share of the next input embedding),
`weight_entropy` (bits), `cosine` (between e and the draft token's embedding), `mixture_nnz`, `cache_len` (cache
length after the step's forward); `candidate` rows for the 2k best pairs (status kept/finished/pruned); `finish` rows
for every pooled draft with `ppl`, `cum_score`, `gen_len`, `eos` and `final_rank`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from declab.core.errors import UserError
from declab.core import Config, Progress, RunContext, RunGen, RunInputs, Sequence, Strategy, param, register
from declab.core.corpus import corpus_identity
from declab.core.metrics import SuperposedMetrics
from strategies.superposed_ngrams import load_ngrams

LN2 = math.log(2.0)


@dataclass(frozen=True)
class SuperposedConfig(Config):
    num_drafts: int = param(3, lo=1, hi=16, help="k: drafts decoded together through one shared KV cache")
    num_token_sample: int = param(9, lo=2, hi=100, help="n_tok: top tokens of the sharpened distribution, shared by "
                                  "all drafts (at least num_drafts + 1)")
    temperature: float = param(0.06, lo=0.0, hi=10.0, lo_open=True,
                               help="tau: softmax(logits / tau) before the top-n_tok cut (the paper's sharpening)")
    alpha: float = param(0.54, lo=0.0, hi=1.0, help="weight of the n-gram log-probability in the interpolated "
                         "score; 0 = no n-grams")
    ngram_weights: tuple = param((0.01, 0.04, 0.15, 0.18, 0.12),
                                 help="interpolation weights w_n of the n-gram orders 2, 3, ... (up to 6 values: "
                                 "orders 2..7), non-negative")
    penalty: float = param(200.0, lo=0.0, hi=1e6, help="score penalty of the fallback path when no candidate of a "
                           "draft has an n-gram hit")
    ngram_corpus: str = param("", help="text file or folder (.txt/.md/.rst) for the n-grams; empty = the default "
                              "corpus (CPython's documentation prose)")
    early_stop: bool = param(True, help="stop once k drafts have finished and every alive draft scores below them")
    float32_exclusion: bool = param(True, help="the reference's setting: p~ comes from a float32 softmax over the "
                                    "whole vocabulary, so a top token more than ~104 nats below the best (in "
                                    "logits / temperature) has p~ = 0 and is excluded; off = keep it at its tiny "
                                    "log-probability (about -104 and below)")

    def check(self) -> None:
        name = self.strategy_name()
        if self.num_token_sample < self.num_drafts + 1:
            raise UserError(f"{name}: num_token_sample must be at least num_drafts + 1 = {self.num_drafts + 1}, "
                            f"got {self.num_token_sample}")
        w = self.ngram_weights
        if not isinstance(w, tuple) or not 1 <= len(w) <= 6 or any(
                isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 <= x < math.inf for x in w):
            raise UserError(f"{name}: ngram_weights must be 1 to 6 finite non-negative numbers (orders 2..7), "
                            f"got {w!r}")
        if self.alpha > 0 and sum(w) <= 0:
            raise UserError(f"{name}: ngram_weights must not be all zero when alpha > 0")

    @property
    def orders(self) -> dict[int, float]:
        return {n: float(x) for n, x in zip(range(2, 2 + len(self.ngram_weights)), self.ngram_weights) if x > 0}


@dataclass
class Draft:
    token_ids: list[int]
    lp: float
    gen_len: int
    eos: bool
    slot: int          # branch id of its last token row
    step: int          # step of its last token row (-1: no token yet)
    ppl: float = math.inf


@register
class Superposed(Strategy):
    name = "superposed"
    title = "Superposed decoding"
    paper = "Shen et al. 2024, Superposed Decoding: Multiple Generations from a Single Autoregressive Inference Pass"
    explanation = ("Superposed decoding writes several drafts at once for the price of one: instead of running the "
                   "model once per draft, it feeds the model a single 'superposed' input, a weighted blend of the "
                   "drafts' last tokens, and keeps one shared memory. The model's next-token guesses are shared by "
                   "all drafts; small n-gram tables built from a text corpus decide which guess fits which draft. "
                   "You get k different continuations, ranked, at almost the cost of one greedy run.")
    Config = SuperposedConfig

    def prepare(self, cfg: SuperposedConfig, inputs: RunInputs) -> RunInputs:
        """Before any model is loaded: a user corpus must be a readable text file or folder."""
        if cfg.alpha > 0 and cfg.ngram_corpus:
            corpus_identity(cfg.ngram_corpus)
        return inputs

    def run(self, ctx: RunContext, cfg: SuperposedConfig) -> RunGen:
        lm, trace = ctx.lm, ctx.trace
        k, n_tok, alpha, tau = cfg.num_drafts, cfg.num_token_sample, float(cfg.alpha), float(cfg.temperature)
        ngrams = None
        if alpha > 0:
            ngrams = load_ngrams(lm, cfg.ngram_corpus, tuple(cfg.orders))
            info = {"ngram_corpus": ngrams.info.get("corpus"), "ngram_tokens": ngrams.info["tokens"],
                    "ngram_cached": ngrams.info.get("cached")}
        else:
            info = {}
        ctx.metrics = SuperposedMetrics(drafts=k, **info)
        orders = list(cfg.orders)
        E = lm.embedding_matrix.detach()                                    # [V_in, H]
        eos = lm.eos_ids
        P = len(ctx.prompt_ids)
        prompt = list(ctx.prompt_ids)
        text = lm.token_text

        out = lm.prefill(prompt)
        seqs: list[list[int]] = [[]]                                         # alive drafts' generated ids
        lp = torch.zeros(1, dtype=torch.float64)                             # LP_d of the alive drafts
        finished: list[Draft] = []
        fallback_steps = 0
        steps_done = 0
        for step in range(ctx.max_new_tokens):
            t0 = lm.clock_ms()
            logits = out.logits[0]                                           # [V] float32
            top = torch.topk(logits, n_tok)
            logp = torch.log_softmax(logits, -1)
            ent = -(logp.exp() * logp).sum() / LN2
            # the reference's p~: a float32 softmax of logits / tau over the whole vocabulary; a top token ~104 nats
            # below the best there has p exactly 0 and is excluded (ln p~ = -inf), see `float32_exclusion`
            zero = (torch.softmax(logits.float() / tau, -1)[top.indices] == 0).float()   # [n_tok]
            packed = torch.cat([top.values, logp[top.indices], ent[None], zero]).double().cpu()   # one transfer
            toks = top.indices.cpu()                                         # [n_tok]
            vals, raw_lp, entropy = packed[:n_tok], packed[n_tok:2 * n_tok], float(packed[2 * n_tok])
            ln_pt = torch.log_softmax(vals / tau, -1)                        # ln p~ over the kept tokens [n_tok]
            if cfg.float32_exclusion:
                ln_pt = ln_pt.masked_fill(packed[2 * n_tok + 1:] > 0, -math.inf)

            D = len(seqs)                                                    # 1 at the first step, then k
            hits = matched = None
            fallback = torch.zeros(D, dtype=torch.bool)
            q = None
            if ngrams is not None:
                qn, seen, matched = ngrams.lookup([prompt + s for s in seqs], toks.numpy(), cfg.orders)
                q = torch.from_numpy(qn)                                     # [D, n_tok]
                with np.errstate(divide="ignore"):
                    s = (1 - alpha) * ln_pt[None, :] + alpha * torch.log(q)
                fallback = torch.isinf(s).all(-1)                            # no candidate has an n-gram hit
                s = torch.where(fallback[:, None], (1 - alpha) * ln_pt[None, :] - cfg.penalty, s)
                hits = seen
            else:
                s = ln_pt[None, :].expand(D, n_tok)
            total = lp[:, None] + s                                          # [D, n_tok]
            flat = total.reshape(-1)
            order = torch.sort(flat, descending=True, stable=True).indices[: min(2 * k, flat.numel())]
            cand_d = (order // n_tok).tolist()
            cand_r = (order % n_tok).tolist()
            cand_tok = toks[order % n_tok].tolist()
            cand_val = flat[order].tolist()
            status = ["pruned"] * len(cand_tok)
            alive_idx = []
            for c, tok in enumerate(cand_tok):
                if tok in eos:
                    status[c] = "finished"
                    d = cand_d[c]
                    finished.append(Draft(list(seqs[d]), cand_val[c], len(seqs[d]) + 1, True, d, step - 1))
                elif len(alive_idx) < k:
                    status[c] = "kept"
                    alive_idx.append(c)
            finished.sort(key=lambda f: -f.lp)                               # stable: earlier entries win ties
            del finished[k:]
            parents = [cand_d[c] for c in alive_idx]
            new_tok = [cand_tok[c] for c in alive_idx]
            seqs = [seqs[p] + [t] for p, t in zip(parents, new_tok)]
            lp = torch.tensor([cand_val[c] for c in alive_idx], dtype=torch.float64)
            fallback_steps += int(bool(fallback[parents].any())) if ngrams is not None else 0

            # superposition weights and the mixed input embedding
            if torch.isfinite(lp).any():
                omega = torch.softmax(lp, -1)
            else:
                omega = torch.full_like(lp, 1.0 / len(lp))
            uniq, inv = torch.unique(torch.tensor(new_tok), return_inverse=True)
            m = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, omega)
            m = m / m.sum()
            nnz = int((m.float() > 0).sum())                               # non-zeros of m as fed
            rows = E[uniq.to(E.device)].float()                              # [U, H]
            e = (m.float().to(E.device)[:, None] * rows).sum(0)              # m·E over the mixed rows [H]
            cos = torch.nn.functional.cosine_similarity(e[None, :], rows, dim=-1).double().cpu()[inv]
            w_ent = float(-(omega[omega > 0] * omega[omega > 0].log()).sum() / LN2)
            sel_ms = lm.clock_ms() - t0

            # trace
            for c in range(len(cand_tok)):
                d, r = cand_d[c], cand_r[c]
                trace.add("candidate", step, branch_id=d, parent_id=d, position=P + step, token_id=cand_tok[c],
                          token_text=text(cand_tok[c]), logprob=float(raw_lp[r]), entropy=entropy,
                          score=cand_val[c], accepted=status[c] == "kept", status=status[c], rank=c,
                          step_score=float(s[d, r]), ln_ptilde=float(ln_pt[r]))
            for j, c in enumerate(alive_idx):
                d, r = cand_d[c], cand_r[c]
                extra = {}
                if ngrams is not None:
                    got = [orders[o] for o in range(len(orders)) if matched[d, o, r]]
                    ctx_seen = [orders[o] for o in range(len(orders)) if hits[d, o]]
                    extra = {"ngram_q": float(q[d, r]), "ngram_orders": " ".join(map(str, got)),
                             "ngram_hits": len(got), "ngram_ctx_orders": " ".join(map(str, ctx_seen)),
                             "fallback": bool(fallback[d])}
                trace.add("token", step, branch_id=j, parent_id=d, position=P + step, token_id=new_tok[j],
                          token_text=text(new_tok[j]), logprob=float(raw_lp[r]), entropy=entropy,
                          score=float(lp[j]), accepted=True, dt_ms=out.fwd_ms + sel_ms,
                          fwd_ms=out.fwd_ms if j == 0 else 0.0, sel_ms=sel_ms if j == 0 else 0.0,
                          step_score=float(s[d, r]), ln_ptilde=float(ln_pt[r]), weight=float(omega[j]),
                          weight_entropy=w_ent, cosine=float(cos[j]), mixture_nnz=nnz, draft_rank=j,
                          cache_len=out.cache.get_seq_length(), **extra)
            steps_done = step + 1
            yield Progress(step, list(seqs[0]))
            if step + 1 >= ctx.max_new_tokens or ctx.stop.is_set():
                break
            if cfg.early_stop and len(finished) >= k and float(lp.max()) < finished[-1].lp:
                break
            out = lm.step(None, out.cache, inputs_embeds=e.to(lm.dtype)[None, None, :])

        # pool alive and finished drafts, rank by pseudo-perplexity
        last = steps_done - 1
        pool = [Draft(seqs[j], float(lp[j]), len(seqs[j]), False, j, last) for j in range(len(seqs))] + finished
        for dr in pool:
            dr.ppl = math.exp(-dr.lp / dr.gen_len) if dr.gen_len and math.isfinite(dr.lp) else math.inf
        ranked = sorted(pool, key=lambda dr: dr.ppl)[:k]                    # stable: alive before finished on ties
        rank_of = {id(dr): i for i, dr in enumerate(ranked)}
        for dr in pool:
            trace.add("finish", dr.step, branch_id=dr.slot, parent_id=dr.slot, position=P + max(dr.step, 0),
                      score=self._score(dr), cum_score=dr.lp, ppl=dr.ppl, gen_len=dr.gen_len, eos=dr.eos,
                      final_rank=rank_of.get(id(dr)))
        ctx.metrics = SuperposedMetrics(drafts=k, forwards=steps_done, fallback_steps=fallback_steps,
                                        finished_drafts=len(finished), **info)
        return [Sequence(token_ids=list(dr.token_ids), score=self._score(dr),
                         extra={"ppl": dr.ppl if math.isfinite(dr.ppl) else None,
                                "cum_score": dr.lp if math.isfinite(dr.lp) else None,
                                "gen_len": dr.gen_len, "eos": dr.eos, "draft": dr.slot})
                for dr in ranked]

    @staticmethod
    def _score(dr: Draft) -> float:
        """-ln(pseudo-perplexity) = LP / gen_len: higher is better."""
        return dr.lp / dr.gen_len if dr.gen_len and math.isfinite(dr.lp) else -math.inf
