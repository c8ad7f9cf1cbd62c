"""Contrastive decoding (CD): pick tokens the expert likes much more than an amateur does.

Paper: Li, Holtzman, Fried, Liang, Eisner, Hashimoto, Zettlemoyer, Lewis, "Contrastive Decoding: Open-ended Text
Generation as Optimization" (arXiv 2210.15097, 2022); reference `XiangLi1999/ContrastiveDecoding` (its README runs
gpt2-xl / gpt2 with `--st_coef 1.0 --student_temperature 0.5`). Logit-space form: O'Brien & Lewis, "Contrastive
Decoding Improves Reasoning in Large Language Models" (2023). Spec: algorithms.md 5.3 and 5.4 (d).

Rule, per step (expert = the run's model, amateur = the second model, same tokenizer):
    V_head = { v : p_EXP(v) >= alpha * max_w p_EXP(w) }                       (adaptive plausibility constraint)
    log_ratio:  score(v) = ln p_EXP(v) - ln p_AMA(v),  p_AMA = softmax(logits_AMA / amateur_temperature)
    logit:      score(v) = (1 + beta) * logit_EXP(v) - beta * logit_AMA(v)
    score(v) = -inf outside V_head; temperature 0: the argmax (ties break to the lowest id, torch.argmax), else a
    draw from softmax(score / temperature) after top_p.
Paper symbol -> config field: alpha -> alpha (0.1); the student temperature tau -> amateur_temperature (0.5, used
by the log_ratio form only; the logit form of O'Brien & Lewis uses raw logits); beta -> beta (0.5, logit form
only; the log_ratio form has the amateur coefficient 1, i.e. Li et al. exactly); score form -> score.
Deviation: the paper searches the CD objective with beam search (beam 5); here it is a per-token rule (greedy or
sampled) so the trace shows each decision; run it inside a beam search is left out.

Amateur vocabulary: an amateur whose head covers part of the vocabulary only (the embedded draft keeps 16k of 49k
tokens, FR-Spec) gives -inf logits outside it; those tokens get its lowest logit there instead, so an expert-plausible
token the amateur cannot produce is scored as the amateur's least likely token, not as an automatic +inf.

Second model: declared through `needs = {"second_model"}`; the runner / CLI / app load it (default: the model's
first models.yaml `pairs` entry) into ctx.extras, resolved by `strategies.two_model.second_lm`. A model with no
pair fails with a clear UserError ("... has no amateur ...").

Tie rule (5.4 d): with expert == amateur (and amateur_temperature 1 / beta any), the score is constant (0, or the
expert logit) on V_head; in the log_ratio form every token of V_head ties and the lowest id in V_head wins.

Trace: one `token` row per step: logprob = expert log p, `ama_logprob` = amateur log p (after its temperature),
score = CD score, `head_size` = |V_head|, `plain_token` = the expert's argmax, `flip` = the CD choice differs from
it; `candidate` rows: the top `num_alternatives` by CD score with `source` = contrast and their expert/amateur
log-probs, plus the expert's own top tokens with `source` = expert. Metrics: flips, flip_fraction, mean_head_size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from declab.errors import UserError
from declab.sampling import draw, entropy_bits, top_p_filter
from strategies.base import Config, Progress, RunContext, RunGen, Sequence, Strategy, param, register
from strategies.two_model import model_pairs, named_model, second_lm

NEG_INF = float("-inf")


# ------------------------------------------------------------------------------------------------ shared pieces
def choose(scores: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Greedy (temperature 0: argmax, lowest id on ties) or one draw from softmax(scores / T) after top-p.
    scores: [V] with -inf for excluded tokens (at least one finite)."""
    if temperature == 0:
        return int(scores.argmax())
    s = top_p_filter(scores / temperature, top_p)
    return draw(s, generator)


def add_candidates(ctx: RunContext, step: int, token: int, source: str, ids: list[int], values: list[float],
                   column: str, extra: dict[str, list[float]] | None = None) -> None:
    """`candidate` rows for one ranked list (source = standard | lame | contrast | expert)."""
    lm = ctx.lm
    position = len(ctx.prompt_ids) + step
    for rank, (tid, val) in enumerate(zip(ids, values)):
        cols = {k: v[rank] for k, v in (extra or {}).items()}
        ctx.trace.add("candidate", step, branch_id=0, parent_id=0, position=position, token_id=tid,
                      token_text=lm.token_text(tid), accepted=(tid == token), rank=rank, source=source,
                      **{column: (val if math.isfinite(val) else None)}, **cols)


# ------------------------------------------------------------------------------------------------ CD
@dataclass(frozen=True)
class ContrastiveConfig(Config):
    amateur: str = param("model", help="The amateur: 'model' (the second model beside the model, its first "
                                       "models.yaml pair) or a models.yaml key with the same tokenizer.")
    alpha: float = param(0.1, lo=0.0, hi=1.0, help="Plausibility: keep tokens with p_EXP >= alpha * max p_EXP "
                                                   "(paper: 0.1; 0 keeps every token, 1 only the expert's argmax).")
    score: str = param("log_ratio", choices=("log_ratio", "logit"),
                       help="log_ratio: ln p_EXP - ln p_AMA (Li et al.); logit: (1+beta) logit_EXP - beta logit_AMA "
                            "(O'Brien & Lewis).")
    beta: float = param(0.5, lo=0.0, hi=100.0, help="Amateur weight of the logit form (log_ratio ignores it).")
    amateur_temperature: float = param(0.5, lo=0.0, hi=100.0, lo_open=True,
                                       help="Temperature of the amateur in the log_ratio form (reference README: 0.5).")
    temperature: float = param(0.0, lo=0.0, hi=100.0, help="0 = greedy on the CD score; > 0 = sample "
                                                           "softmax(score / temperature).")
    top_p: float = param(1.0, lo=0.0, hi=1.0, lo_open=True, help="Top-p on the CD score when sampling (1 = off).")


@register
class Contrastive(Strategy):
    name = "contrastive"
    title = "Contrastive decoding (expert vs amateur)"
    paper = "Li et al. 2022, Contrastive Decoding: Open-ended Text Generation as Optimization (arXiv 2210.15097)"
    explanation = ("A small 'amateur' model makes the same dull mistakes as a large 'expert' (repetition, generic "
                   "phrases) but not its knowledge. Contrastive decoding prefers tokens the expert rates much higher "
                   "than the amateur: score = log p_expert - log p_amateur, only among tokens the expert itself finds "
                   "plausible (at least alpha times its top probability).")
    Config = ContrastiveConfig
    deterministic = False
    needs = {"second_model"}
    second_model_role = "amateur"          # named in the runner's "no second model" message

    @staticmethod
    def named_second_model(cfg: ContrastiveConfig) -> str:
        return named_model(cfg.amateur) or ""

    def run(self, ctx: RunContext, cfg: ContrastiveConfig) -> RunGen:
        lm, trace = ctx.lm, ctx.trace
        if ctx.extras.get("second_lm") is None and named_model(cfg.amateur) is None and not model_pairs(lm) \
                and not ctx.extras.get("second_model"):
            raise UserError(f"contrastive: model '{lm.key}' has no amateur: list a smaller same-tokenizer model under "
                            f"its `pairs` in models.yaml, pick a second model, or set amateur=<models.yaml key>")
        ama_lm = second_lm(ctx, named_model(cfg.amateur), "amateur")
        k = ctx.num_alternatives
        log_alpha = math.log(cfg.alpha) if cfg.alpha > 0 else NEG_INF
        out_e = lm.prefill(ctx.prompt_ids)
        out_a = ama_lm.prefill(ctx.prompt_ids)
        generated: list[int] = []
        total = 0.0
        flips = head_total = 0
        steps = 0
        for step in range(ctx.max_new_tokens):
            t0 = lm.clock_ms()
            le, la = out_e.logits[0], out_a.logits[0].to(out_e.logits.device)       # [V], [V]
            outside = torch.isneginf(la)                                             # beyond the amateur's vocabulary
            la = torch.where(outside, la.masked_fill(outside, math.inf).min(), la)    # -> its lowest logit, [V]
            lpe = le.log_softmax(-1)
            lpa = (la / cfg.amateur_temperature).log_softmax(-1)
            head = lpe >= lpe.max() + log_alpha                                      # V_head, [V] bool
            raw = lpe - lpa if cfg.score == "log_ratio" else (1 + cfg.beta) * le - cfg.beta * la
            scores = raw.masked_fill(~head, NEG_INF)
            token = choose(scores, cfg.temperature, cfg.top_p, ctx.generator)
            ctop = torch.topk(scores, min(k, lm.vocab_size))
            etop = torch.topk(lpe, min(k, lm.vocab_size))
            # one host sync for every per-step number
            stats = torch.stack([lpe.argmax().float(), head.sum().float(), lpe[token], lpa[token], scores[token],
                                 entropy_bits(lpe)]).tolist()
            cids, cvals = ctop.indices.tolist(), ctop.values.tolist()
            eids, evals = etop.indices.tolist(), etop.values.tolist()
            plain, head_size = int(stats[0]), int(stats[1])
            sel_ms = lm.clock_ms() - t0
            flip = token != plain
            flips += flip
            head_total += head_size
            steps += 1
            trace.add("token", step, branch_id=0, parent_id=0, position=len(ctx.prompt_ids) + step, token_id=token,
                      token_text=lm.token_text(token), logprob=stats[2], entropy=stats[5], score=stats[4],
                      model=lm.key, accepted=True, dt_ms=out_e.fwd_ms + out_a.fwd_ms + sel_ms, ama_logprob=stats[3],
                      head_size=head_size, plain_token=plain, flip=flip, fwd_ms=out_e.fwd_ms, ama_fwd_ms=out_a.fwd_ms,
                      sel_ms=sel_ms)
            both = torch.tensor(cids + eids)
            lp_pairs = torch.stack([lpe[both], lpa[both]]).tolist()
            add_candidates(ctx, step, token, "contrast", cids, cvals, "score",
                           {"logprob": lp_pairs[0][:len(cids)], "ama_logprob": lp_pairs[1][:len(cids)]})
            add_candidates(ctx, step, token, "expert", eids, evals, "logprob",
                           {"ama_logprob": lp_pairs[1][len(cids):]})
            total += stats[4] if math.isfinite(stats[4]) else 0.0
            ctx.metrics.update(self.metrics(flips, head_total, steps, ama_lm))
            if token in lm.eos_ids:
                break
            generated.append(token)
            yield Progress(step, generated)
            if step + 1 < ctx.max_new_tokens:
                out_e = lm.step([[token]], out_e.cache)
                out_a = ama_lm.step([[token]], out_a.cache)
        ctx.metrics.update(self.metrics(flips, head_total, steps, ama_lm))
        return [Sequence(token_ids=list(generated), score=total)]

    @staticmethod
    def metrics(flips: int, head_total: int, steps: int, ama_lm) -> dict:
        return {"flips": flips, "flip_fraction": round(flips / steps, 6) if steps else 0.0,
                "mean_head_size": round(head_total / steps, 4) if steps else 0.0}
