"""Diverse Beam Search (and plain beam search as its one-group case), token for token as transformers 4.36-4.56.

Paper: Vijayakumar et al., "Diverse Beam Search: Decoding Diverse Solutions from Neural Sequence Models",
arXiv 1610.02424 (AAAI 2018). Reference semantics: transformers 4.36-4.56 `_group_beam_search` with
`BeamSearchScorer` and `HammingDiversityLogitsProcessor` (docs/strategies.md#diverse_beam). transformers 5 dropped group beam
search from its core, so the lab carries its own.

The B beams are split into G groups of S = B/G. Every step runs ONE batched forward over all B rows; then, group by
group in order, group g does ordinary width-S beam search on the augmented score

    Θ(y_t) = ln p(y_t | y_<t) − λ · #{beams of groups h < g whose token at this step is y_t}     (Hamming diversity)

and the KV cache is reordered once, after all groups (LM.select).

Paper symbol -> config field: B -> `num_beams`, G -> `num_beam_groups` (B' = S = B/G beams per group),
λ -> `diversity_penalty`; from the HF reference: `length_penalty` (exponent α of the length normalisation
score / gen_len**α), `early_stopping` (True / False / "never" as in HF), `num_return_sequences` (0 = all num_beams).
`beam` (strategies/beam.py) is G = 1, λ = 0. The engine is `strategies.beams.group_beam_search`.

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
most prompts both agree (tests/data/diverse_beam/golden.json records both). Two scope limits: the model's own
generation_config processors (no_repeat_ngram_size, min_length, forced tokens...) are not applied (the embedded
model sets none), and the EOS set is LM.eos_ids (generation_config and tokenizer EOS together), which is what HF
uses for the models in models.yaml.

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

from declab.core.errors import UserError
from declab.core import Config, RunContext, RunGen, Strategy, param, register
from strategies.beams import (EARLY_STOPPING, EARLY_STOPPING_HELP, MAX_BEAMS, check_common, early_stopping_value,
                              group_beam_search, normalise_early_stopping)


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
        normalise_early_stopping(self)
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
        check_common(name, b, self.num_return_sequences)


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
            early_stopping=early_stopping_value(cfg.early_stopping),
            num_return_sequences=cfg.num_return_sequences or cfg.num_beams))
