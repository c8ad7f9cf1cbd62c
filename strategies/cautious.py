"""Cautious Next Token Prediction (CNTP): where the model is unsure, sample several trials up to the next punctuation
and keep the one the model is most confident in.

Paper: Wang, Zhang, Bai, Chiu, Hu, Zhang, Dong, Yin, Amirghodsi, Fu, "Cautious Next Token Prediction" (Findings of
ACL 2025, arXiv 2507.03038); reference `wyzjack/CNTP` (README, `_sample_reflect_perplexity` for transformers
4.47.1; published runs `--temperature 0.8 --top_p 0.95 --entropy_threshold_low 0.01 --entropy_threshold_high 1.5
--max_trials 10`). Spec: docs/strategies.md#cautious.

Rule, per decision step, on the processed distribution p (the logits after temperature -> top-k -> top-p):
    H = -sum_v p(v) ln(p(v) + 1e-10)                                        (nats)
    N = int(1 + (N_max - 1) * clamp((H - H_low) / (H_high - H_low), 0, 1))
    N = 1: one ordinary step (a draw from p; the argmax at temperature 0).
    N > 1: N independent trials from the current state, each sampled token by token from its own processed
           distribution until it emits a punctuation token (the first id of each of . , \\n ? ! : ; ) ] }), EOS,
           `max_trial_tokens` tokens, or the run's token limit; keep the trial with the lowest
           perplexity exp(mean_i -ln p(x_i)) over its own sampled tokens (first on ties) and append it whole.
So N > 1 exactly when H >= H_low + (H_high - H_low) / (N_max - 1) (the trace's `gate_threshold`, in bits).

Paper / reference symbol -> config field: N_max (`max_trials`) -> max_trials; H_low, H_high
(`entropy_threshold_low` / `_high`, nats) -> entropy_threshold_low, entropy_threshold_high; the published run's
sampling -> temperature 0.8, top_p 0.95, and top_k 50 (transformers' GenerationConfig default, which those runs
inherited). temperature 0 is the reference's greedy mode: ordinary steps take the argmax, and the rule and the
trials read the unwarped softmax (no warpers are in the reference's processor list then).

Differences from the reference (on purpose, as the spec's pitfalls): trials are capped at `max_trial_tokens`
(the reference has no cap); the N trials run as N rows of one batched forward from a fork of the current KV cache
(the reference clones the cache per trial and recomputes the current forward for each; here the current logits are
reused for every trial's first token); a finished trial stays in the batch only while it is the best finished one
(it is fed its last token once, so the kept trial's next logits come for free; later rounds feed it junk that a
crop removes); the draws come from the run's seeded generator, trial by trial in index order, so a seed reproduces
a run. With H_high = inf (or N_max = 1) the strategy is plain sampling with the same draws as `sample`.

Loop: its own, not the engine's per-token loop (declab/core/loop.py): one step can fork the cache into N rows and
emit a whole trial; every emitted token is still written by `record_token`.

Trace: `token` rows on branch 0 are the emitted tokens, with `intervened` (this step started an intervention),
`num_trials` N, `gate_entropy` (H in bits, of the processed distribution), `gate_threshold` (bits), `trial` (the
kept trial's index, -1 on ordinary steps), `trial_ppl`, `chosen`. Each rejected trial is a branch of the token tree:
`token` rows with accepted=False on their own branch_id (parent 0 at the first token, then the branch itself), the
same `trial` / `trial_ppl` / `chosen` columns; `score` is ln p under the processed distribution. One `trial` row
per trial at the intervention step (branch_id of its tokens, 0 for the kept one) holds the whole trial text,
`trial_len`, `trial_ppl`, score = its mean ln p and `chosen`. A `finish` row marks branch 0 as the chosen
sequence. Metrics: declab.core.metrics.UncertaintyMetrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from declab.core import Config, Progress, RunContext, RunGen, Sequence, Strategy, UserError, param, register
from declab.core.loop import record_token
from declab.core.metrics import UncertaintyMetrics
from declab.core.sampling import LN2, draw_from, entropy_bits, warp

PUNCTUATION = (".", ",", "\n", "?", "!", ":", ";", ")", "]", "}")
EPS = 1e-10                     # inside the log of the reference's entropy


# ------------------------------------------------------------------------------------------------ shared pieces
def gate_entropy_nats(probs: torch.Tensor) -> torch.Tensor:
    """The reference's entropy in nats: -sum p ln(p + 1e-10). probs: [..., V] -> [...]."""
    return -(probs * torch.log(probs + EPS)).sum(-1)


def first_ids(lm, texts=PUNCTUATION) -> frozenset[int]:
    """The first token id of each text encoded on its own (the reference's `tokenizer.encode(t)[0]`); texts the
    tokenizer cannot encode are skipped."""
    ids = set()
    for t in texts:
        enc = lm.encode_prompt(t, "raw")
        if enc:
            ids.add(int(enc[0]))
    return frozenset(ids)


@dataclass
class Counter:
    """Forwards after the prefill and the token positions they computed (UncertaintyMetrics)."""

    forwards: int = 0
    tokens: int = 0

    def step(self, lm, ids, cache):
        rows = ids if isinstance(ids, list) else ids.tolist()
        self.forwards += 1
        self.tokens += sum(len(r) for r in rows)
        return lm.step(ids, cache)


class Branches:
    """Unique branch ids for the alternatives drawn as branches of the token tree (0 is the emitted sequence)."""

    def __init__(self):
        self.last = 0

    def new(self) -> int:
        self.last += 1
        return self.last


def branch_rows(ctx: RunContext, branch: int, step0: int, tokens: list[int], logits: list[torch.Tensor],
                scores: list[float], **cols) -> None:
    """`token` rows (accepted=False) of an alternative that was not emitted: tokens[j] at step step0 + j on its own
    branch, the first hanging from branch 0, the rest from the branch itself. logits: the model's raw logits [V]
    each token was drawn from (for the base logprob / entropy columns, one host copy); scores: the trace's score."""
    if not tokens:
        return
    logp = torch.log_softmax(torch.stack(logits), -1)                                # [n, V]
    ids = torch.as_tensor(tokens, device=logp.device)                                # [n]
    host = torch.cat([entropy_bits(logp), logp.gather(1, ids[:, None])[:, 0]]).double().tolist()
    n = len(tokens)
    P = len(ctx.prompt_ids)
    for j, tok in enumerate(tokens):
        ctx.trace.add("token", step0 + j, branch_id=branch, parent_id=0 if j == 0 else branch,
                      position=P + step0 + j, token_id=tok, token_text=ctx.lm.token_text(tok), logprob=host[n + j],
                      entropy=host[j], score=scores[j], accepted=False, **cols)


def finish_row(ctx: RunContext, last_step: int, score: float) -> None:
    """Branch 0 is the chosen sequence (viz.common.chosen_leaf follows the finish row with final_rank 0)."""
    ctx.trace.add("finish", last_step, branch_id=0, parent_id=0, score=score, final_rank=0, accepted=True)


# ------------------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class CautiousConfig(Config):
    max_trials: int = param(10, lo=1, hi=32, help="N_max: trials at the highest entropy (published 10; 1 = plain "
                                                  "sampling). N rows share one batched forward.")
    entropy_threshold_low: float = param(0.01, lo=0.0, hi=100.0, help="H_low (nats): at or below it one trial, i.e. "
                                                                     "an ordinary step (published 0.01).")
    entropy_threshold_high: float = param(1.5, lo=0.0, lo_open=True,
                                          help="H_high (nats): at or above it N_max trials (published 1.5; inf = "
                                               "never intervene). Must exceed H_low.")
    max_trial_tokens: int = param(32, lo=1, hi=512, help="Cap on one trial's length (the reference has none).")
    temperature: float = param(0.8, lo=0.0, hi=100.0, help="Temperature of every draw (published 0.8); 0 = the "
                                                           "reference's greedy mode (argmax steps, trials from the "
                                                           "unwarped softmax).")
    top_k: int = param(50, lo=0, hi=1_000_000, help="Top-k after temperature (transformers' default 50; 0 = off).")
    top_p: float = param(0.95, lo=0.0, hi=1.0, lo_open=True, help="Top-p after top-k (published 0.95).")

    def check(self) -> None:
        if not self.entropy_threshold_high > self.entropy_threshold_low:
            raise UserError(f"cautious: entropy_threshold_high must be greater than entropy_threshold_low "
                            f"({self.entropy_threshold_low}), got {self.entropy_threshold_high}")

    def trials(self, h_nats: float) -> int:
        """N for an entropy H (nats), the reference's determine_trial_number."""
        if self.max_trials == 1 or math.isinf(self.entropy_threshold_high):
            return 1
        frac = min(max((h_nats - self.entropy_threshold_low)
                       / (self.entropy_threshold_high - self.entropy_threshold_low), 0.0), 1.0)
        return int(1 + (self.max_trials - 1) * frac)

    def trigger_nats(self) -> float:
        """The entropy from which N > 1 (inf when it never is)."""
        if self.max_trials == 1 or math.isinf(self.entropy_threshold_high):
            return math.inf
        return self.entropy_threshold_low + (self.entropy_threshold_high - self.entropy_threshold_low) / (
            self.max_trials - 1)

    def processed(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution the rule and the draws read, as logits [..., V]."""
        return logits if self.temperature == 0 else warp(logits, self.temperature, self.top_k, self.top_p)


# ------------------------------------------------------------------------------------------------ trials
@dataclass
class Trial:
    index: int
    tokens: list[int] = field(default_factory=list)
    logp: list[float] = field(default_factory=list)        # ln p of each token under its processed distribution
    logits: list[torch.Tensor] = field(default_factory=list)   # [V] raw logits each token was drawn from
    done: bool = False
    fed: int = 0                                           # tokens of the trial in the cache row
    next_logits: torch.Tensor | None = None                # [V] after the last token, once it was fed

    @property
    def ppl(self) -> float:
        return math.exp(-sum(self.logp) / len(self.logp))


def run_trials(ctx: RunContext, cfg: CautiousConfig, cache, logits: torch.Tensor, probs: torch.Tensor, n: int,
               budget: int, stops: frozenset[int], counter: Counter) -> tuple[list[Trial], int, object]:
    """N trials from the cache (the current state, one row) whose next-token raw logits are `logits` [V] and
    processed probabilities `probs` [V]. Returns the trials, the kept one's index, and the cache cut to the kept
    trial (one row: the prefix plus its first `fed` tokens)."""
    lm, gen = ctx.lm, ctx.generator
    cap = min(cfg.max_trial_tokens, budget)
    base = cache.get_seq_length()
    trials = [Trial(k) for k in range(n)]
    best: tuple[float, int] | None = None

    def add(t: Trial, tok: int, row_logits: torch.Tensor, lp: float) -> None:
        nonlocal best
        t.tokens.append(tok)
        t.logp.append(lp)
        t.logits.append(row_logits)
        if tok in stops or len(t.tokens) >= cap:
            t.done = True
            if best is None or (t.ppl, t.index) < best:
                best = (t.ppl, t.index)

    first = [draw_from(probs, gen) for _ in trials]                       # the current logits serve every trial
    first_lp = torch.log(probs[torch.as_tensor(first, device=probs.device)]).tolist()
    for t, tok, lp in zip(trials, first, first_lp):
        add(t, tok, logits, lp)
    lm.fork(cache, n)
    row_of = list(range(n))                                               # cache row -> trial index
    while not ctx.stop.is_set():
        keep = [r for r, k in enumerate(row_of) if not trials[k].done or (best is not None and k == best[1])]
        if not any(not trials[k].done for k in row_of):
            break
        if len(keep) < len(row_of):
            lm.select(cache, keep)
            row_of = [row_of[r] for r in keep]
        out = counter.step(lm, [[trials[k].tokens[-1]] for k in row_of], cache)   # logits [R, V]
        proc = torch.softmax(cfg.processed(out.logits), -1)                      # [R, V]
        for r, k in enumerate(row_of):
            t = trials[k]
            if t.done:                                    # the best finished trial: its last token, once, else junk
                if t.fed == len(t.tokens) - 1:
                    t.fed, t.next_logits = len(t.tokens), out.logits[r]
                continue
            t.fed = len(t.tokens)
            tok = draw_from(proc[r], gen)
            add(t, tok, out.logits[r], math.log(float(proc[r, tok])))
    for t in trials:                                      # stopped mid-trial: the unfinished ones count as they are
        if not t.done:
            t.done = True
            if best is None or (t.ppl, t.index) < best:
                best = (t.ppl, t.index)
    kept = best[1]
    if len(row_of) > 1 or row_of[0] != kept:
        lm.select(cache, [row_of.index(kept)])
    lm.crop(cache, base + trials[kept].fed)
    return trials, kept, cache


# ------------------------------------------------------------------------------------------------ strategy
@register
class Cautious(Strategy):
    name = "cautious"
    title = "Cautious next-token prediction (CNTP)"
    paper = "Wang et al. 2025, Cautious Next Token Prediction (Findings of ACL 2025, arXiv 2507.03038)"
    explanation = ("Most steps are ordinary sampling. When the model is unsure (high entropy), it is cautious: it "
                   "samples several independent continuations up to the next punctuation mark and keeps the one "
                   "it is most confident in (the lowest perplexity), the way a person re-checks a step they are "
                   "unsure of. The more uncertain the step, the more trials; the rejected trials show as branches "
                   "of the token tree.")
    Config = CautiousConfig
    deterministic = False

    def run(self, ctx: RunContext, cfg: CautiousConfig) -> RunGen:
        lm = ctx.lm
        stops = first_ids(lm) | set(lm.eos_ids)
        branches, counter = Branches(), Counter()
        metrics = ctx.metrics = UncertaintyMetrics(decisions=0, interventions=0, trial_tokens=0)
        trials_total = 0
        threshold_bits = cfg.trigger_nats() / LN2
        out = lm.prefill(ctx.prompt_ids)
        cache, logits, fwd_ms = out.cache, out.logits[0], out.fwd_ms          # logits [V]
        generated: list[int] = []
        total = 0.0
        step = 0
        finished = False
        while step < ctx.max_new_tokens and not ctx.stop.is_set():
            t0 = lm.clock_ms()
            proc_logits = cfg.processed(logits)                              # [V]
            probs = torch.softmax(proc_logits, -1)                           # [V]
            h = float(gate_entropy_nats(probs))
            n = cfg.trials(h)
            metrics.decisions += 1
            gate = {"gate_entropy": h / LN2, "gate_threshold": threshold_bits, "num_trials": n}
            if n == 1:
                token = int(logits.argmax()) if cfg.temperature == 0 else draw_from(probs, ctx.generator)
                score = float(torch.log_softmax(proc_logits, -1)[token])
                sel_ms = lm.clock_ms() - t0
                row = record_token(ctx, step, token, torch.log_softmax(logits, -1), score,
                                   dict(gate, intervened=False, trial=-1, fwd_ms=fwd_ms, sel_ms=sel_ms),
                                   dt_ms=fwd_ms + sel_ms)
                emitted, next_logits, loglik = [token], None, [row["logprob"]]
            else:
                metrics.interventions += 1
                trials_total += n
                f0, fwd0 = counter.forwards, lm.clock_ms()
                trials, kept, cache = run_trials(ctx, cfg, cache, logits, probs, n,
                                                 ctx.max_new_tokens - step, stops, counter)
                trial_ms = lm.clock_ms() - fwd0
                metrics.trial_tokens += sum(len(t.tokens) for t in trials)
                win = trials[kept]
                emitted, next_logits, loglik = win.tokens, win.next_logits, []
                for j, (tok, row) in enumerate(zip(win.tokens, win.logits)):
                    extra = dict(trial=kept, trial_ppl=win.ppl, chosen=True, intervened=j == 0)
                    if j == 0:
                        extra.update(gate, fwd_ms=fwd_ms, trial_ms=trial_ms, trial_forwards=counter.forwards - f0)
                    loglik.append(record_token(ctx, step + j, tok, torch.log_softmax(row, -1), win.logp[j], extra,
                                               candidates=[] if j == 0 else None,
                                               dt_ms=fwd_ms + trial_ms if j == 0 else 0.0)["logprob"])
                ids = {}
                for t in trials:
                    if t.index != kept:
                        ids[t.index] = branches.new()
                        branch_rows(ctx, ids[t.index], step, t.tokens, t.logits, t.logp, trial=t.index,
                                    trial_ppl=t.ppl, chosen=False)
                for t in trials:
                    ctx.trace.add("trial", step, branch_id=ids.get(t.index, 0), parent_id=0,
                                  position=len(ctx.prompt_ids) + step, token_id=t.tokens[0],
                                  token_text=lm.decode(t.tokens), score=-math.log(t.ppl), accepted=t.index == kept,
                                  trial=t.index, trial_len=len(t.tokens), trial_ppl=t.ppl, chosen=t.index == kept,
                                  num_trials=n)
            for tok, lp in zip(emitted, loglik):
                total += lp
                if tok in lm.eos_ids:
                    finished = True
                    break
                generated.append(tok)
            step += len(emitted)
            self._update(metrics, counter, trials_total, step)
            yield Progress(step - 1, generated)
            if finished or step >= ctx.max_new_tokens:
                break
            if next_logits is None:
                out = counter.step(lm, [[emitted[-1]]], cache)
                cache, logits, fwd_ms = out.cache, out.logits[0], out.fwd_ms
            else:
                logits, fwd_ms = next_logits, 0.0
        if step:
            finish_row(ctx, step - 1, total)
        return [Sequence(token_ids=list(generated), score=total)]

    @staticmethod
    def _update(m: UncertaintyMetrics, counter: Counter, trials_total: int, emitted: int) -> None:
        m.intervention_rate = m.interventions / m.decisions if m.decisions else 0.0
        m.mean_trials = trials_total / m.interventions if m.interventions else 0.0
        m.forwards, m.forward_tokens = counter.forwards, counter.tokens
        m.forward_tokens_per_token = counter.tokens / emitted if emitted else 0.0
        m.extra_forwards_per_token = (counter.forwards - emitted) / emitted if emitted else 0.0
