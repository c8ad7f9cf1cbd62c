"""Entropy Adaptive Decoding (EAD): decode with a small model, hand over to the large one while the text is hard.

Paper: Toby Simonds, "Entropy Adaptive Decoding: Dynamic Model Switching for Efficient Inference" (arXiv 2502.06833,
2025). No reference code; spec: docs/strategies.md#ead.

Rule (docs/strategies.md#ead). H_t = entropy in bits of the *active* model's next-token distribution, before temperature
(and before top-k / top-p). H̄_t = mean of the last `window` values of H_t. With c = tokens produced by the active
model since the last switch:
    M_{t+1} = L  if H̄_t > threshold and c >= min_dwell
    M_{t+1} = S  if H̄_t <= threshold and c >= min_dwell
    otherwise M_{t+1} = M_t
Convention A (cheap, the default of docs/strategies.md#ead): the decision made after token t applies from token t+1; the
token that pushed H̄ over the threshold stays. The first token's model is decided the same way from the small
model's entropy at the end of the prompt (one small-model value, no dwell), so a threshold above every entropy
gives exactly the small model's output and a threshold below zero exactly the large model's (with temperature 0:
their greedy outputs, token for token, which property test 6.4 (a) checks).

Caches (6.2): each model keeps its own KV cache and the ids in it (`strategies.two_model.ModelState`); when a model
becomes active again it first runs once over every token appended since it last ran (a catch-up prefill, one
forward) before producing its token. Caches are never mixed. The catch-up tokens are recorded (`catch_up` on the
token row, `catch_up_tokens` in the metrics) although the paper's cost model ignores them.

Paper symbol -> config field: w (5 in the paper) -> window; tau -> threshold (bits); d_min -> min_dwell; the small
model S -> small ('model' = the second model beside the model: for the embedded default, its distilled draft
`smollm2-135m-draft`; or a models.yaml key); the large model L is the run's model. temperature / top_k / top_p are
the sampling warpers applied to whichever model is active (temperature 0 = greedy).

Loop: its own, not the engine's per-token loop (declab/core/loop.py): which model produces a step's logits changes
with the entropy rule, and the model taking over first catches up on the tokens it missed (one forward over several
tokens); the shared loop drives one model's cache one token at a time.

Trace: one `token` row per token, `model` = the model that produced it, `entropy` = H_t (bits), `rolling_entropy` =
H̄_t after this token, `dwell` = c including this token, `role` small | large, `catch_up` (tokens the model caught up
on before this token), `fwd_ms`. A `switch` row at the step where the new model takes over, with `model` = the new
model, `from_model`, `entropy` = the H̄ that triggered it, `decided_at` (the step after which it was decided).

Metrics: large_fraction f_L (share of tokens by L), switches, catch_up_tokens, compute_ratio C/C_L = f_L + (1 - f_L)
P_S / P_L with P = parameter count (docs/strategies.md#ead: only the active model charged, catch-up ignored),
compute_saved = 1 - C/C_L, and the measured small / large forward-time ratio of this run.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from declab.core.sampling import entropy_bits, kept_count, sample_or_argmax
from declab.core import Config, ModelNeed, Needs, Progress, RunContext, RunGen, Sequence, Strategy, param, register
from declab.core.metrics import SwitchingMetrics
from strategies.two_model import ModelState, model_params, named_model

ROLES = ("small", "large")


@dataclass(frozen=True)
class EADConfig(Config):
    small: str = param("model", help="The small model S: 'model' (the second model beside the model, e.g. the "
                                     "embedded default's distilled draft) or a models.yaml key.")
    window: int = param(5, lo=1, hi=1000, help="w: tokens in the rolling mean of the entropy (paper: 5).")
    threshold: float = param(2.0, lo=-1000.0, hi=1000.0,
                             help="tau (bits): the large model takes over while the rolling entropy is above it.")
    min_dwell: int = param(3, lo=1, hi=1000, help="d_min: tokens a model produces before another switch may happen.")
    temperature: float = param(0.0, lo=0.0, hi=100.0, help="0 = greedy; >0 = sample at this temperature "
                                                           "(entropy is measured before it).")
    top_k: int = param(0, lo=0, hi=1_000_000, help="Top-k warper when sampling (0 = off).")
    top_p: float = param(1.0, lo=0.0, hi=1.0, lo_open=True, help="Top-p warper when sampling (1 = off).")


@register
class EAD(Strategy):
    name = "ead"
    title = "Entropy Adaptive Decoding (small/large model switching)"
    paper = "Simonds 2025, Entropy Adaptive Decoding: Dynamic Model Switching for Efficient Inference (arXiv 2502.06833)"
    explanation = ("Most tokens are easy: a small model predicts them as well as a large one. EAD lets the small model "
                   "write while its recent uncertainty (rolling entropy) is low and hands over to the large model "
                   "while it is high, with a minimum stay on each model so it does not flap. Each model keeps its own "
                   "memory (KV cache) and catches up on the tokens it missed when it takes over.")
    Config = EADConfig
    deterministic = False
    roles = ("small",)

    def needs(self, cfg: EADConfig) -> Needs:
        """The small model: a key named in `small`, else the paired second model."""
        return Needs(models=(ModelNeed("small", named_model(cfg.small) or ""),))

    def run(self, ctx: RunContext, cfg: EADConfig) -> RunGen:
        lm, trace = ctx.lm, ctx.trace
        small_lm = ctx.model("small")
        states = {"small": ModelState(small_lm, "small"), "large": ModelState(lm, "large")}
        seq = list(ctx.prompt_ids)
        P = len(seq)
        generated: list[int] = []
        window: deque[float] = deque(maxlen=cfg.window)
        counts = {"small": 0, "large": 0}
        fwd = {"small": [0.0, 0], "large": [0.0, 0]}                    # decode-step ms, steps (catch-ups apart)
        switches = catch_up_total = 0
        total_logprob = 0.0

        # the first token's model: the small model's entropy at the end of the prompt against the threshold
        out, _ = states["small"].advance(seq)
        h0 = float(entropy_bits(out.logits[0].log_softmax(-1)))
        active = self.decide(cfg, h0, None, 0, -1)
        pending = out if active == "small" else None                      # reuse the probe's logits
        dwell = 0
        for step in range(ctx.max_new_tokens):
            state = states[active]
            catch_up = 0
            if pending is not None:
                out, pending = pending, None
            else:
                out, _fed = state.advance(seq)
                # generated tokens fed besides the latest one (the prompt prefill of a first run is not catch-up)
                catch_up = max(0, len(seq) - max(state.last_keep, P) - 1)
            catch_up_total += catch_up
            if catch_up == 0:
                fwd[active][0] += out.fwd_ms
                fwd[active][1] += 1
            t0 = lm.clock_ms()
            logits = out.logits[0]                                       # [V]
            logp = logits.log_softmax(-1)
            h = float(entropy_bits(logp))
            token, warped = sample_or_argmax(logits, ctx.generator, cfg.temperature, cfg.top_k, cfg.top_p)
            score, kept = torch.stack([warped.log_softmax(-1)[token],
                                       kept_count(warped, cfg.temperature).float()]).tolist()   # one host copy
            window.append(h)
            rolling = sum(window) / len(window)
            dwell += 1
            counts[active] += 1
            trace.add("token", step, branch_id=0, parent_id=0, position=P + step, token_id=token,
                      token_text=lm.token_text(token), logprob=float(logp[token]), entropy=h, score=score,
                      model=state.lm.key, accepted=True, dt_ms=out.fwd_ms + lm.clock_ms() - t0, role=active,
                      rolling_entropy=rolling, dwell=dwell, catch_up=catch_up, fwd_ms=out.fwd_ms, kept=int(kept))
            total_logprob += float(logp[token])
            if token in lm.eos_ids:
                break
            generated.append(token)
            seq.append(token)
            # convention A: decide after token `step`, apply from token step + 1
            want = self.decide(cfg, rolling, active, dwell, step)
            if want != active and dwell >= cfg.min_dwell and step + 1 < ctx.max_new_tokens:
                trace.add("switch", step + 1, branch_id=0, parent_id=0, position=P + step + 1,
                          model=states[want].lm.key, from_model=state.lm.key, entropy=rolling, role=want,
                          decided_at=step, dwell=dwell, accepted=None)
                active, dwell = want, 0
                switches += 1
            ctx.metrics = self.metrics(counts, switches, catch_up_total, fwd, small_lm, lm)
            yield Progress(step, generated)
        ctx.metrics = self.metrics(counts, switches, catch_up_total, fwd, small_lm, lm)
        return [Sequence(token_ids=list(generated), score=total_logprob)]

    @staticmethod
    def decide(cfg: EADConfig, rolling: float, active: str | None, dwell: int, step: int) -> str:
        """The model wanted after token `step` (step -1: before the first token, from the small model's prompt
        entropy). The dwell rule is applied by the caller."""
        return "large" if rolling > cfg.threshold else "small"

    @staticmethod
    def metrics(counts: dict, switches: int, catch_up: int, fwd: dict, small_lm, large_lm) -> SwitchingMetrics:
        n = counts["small"] + counts["large"]
        f_l = counts["large"] / n if n else 0.0
        out = SwitchingMetrics(large_fraction=round(f_l, 6), large_tokens=counts["large"],
                               small_tokens=counts["small"], switches=switches, catch_up_tokens=catch_up)
        p_s, p_l = model_params(small_lm), model_params(large_lm)
        if p_s and p_l:
            ratio = f_l + (1 - f_l) * p_s / p_l
            out.param_ratio, out.compute_ratio, out.compute_saved = (round(p_s / p_l, 6), round(ratio, 6),
                                                                     round(1 - ratio, 6))
        if fwd["small"][1] and fwd["large"][1]:
            out.measured_step_ratio = round((fwd["small"][0] / fwd["small"][1]) /
                                            max(fwd["large"][0] / fwd["large"][1], 1e-9), 4)
        return out
