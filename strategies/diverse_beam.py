"""Diverse Beam Search (and plain beam search as its one-group case), token for token as transformers 4.36-4.56.

Paper: Vijayakumar et al., "Diverse Beam Search: Decoding Diverse Solutions from Neural Sequence Models",
arXiv 1610.02424 (AAAI 2018). Reference semantics: transformers 4.36-4.56 `_group_beam_search` with
`BeamSearchScorer` and `HammingDiversityLogitsProcessor` (algorithms.md 1.2-1.3). transformers 5 dropped group beam
search from its core, so the lab carries its own.

The B beams are split into G groups of S = B/G. Every step runs ONE batched forward over all B rows; then, group by
group in order, group g does ordinary width-S beam search on the augmented score

    Θ(y_t) = ln p(y_t | y_<t) − λ · #{beams of groups h < g whose token at this step is y_t}     (Hamming diversity)

and the KV cache is reordered once, after all groups (LM.select).

Paper symbol -> config field: B -> `num_beams`, G -> `num_beam_groups` (B' = S = B/G beams per group),
λ -> `diversity_penalty`; from the HF reference: `length_penalty` (exponent α of the length normalisation
score / gen_len**α), `early_stopping` (True / False / "never" as in HF), `num_return_sequences` (0 = all num_beams).
`beam` (strategies/beam.py) is G = 1, λ = 0.

Exactness details kept from the reference (each one changes outputs):
- log_softmax in float32, then the Hamming penalty (never before the softmax; group 0 untouched), counting tokens of
  earlier groups at THIS step with multiplicity (bincount), including the pad tokens of groups already done
  (pad == EOS for this model, so a done group penalises EOS for later groups);
- cumulative beam scores carry the penalties (so the returned `score` is not the log-likelihood; the plain
  log-likelihood is recorded as `loglik`); initial scores 0 for the first beam of each group, -1e9 for the others;
- candidates: torch.topk(sorted=True) over the flattened S×V scores with K = max(2, 1 + #eos)·S; an EOS candidate
  becomes a finished hypothesis only at rank < S, normalised by gen_len = steps so far + 1 (EOS counted, prompt not);
  the first S non-EOS candidates become the new beams;
- a group is done when its n-best list is full and `is_done` says no running beam can beat its worst (HF's
  heuristic); a done group emits pad tokens with score 0 from its first beam from then on;
- stop when every group is done or max_new_tokens is reached; then the running beams of unfinished groups join their
  lists (gen_len without +1), all groups' lists are pooled, stably sorted and popped best first; the returned score
  is stored in float32 as HF's `sequences_scores`.
- the prompt is prefilled as B identical rows, as HF does: one row forked B times differs from a B-row prefill in the
  last bits on CPU, which can flip near-ties later. This costs B× the prompt's prefill.

Where this deviates from the letter of the reference: none in the outputs. `beam` follows the BeamSearchScorer
semantics (HF 4.36-4.49 `_beam_search`, and 4.56 `_group_beam_search` with one group). HF 4.50-4.56 rewrote plain
`_beam_search` in vectorised form; it only differs in edge cases (its stopping test uses the best running beam
rather than the best candidate including EOS, and at the length limit it finishes only the top-S candidates), so on
most prompts both agree (tests/data/diverse_beam/golden.json records both).

Trace (one row per thing that happened; branch_id = beam slot 0..B-1, group g owns slots g·S..g·S+S-1):
- `candidate`: every one of the K candidates of every group and step: branch_id = parent_id = the parent beam's
  slot, `parent_beam`, token, `logprob` (raw ln p), `penalty` (λ·count), `aug_logprob` (logprob − penalty), `score`
  (cumulative augmented score that was ranked), `rank`, `group`, `status` (kept / finished / pruned / eos_skipped),
  `accepted` (became a running beam), entropy (bits) of the parent's distribution;
- `token`: each kept beam: branch_id = its new slot, parent_id = the parent's slot (the edges of the beam tree),
  logprob, penalty, `collisions` (1 when an earlier group chose the same token at this step), score (cumulative,
  penalties included), `loglik` (cumulative raw log-likelihood), `group`, `rank`; the step's `fwd_ms`/`sel_ms` on its
  first token row, dt_ms = the whole step on every token row;
- `finish`: every hypothesis offered to a group's n-best list (EOS at rank < S, and the running beams at the end):
  score = normalised score, `cum_score`, `loglik`, `penalty` (total paid), `gen_len`, `eos`, `accepted` (entered the
  list), `evicted`, `final_rank` (0 = best returned). A finish row sits at the step of the hypothesis's last token
  and on that token's branch (so (branch_id, step) name its leaf in the token tree); `eos_step` is the step at which
  the EOS was chosen;
- `group_done`: when a group's n-best list is closed (`is_done`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from declab.errors import UserError
from declab.sampling import entropy_bits
from strategies.base import Config, Progress, RunContext, RunGen, Sequence, Strategy, param, register
from strategies.beams import BeamHypotheses, Hypothesis, normalised, pool_ranking

MAX_BEAMS = 16
EARLY_STOPPING = ("false", "true", "never")
EARLY_STOPPING_HELP = ("when a group's n-best list is full: false = stop once no running beam can beat its worst "
                       "(HF heuristic at the current length), true = stop at once, never = the exact test (longest "
                       "possible length when length_penalty > 0)")


def _early_stopping_value(text: str) -> bool | str:
    return {"false": False, "true": True, "never": "never"}[text]


def _normalise_early_stopping(cfg) -> None:
    value = cfg.early_stopping
    if isinstance(value, bool):
        object.__setattr__(cfg, "early_stopping", "true" if value else "false")
    elif isinstance(value, str):
        object.__setattr__(cfg, "early_stopping", value.strip().lower())


def _check_common(name: str, num_beams: int, num_return_sequences: int) -> None:
    if num_return_sequences > num_beams:
        raise UserError(f"{name}: num_return_sequences ({num_return_sequences}) must be at most num_beams "
                        f"({num_beams}); 0 returns all {num_beams}")


@dataclass(frozen=True)
class DiverseBeamConfig(Config):
    num_beams: int = param(4, lo=2, hi=MAX_BEAMS, help="B: beams in all, split into num_beam_groups groups")
    num_beam_groups: int = param(2, lo=1, hi=MAX_BEAMS, help="G: groups; num_beams must be divisible by it "
                                 "(G = num_beams gives the most exploration)")
    diversity_penalty: float = param(0.5, lo=0.0, hi=1e6, help="λ: subtracted from a token's log-prob once per beam "
                                     "of an earlier group that chose it at the same step (Hamming diversity); "
                                     "must be > 0 when G > 1; the paper finds 0.2-0.8 works well")
    length_penalty: float = param(1.0, lo=-10.0, hi=10.0, help="α: finished scores are sum / gen_len**α "
                                  "(> 0 favours longer, < 0 shorter sequences)")
    early_stopping: str = param("false", choices=EARLY_STOPPING, help=EARLY_STOPPING_HELP)
    num_return_sequences: int = param(0, lo=0, hi=MAX_BEAMS, help="sequences returned, best first "
                                      "(0 = num_beams)")

    def __post_init__(self):
        _normalise_early_stopping(self)
        super().__post_init__()

    def check(self) -> None:
        name = self.strategy_name()
        b, g, lam = self.num_beams, self.num_beam_groups, self.diversity_penalty
        if g > b:
            raise UserError(f"{name}: num_beam_groups ({g}) must be at most num_beams ({b})")
        if b % g:
            fits = [d for d in range(1, b + 1) if b % d == 0]
            raise UserError(f"{name}: num_beams ({b}) must be divisible by num_beam_groups ({g}); with {b} beams use "
                            f"{', '.join(map(str, fits))} groups")
        if g > 1 and not lam > 0:
            raise UserError(f"{name}: diversity_penalty must be > 0 when num_beam_groups > 1 (got {lam}); "
                            "with 0 every group repeats group 0 (the paper uses 0.2-0.8)")
        if g == 1 and lam != 0:
            raise UserError(f"{name}: diversity_penalty ({lam}) needs num_beam_groups >= 2 (one group has no earlier "
                            "group to differ from); set diversity_penalty=0 or use strategy beam")
        _check_common(name, b, self.num_return_sequences)


@register
class DiverseBeam(Strategy):
    name = "diverse_beam"
    title = "Diverse beam search"
    paper = ("Vijayakumar et al., Diverse Beam Search: Decoding Diverse Solutions from Neural Sequence Models "
             "(AAAI 2018, arXiv 1610.02424); semantics of transformers 4.36-4.56 group beam search")
    explanation = ("Beam search keeps the B best partial sequences, but they tend to differ in a word or two. "
                   "Diverse beam search splits the beams into groups, run one after the other at every step: each "
                   "group does ordinary beam search, but a token already picked by an earlier group at this step costs "
                   "λ per pick. Group 1 is plain beam search; later groups are pushed onto other paths, so the "
                   "returned list covers different phrasings. All beams still share one batched forward per step.")
    Config = DiverseBeamConfig

    def run(self, ctx: RunContext, cfg: DiverseBeamConfig) -> RunGen:
        return (yield from group_beam_search(
            ctx, num_beams=cfg.num_beams, num_beam_groups=cfg.num_beam_groups,
            diversity_penalty=cfg.diversity_penalty, length_penalty=cfg.length_penalty,
            early_stopping=_early_stopping_value(cfg.early_stopping),
            num_return_sequences=cfg.num_return_sequences or cfg.num_beams))


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
    """HF 4.36-4.56 group beam search for one prompt (batch 1); see the module docstring. Yields Progress per step
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

    out = lm.prefill([ctx.prompt_ids] * B)                # B identical rows, as HF (see docstring)
    beam_scores = torch.full((B,), -1e9, dtype=torch.float32, device=dev)
    beam_scores[::S] = 0.0
    loglik = torch.zeros(B, dtype=torch.float64, device=dev)     # sum of raw ln p per beam
    paid = torch.zeros(B, dtype=torch.float64, device=dev)       # sum of penalties per beam
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
        entropy = entropy_bits(lp).tolist()                          # [B] bits
        cur_tok = torch.zeros(B, dtype=torch.long, device=dev)
        reorder = torch.zeros(B, dtype=torch.long, device=dev)
        new_scores = beam_scores.clone()
        new_loglik = loglik.clone()
        new_paid = paid.clone()
        token_rows: list[dict] = []
        for g in range(G):
            lo = g * S
            if done[g]:                                              # HF: pad tokens, score 0, from the first beam
                cur_tok[lo:lo + S] = pad
                reorder[lo:lo + S] = lo
                new_scores[lo:lo + S] = 0.0
                continue
            glp = lp[lo:lo + S]                                      # [S, V]
            if hamming and g > 0:
                pen = lam * torch.bincount(cur_tok[:lo], minlength=V)   # [V] float32, earlier groups' picks
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
                    hyp_ll = float(loglik[p]) + raws[r]
                    hyp_pen = float(paid[p]) + pens[r]
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

            sel = torch.tensor(kept, dtype=torch.long, device=dev)
            par = torch.tensor([parents[r] for r in kept], dtype=torch.long, device=dev) + lo
            cur_tok[lo:lo + S] = torch.tensor([toks[r] for r in kept], dtype=torch.long, device=dev)
            reorder[lo:lo + S] = par
            new_scores[lo:lo + S] = top_s[sel]
            new_loglik[lo:lo + S] = loglik[par] + raw[sel].double()
            new_paid[lo:lo + S] = paid[par] + pen_c[sel].double()

            kept_at = {r: j for j, r in enumerate(kept)}
            earlier = set(cur_tok[:lo].tolist()) if g > 0 else set()
            for r in range(K):
                p = lo + parents[r]
                trace.add("candidate", step, branch_id=p, parent_id=p, position=P + step, token_id=toks[r],
                          token_text=text(toks[r]), logprob=raws[r], entropy=entropy[p], score=vals[r],
                          accepted=status[r] == "kept", group=g, penalty=pens[r], aug_logprob=raws[r] - pens[r],
                          rank=r, parent_beam=p, status=status[r])
            ll_kept = new_loglik[lo:lo + S].tolist()
            for r, j in kept_at.items():
                p = lo + parents[r]
                token_rows.append(trace.add(
                    "token", step, branch_id=lo + j, parent_id=p, position=P + step, token_id=toks[r],
                    token_text=text(toks[r]), logprob=raws[r], entropy=entropy[p], score=vals[r], accepted=True,
                    group=g, penalty=pens[r], collisions=int(toks[r] in earlier), loglik=ll_kept[j], rank=r,
                    parent_beam=p))

        seq = torch.cat([seq[reorder], cur_tok[:, None]], dim=1)
        beam_scores, loglik, paid = new_scores, new_loglik, new_paid
        sel_ms = lm.clock_ms() - t0
        if token_rows:
            token_rows[0].update(fwd_ms=out.fwd_ms, sel_ms=sel_ms)
            for row in token_rows:
                row["dt_ms"] = out.fwd_ms + sel_ms
        yield Progress(step, _best_running(seq, beam_scores, done, hyps, S))
        if all(done) or step + 1 >= ctx.max_new_tokens:
            break
        lm.select(out.cache, reorder)                                # one cache reorder per step
        out = lm.step(cur_tok[:, None], out.cache)

    # finalize: running beams of groups not done join their lists, then the pooled ranking
    last = seq.shape[1] - 1
    for g in range(G):
        if done[g]:
            continue
        for i in range(S):
            b = g * S + i
            cum = float(beam_scores[b])
            hyp = Hypothesis(token_ids=seq[b].tolist(), score=normalised(cum, seq.shape[1], length_penalty),
                             cum_score=cum, gen_len=seq.shape[1],
                             extra={"loglik": float(loglik[b]), "penalty": float(paid[b]), "group": g, "eos": False})
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


def _best_running(seq: torch.Tensor, scores: torch.Tensor, done: list[bool], hyps, S: int) -> list[int]:
    """Generated ids of the current best running beam (of groups not done), else of the best hypothesis."""
    alive = [g for g, d in enumerate(done) if not d]
    if alive:
        rows = torch.cat([torch.arange(g * S, g * S + S) for g in alive]).to(scores.device)
        return seq[rows[int(scores[rows].argmax())]].tolist()
    ranked = pool_ranking(hyps, 1)
    return list(ranked[0].token_ids) if ranked else []
