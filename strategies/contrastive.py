"""Contrastive decoding (CD): pick tokens the expert likes much more than an amateur does.

Paper: Li, Holtzman, Fried, Liang, Eisner, Hashimoto, Zettlemoyer, Lewis, "Contrastive Decoding: Open-ended Text
Generation as Optimization" (arXiv 2210.15097, 2022); reference `XiangLi1999/ContrastiveDecoding` (its README runs
gpt2-xl / gpt2 with `--st_coef 1.0 --student_temperature 0.5`). Logit-space form: O'Brien & Lewis, "Contrastive
Decoding Improves Reasoning in Large Language Models" (2023). Spec: docs/strategies.md#contrastive.

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
sampled) so the trace shows each decision; run it inside a beam search is left out. (The reference's num_beam=1
greedy path applies no plausibility head at all: relative_top is None there; the head comes with beam search and
sampling. We always apply it.)

The reference's settings (XiangLi1999/ContrastiveDecoding `run_generation.py`, its own transformers fork):
* `amateur_context`: the paper's results were made with `--ignore_prefix yes` (the script's default, marked
  "IMPORTANT", and what submit_decoding.py passes): the amateur's prepare_inputs keeps only the last token, so it
  reads the prompt's LAST token and then the generation, as a fresh sequence (positions from 0, no mask). That is
  `amateur_context = last_token`, the setting that reproduces the paper; `full` (default here, as the README's
  single-prompt example `--ignore_prefix no`) gives the amateur the whole prompt.
* `warp` (sampling only): the reference warps the expert alone: EntrPLogitsWarper (V_head, log-probs), top-p, then
  / temperature, and only then subtracts st_coef x the amateur's logits / student temperature, softmax, one draw
  (`warp = expert`, `reference_warp`). Default here `score`: temperature and top-p apply to the CD score itself
  (softmax(score / T) after top-p on it), so T scales the whole objective; with T = 1 and top_p = 1 both coincide.

Amateur vocabulary: an amateur whose head covers part of the vocabulary only (the embedded draft keeps 16k of 49k
tokens, FR-Spec) gives -inf logits outside it; those tokens get its lowest logit there instead, so an expert-plausible
token the amateur cannot produce is scored as the amateur's least likely token, not as an automatic +inf.

Second model: the role `amateur` (`needs(cfg)` names the key `amateur` gives, else the model's first models.yaml
`pairs` entry); the engine loads it and checks the tokenizer. A model with no pair fails before loading with a
clear UserError ("... it has no amateur").

Loop: the engine's per-token loop (declab/core/loop.py) with `ContrastSelector`, which owns the amateur's cache.

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

from declab.core import Config, ModelNeed, Needs, RunContext, RunGen, Strategy, param, register
from declab.core.loop import Choice, Selector, token_loop
from declab.core.metrics import ContrastMetrics
from declab.core.sampling import draw, kept_count, sample_or_argmax
from strategies.two_model import named_model

NEG_INF = float("-inf")


# ------------------------------------------------------------------------------------------------ shared pieces
def choose(scores: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator
           ) -> tuple[int, torch.Tensor]:
    """Greedy (temperature 0: argmax, lowest id on ties) or one draw from softmax(scores / T) after top-p.
    scores: [V] with -inf for excluded tokens (at least one finite). Returns (token, the row drawn from [V])."""
    return sample_or_argmax(scores, generator, temperature, top_p=top_p)


def ranked(source: str, ids: list[int], values: list[float], column: str,
           extra: dict[str, list[float]] | None = None) -> list[dict]:
    """`candidate` rows for one ranked list (source = standard | lame | contrast | expert)."""
    return [{"token_id": tid, "rank": rank, "source": source, column: (val if math.isfinite(val) else None),
             **{k: v[rank] for k, v in (extra or {}).items()}} for rank, (tid, val) in enumerate(zip(ids, values))]


def add_candidates(ctx: RunContext, step: int, token: int, rows: list[dict]) -> None:
    """Write candidate rows made by `ranked` (for strategies that write their own token rows)."""
    lm = ctx.lm
    position = len(ctx.prompt_ids) + step
    for row in rows:
        cols = dict(row)
        tid = cols.pop("token_id")
        ctx.trace.add("candidate", step, branch_id=0, parent_id=0, position=position, token_id=tid,
                      token_text=lm.token_text(tid), accepted=(tid == token), **cols)


def reference_warp(lpe: torch.Tensor, amateur_term: torch.Tensor, head: torch.Tensor, temperature: float,
                   top_p: float) -> torch.Tensor:
    """The reference's sampling scores (`sample` with teacher_student): the expert's log-probs restricted to V_head
    (EntrPLogitsWarper), then top-p on them (renormalised over V_head), then / temperature; the amateur term is added
    after (score = warped expert - amateur); the token is drawn from softmax of the result.
    lpe, amateur_term: [V]; head: [V] bool -> [V]."""
    x = lpe.masked_fill(~head, NEG_INF).log_softmax(-1)                         # [V] log p_EXP renormalised on V_head
    if top_p < 1.0:
        # transformers' TopPLogitsWarper: drop the low tail whose cumulative mass is <= 1 - top_p (keep >= 1)
        sorted_x, idx = torch.sort(x, descending=False)
        cum = sorted_x.softmax(-1).cumsum(-1)
        drop = cum <= (1 - top_p)
        drop[-1] = False
        x = x.masked_fill(drop.scatter(0, idx, drop), NEG_INF)
    return x / temperature + amateur_term                                       # [V]


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
    top_p: float = param(1.0, lo=0.0, hi=1.0, lo_open=True, help="Top-p when sampling (1 = off); where it "
                                                                   "applies: `warp`.")
    amateur_context: str = param("full", choices=("full", "last_token"),
                                 help="What the amateur reads: full = the whole prompt and the generation; "
                                      "last_token = only the prompt's last token and the generation, as a fresh "
                                      "sequence (the reference's --ignore_prefix yes: the setting of the paper's "
                                      "results).")
    warp: str = param("score", choices=("score", "expert"),
                      help="When sampling, where temperature and top-p apply. score: softmax(CD score / T) after "
                           "top-p on the CD score. expert: the reference's setting: on the expert's log-probs only "
                           "(top-p over V_head, then / T), minus the amateur term, then softmax.")


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
    roles = ("amateur",)

    def needs(self, cfg: ContrastiveConfig) -> Needs:
        """The amateur: a key named in `amateur`, else the paired second model."""
        return Needs(models=(ModelNeed("amateur", named_model(cfg.amateur) or ""),))

    def run(self, ctx: RunContext, cfg: ContrastiveConfig) -> RunGen:
        return (yield from token_loop(ctx, ContrastSelector(ctx, cfg)))


class ContrastSelector(Selector):
    """The CD rule as a selector on the expert's logits. The amateur keeps its own KV cache here: `accept` records
    the emitted token and the next `apply` feeds it to the amateur (one forward per step, lazily, so the last token
    costs no amateur forward), so both models always see the same text."""

    name = "contrastive"
    sums_score = True               # a sequence's score is the sum of its CD scores

    def __init__(self, ctx: RunContext, cfg: ContrastiveConfig):
        self.ctx, self.cfg = ctx, cfg
        self.amateur = ctx.model("amateur")
        self.log_alpha = math.log(cfg.alpha) if cfg.alpha > 0 else NEG_INF
        self.reset()

    def reset(self) -> None:
        self.out_a, self.pending = None, None
        self.flips = self.head_total = self.steps = 0

    def accept(self, token: int) -> None:
        self.pending = token

    def _amateur_logits(self) -> tuple[torch.Tensor, float]:
        if self.out_a is None:
            prompt = list(self.ctx.prompt_ids)
            self.out_a = self.amateur.prefill(prompt[-1:] if self.cfg.amateur_context == "last_token" else prompt)
        elif self.pending is not None:
            self.out_a = self.amateur.step([[self.pending]], self.out_a.cache)
        self.pending = None
        return self.out_a.logits[0], self.out_a.fwd_ms

    def apply(self, logits: torch.Tensor, step: int) -> Choice:
        ctx, cfg, lm = self.ctx, self.cfg, self.ctx.lm
        k = min(ctx.num_alternatives, lm.vocab_size)
        la, ama_ms = self._amateur_logits()
        le, la = logits, la.to(logits.device)                                    # [V], [V]
        outside = torch.isneginf(la)                                             # beyond the amateur's vocabulary
        la = torch.where(outside, la.masked_fill(outside, math.inf).min(), la)    # -> its lowest logit, [V]
        lpe = le.log_softmax(-1)
        lpa = (la / cfg.amateur_temperature).log_softmax(-1)
        head = lpe >= lpe.max() + self.log_alpha                                 # V_head, [V] bool
        raw = lpe - lpa if cfg.score == "log_ratio" else (1 + cfg.beta) * le - cfg.beta * la
        scores = raw.masked_fill(~head, NEG_INF)
        if cfg.warp == "expert" and cfg.temperature > 0:
            dist = reference_warp(lpe, raw - lpe, head, cfg.temperature, cfg.top_p)      # [V]
            token = draw(dist, ctx.generator)
        else:
            token, dist = choose(scores, cfg.temperature, cfg.top_p, ctx.generator)
        ctop = torch.topk(scores, k)
        etop = torch.topk(lpe, k)
        # one host sync for every per-step number
        stats = torch.stack([lpe.argmax().float(), head.sum().float(), lpa[token], scores[token],
                             kept_count(dist, cfg.temperature).float()]).tolist()
        cids, cvals = ctop.indices.tolist(), ctop.values.tolist()
        eids, evals = etop.indices.tolist(), etop.values.tolist()
        plain, head_size = int(stats[0]), int(stats[1])
        flip = token != plain
        self.flips += flip
        self.head_total += head_size
        self.steps += 1
        both = torch.tensor(cids + eids)
        lp_pairs = torch.stack([lpe[both], lpa[both]]).tolist()
        candidates = (ranked("contrast", cids, cvals, "score", {"logprob": lp_pairs[0][:len(cids)],
                                                                "ama_logprob": lp_pairs[1][:len(cids)]}) +
                      ranked("expert", eids, evals, "logprob", {"ama_logprob": lp_pairs[1][len(cids):]}))
        ctx.metrics = ContrastMetrics(flips=self.flips, flip_fraction=round(self.flips / self.steps, 6),
                                      mean_head_size=round(self.head_total / self.steps, 4))
        return Choice(token, stats[3], {"ama_logprob": stats[2], "head_size": head_size,
                                        "plain_token": plain, "flip": flip, "ama_fwd_ms": ama_ms,
                                        "kept": int(stats[4])},
                      candidates=candidates, fwd_ms=ama_ms)
