"""AdaDec: greedy decoding that pauses where the entropy is high and reranks the top candidates by a short lookahead.

Paper: He et al., "Towards Better Code Generation: Adaptive Decoding with Uncertainty Guidance" (arXiv 2506.08980);
reference `SYSUSELab/AdaDec` (llm/generator.py `Generator.generate` in mode AdaFixL, `lookahead_scoring_function`,
`get_lookahead_score`; src/learn_threshold/logistic_regression.py; data/learned_thresholds.json).
Spec: docs/strategies.md#adadec.

Rule, per step, with H the entropy (nats) of the model's raw next-token distribution p:
    H < tau: greedy (argmax p).
    else pause: take the top B candidates c by p; roll each out greedily for up to L tokens r_1..r_l (stopping
    early at EOS, or with lookahead_stop = indent at the reference's rule: the generated text has 4 empty lines
    in a row or a non-empty line that is not indented);
        score(c) = (ln p(c) + sum_j ln p(r_j | ..., c, r_<j)) / (l + 1)
    and emit only the best c (first on ties). The rollout is discarded; the next step decides again.
The reference multiplies the score by lambda (1) and adds the beam's history score; with one beam (the published
AdaFixL setting, beam_size 1) neither changes the argmax, so neither is a parameter here.

Threshold tau (the reference learns one per model): teacher-force canonical solutions, record H and y = [the true
token is the model's top-1] at every position, fit a class-balanced logistic regression P(y | H), take the
probability cut p* that maximises accuracy on a 20% test split (grid 0.01..0.99), tau = (logit(p*) - b) / w.
`bench/adadec_threshold.py` does this for a model on HumanEval's canonical solutions in the lab's chat format; the
default tau below is its result for the embedded SmolLM2-135M-Instruct, 1.766 nats (p* = 0.27 on 9,676 positions;
the reference's own values: deepseek-1.3b 0.985, qwen3-0.6b 1.321). For another model, fit it (or set tau).

Paper / reference symbol -> config field: tau (`entropy_threshold`, nats) -> tau; B (`lookahead_beam_size`, 3) ->
lookahead_beam_size; L (`lookahead_length`, 5) -> lookahead_length; the early-stop rule of `get_lookahead_score`
-> lookahead_stop ("indent"; "none" by default: the rule assumes a completion-mode HumanEval body, where every
line of the generation is indented, and would end every rollout at once in the chat format, where the reply
starts with an unindented line).

Differences from the reference (on purpose): the reference recomputes every forward over the whole sequence with
no KV cache; here a pause forks the current cache into B rows, runs the B rollouts as one batched forward per
lookahead token, then keeps the chosen row cut back to the candidate (whose next-token logits the first lookahead
forward already gave, so the next step needs no forward). A rollout row that stopped early stops adding to its
score (the reference keeps adding the finished row's later tokens to the score but not to its length) and stops at
EOS (the reference rolls out past it). tau = inf (or B = 1, or L = 0) is exactly greedy decoding.

Loop: its own, not the engine's per-token loop (declab/core/loop.py): a paused step runs B-row forwards from a fork
of the cache and the next step starts from the chosen row; every emitted token is written by `record_token`.

Trace: `token` rows on branch 0 are the emitted tokens, with `intervened` (a pause), `gate_entropy` (H in bits,
= the base `entropy` column), `gate_threshold` (tau in bits), `greedy_token` (argmax p), `flip` (the pause chose
another token), and on paused rows `lookahead_score` of the chosen candidate and `num_candidates`. Each candidate's
rollout is a branch of the token tree (`token` rows with accepted=False, `candidate` index, `lookahead_score`,
`chosen`): a rejected candidate's branch starts with the candidate itself at the pause step; the chosen one's
rollout hangs from the emitted token. One `lookahead` row per candidate at the pause step holds its rollout text,
logprob = ln p(c), `rollout_len`, `rollout_logprob` (sum over the rollout), score = its lookahead score and
`chosen`. A `finish` row marks branch 0 as the chosen sequence. Metrics: declab.core.metrics.UncertaintyMetrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from declab.core import Config, Progress, RunContext, RunGen, Sequence, Strategy, param, register
from declab.core.loop import record_token
from declab.core.metrics import UncertaintyMetrics
from declab.core.sampling import LN2, entropy_bits
from strategies.cautious import Branches, Counter, branch_rows, finish_row

TAU_EMBEDDED = 1.766        # bench/adadec_threshold.py on smollm2-135m-instruct


def stop_indent(text: str) -> bool:
    """The reference's early stop of a rollout: 4 empty lines in a row at the end, or a non-empty line that does
    not start with a space or a tab (the function body has ended)."""
    lines = text.split("\n")
    consecutive_empty = len(lines) >= 4 and all(line.strip() == "" for line in lines[-4:])
    return consecutive_empty or not all(not line or line.startswith((" ", "\t")) for line in lines)


@dataclass(frozen=True)
class AdaDecConfig(Config):
    tau: float = param(TAU_EMBEDDED, lo=0.0,
                       help="τ (nats): pause and rerank when the entropy H >= τ, else greedy. Default: fitted on the "
                            "embedded model (bench/adadec_threshold.py); inf = greedy.")
    lookahead_beam_size: int = param(3, lo=1, hi=16, help="B: candidates reranked at a pause (the top B by p; "
                                                          "reference 3; 1 = greedy). B rows share one forward.")
    lookahead_length: int = param(5, lo=0, hi=64, help="L: greedy lookahead tokens per candidate (reference 5; 0 = "
                                                       "greedy).")
    lookahead_stop: str = param("none", choices=("none", "indent"),
                                help="Early stop of a rollout besides EOS: none, or indent (the reference's rule for "
                                     "completion-mode code: 4 empty lines or an unindented line).")


@dataclass
class Lookahead:
    """The B candidates of one pause and their greedy rollouts."""

    cand: list[int]                          # [B] candidate ids, by p descending
    cand_logp: list[float]                   # [B] ln p(c)
    rollouts: list[list[int]]                # per candidate its rollout tokens
    rollout_logp: list[list[float]]          # ln p of each rollout token
    rollout_logits: list[list[torch.Tensor]]  # [V] raw logits each rollout token was read from
    scores: list[float]                      # (ln p(c) + sum rollout ln p) / (len + 1)
    best: int
    first_logits: torch.Tensor | None        # [B, V] after each candidate (the first lookahead forward)


def lookahead(ctx: RunContext, cfg: AdaDecConfig, cache, logp: torch.Tensor, generated: list[int],
              counter: Counter) -> Lookahead:
    """Fork the one-row cache into B rows, feed each the candidate and roll out greedily; the cache is left as the
    B rows (the caller keeps the chosen one)."""
    lm = ctx.lm
    top = torch.topk(logp, min(cfg.lookahead_beam_size, logp.shape[-1]))
    cand, cand_logp = top.indices.tolist(), top.values.tolist()
    B = len(cand)
    rollouts = [[] for _ in range(B)]
    r_logp = [[] for _ in range(B)]
    r_logits = [[] for _ in range(B)]
    done = [c in lm.eos_ids for c in cand]
    first = None
    if cfg.lookahead_length and not all(done):
        lm.fork(cache, B)
        feed = [[c] for c in cand]
        for _ in range(cfg.lookahead_length):
            out = counter.step(lm, feed, cache)                                  # logits [B, V]
            first = out.logits if first is None else first
            row_logp = torch.log_softmax(out.logits, -1)                         # [B, V]
            best_lp, best_id = row_logp.max(-1)                                  # [B], [B]
            best_lp, best_id = best_lp.tolist(), best_id.tolist()
            for b in range(B):
                if done[b]:
                    continue
                tok = best_id[b]
                rollouts[b].append(tok)
                r_logp[b].append(best_lp[b])
                r_logits[b].append(out.logits[b])
                done[b] = tok in lm.eos_ids or (cfg.lookahead_stop == "indent"
                                                and stop_indent(lm.decode(generated + [cand[b]] + rollouts[b])))
            if all(done):
                break
            feed = [[rollouts[b][-1] if rollouts[b] else cand[b]] for b in range(B)]   # finished rows: junk
    scores = [(cand_logp[b] + sum(r_logp[b])) / (len(rollouts[b]) + 1) for b in range(B)]
    best = max(range(B), key=lambda b: (scores[b], -b))
    return Lookahead(cand, cand_logp, rollouts, r_logp, r_logits, scores, best, first)


@register
class AdaDec(Strategy):
    name = "adadec"
    title = "AdaDec (uncertainty-guided pause and lookahead rerank)"
    paper = ("He et al. 2025, Towards Better Code Generation: Adaptive Decoding with Uncertainty Guidance "
             "(arXiv 2506.08980)")
    explanation = ("Greedy decoding, except where the model is unsure: when the entropy of the next token passes "
                   "a threshold learned for the model, decoding pauses, the top few candidates are each continued "
                   "greedily for a few tokens, and the candidate whose short future is most likely on average is "
                   "emitted. Only that one token is kept; the next step decides again. The lookaheads show as "
                   "branches of the token tree.")
    Config = AdaDecConfig

    def run(self, ctx: RunContext, cfg: AdaDecConfig) -> RunGen:
        lm = ctx.lm
        branches, counter = Branches(), Counter()
        metrics = ctx.metrics = UncertaintyMetrics(decisions=0, interventions=0, flips=0)
        tau_bits = cfg.tau / LN2
        out = lm.prefill(ctx.prompt_ids)
        cache, logits, fwd_ms = out.cache, out.logits[0], out.fwd_ms              # logits [V]
        base = cache.get_seq_length()
        generated: list[int] = []
        total = 0.0
        step = -1
        for step in range(ctx.max_new_tokens):
            if ctx.stop.is_set():
                step -= 1
                break
            t0 = lm.clock_ms()
            logp = torch.log_softmax(logits, -1)                                  # [V]
            h_bits, greedy = float(entropy_bits(logp)), int(logits.argmax())
            metrics.decisions += 1
            cols = {"gate_entropy": h_bits, "gate_threshold": tau_bits, "greedy_token": greedy}
            next_logits = None
            if h_bits * LN2 < cfg.tau or cfg.lookahead_beam_size == 1 or cfg.lookahead_length == 0:
                token, score, la = greedy, float(logp[greedy]), None
                cols.update(intervened=False, flip=False)
            else:
                metrics.interventions += 1
                f0, l0 = counter.forwards, lm.clock_ms()
                la = lookahead(ctx, cfg, cache, logp, generated, counter)
                token, score = la.cand[la.best], la.scores[la.best]
                metrics.flips += token != greedy
                cols.update(intervened=True, flip=token != greedy, lookahead_score=score,
                            num_candidates=len(la.cand), lookahead_ms=lm.clock_ms() - l0,
                            lookahead_forwards=counter.forwards - f0)
                if la.first_logits is not None:                                  # the cache holds B rows
                    lm.select(cache, [la.best])
                    lm.crop(cache, base + step + 1)
                    next_logits = la.first_logits[la.best]
            sel_ms = lm.clock_ms() - t0
            row = record_token(ctx, step, token, logp, score, dict(cols, fwd_ms=fwd_ms, sel_ms=sel_ms),
                               dt_ms=fwd_ms + sel_ms, candidates=[] if la is not None else None)
            if la is not None:
                self._trace_lookahead(ctx, step, la, logits, branches)
            total += row["logprob"]
            metrics.flip_fraction = metrics.flips / metrics.decisions
            metrics.intervention_rate = metrics.interventions / metrics.decisions
            self._forwards(metrics, counter, step + 1)
            if token in lm.eos_ids:
                break
            generated.append(token)
            yield Progress(step, generated)
            if step + 1 >= ctx.max_new_tokens:
                break
            if next_logits is None:
                out = counter.step(lm, [[token]], cache)
                cache, logits, fwd_ms = out.cache, out.logits[0], out.fwd_ms
            else:
                logits, fwd_ms = next_logits, 0.0
        if step >= 0:
            finish_row(ctx, step, total)
        return [Sequence(token_ids=list(generated), score=total)]

    @staticmethod
    def _trace_lookahead(ctx: RunContext, step: int, la: Lookahead, logits: torch.Tensor, branches: Branches) -> None:
        """Each candidate's rollout as a branch, and one `lookahead` row per candidate."""
        for b, c in enumerate(la.cand):
            chosen = b == la.best
            branch = branches.new()
            cols = dict(candidate=b, lookahead_score=la.scores[b], chosen=chosen)
            if chosen:          # the candidate is the emitted token; its rollout hangs from it
                branch_rows(ctx, branch, step + 1, la.rollouts[b], la.rollout_logits[b], la.rollout_logp[b], **cols)
            else:
                branch_rows(ctx, branch, step, [c] + la.rollouts[b], [logits] + la.rollout_logits[b],
                            [la.cand_logp[b]] + la.rollout_logp[b], **cols)
            ctx.trace.add("lookahead", step, branch_id=branch, parent_id=0, position=len(ctx.prompt_ids) + step,
                          token_id=c, token_text=ctx.lm.decode([c] + la.rollouts[b]), logprob=la.cand_logp[b],
                          score=la.scores[b], accepted=chosen, candidate=b, rollout_len=len(la.rollouts[b]),
                          rollout_logprob=sum(la.rollout_logp[b]), chosen=chosen)

    @staticmethod
    def _forwards(m: UncertaintyMetrics, counter: Counter, emitted: int) -> None:
        m.forwards, m.forward_tokens = counter.forwards, counter.tokens
        m.forward_tokens_per_token = counter.tokens / emitted
        m.extra_forwards_per_token = (counter.forwards - emitted) / emitted
