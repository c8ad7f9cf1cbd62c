"""llama.cpp's sampler chain: logit bias, then the samplers in the order `samplers` gives, then one draw.

Reference: llama.cpp common/sampling.cpp `common_sampler_init` (ggml-org/llama.cpp@00efb3e) and the samplers of
src/llama-sampling.cpp (@0344068), one class each in strategies/llama_samplers.py with its formula and its
differences from transformers. Spec: docs/strategies.md#sampler_chain.

Each step, through the per-token loop:
    candidates = every token with its logit (+ `logit_bias`)            llama_sampler_logit_bias
    for name in samplers:  candidates = sampler(candidates)             each works on the survivors of the previous
    token ~ softmax(candidates)  (the run's seeded generator)           llama_sampler_dist
`samplers` is llama.cpp's `--samplers` text (`;`-separated names, alt names such as `top-k`, `temp`, `typical`
accepted), default llama.cpp's order penalties;dry;top_n_sigma;top_k;typ_p;top_p;min_p;xtc;temperature. Parameters
and defaults are llama.cpp's (common/common.h `common_params_sampling`): temperature 0.8, top_k 40, top_p 0.95,
min_p 0.05, typical_p 1, top_n_sigma -1, min_keep 0, XTC 0 / 0.1, dynatemp 0 / 1, penalty_last_n 64, repeat 1,
frequency 0, presence 0, DRY 0 / 1.75 / 2 / -1 with breakers "\\n" ":" "\\"" "*". temperature <= 0 keeps only the
largest logit (llama.cpp's greedy, through temp-ext). The penalty and DRY windows include the prompt (llama.cpp's
callers feed the prompt tokens to `accept`); -1 means the whole context.

Trace. Per step, before the `token` row, one `stage` row per sampler in the chain (logit_bias first when set):
`stage` (its name), `stage_pos` (0-based position in the chain), `n_kept` (candidates with nonzero probability
after it), `mass_kept` (their probability under the model's own distribution, softmax of the raw logits before
any bias or penalty), and the stage's state where it has one (`n_penalised`, `sigma`, `entropy_nats`,
`xtc_fired`, `t_dyn`, `h_norm`). The `token` row has `kept` (= the last stage's `n_kept`), `kept_mass`, `n_stages`,
`score` = ln p of the token in the final distribution it was drawn from, `logprob` the model's ln p. The
`candidate` rows are the model's most likely max(num_alternatives, 10) tokens with `rank`, `removed_by` (the stage
that removed it; empty when it survived the chain), `removed_at` (that stage's position), `p_stage` (its
probability among that stage's input candidates) and `p_final`. All of a step's stage counts, masses, states and
candidate fates are stacked on the device and copied to the host once per step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from declab.core import Config, RunContext, RunGen, Strategy, UserError, param, register
from declab.core.loop import Choice, Selector, token_loop
from strategies.llama_samplers import (DEFAULT_BREAKERS, DEFAULT_ORDER, Cands, Dry, LogitBias, MinP, Penalties,
                                       Sampler, Temperature, TopK, TopNSigma, TopP, Typical, Xtc, draw, dry_breakers,
                                       parse_breakers, parse_logit_bias, parse_samplers)

TRACKED = 10          # candidate rows per step at least: the model's most likely tokens, each with its fate
SAMPLERS_LEGAL = "';'-separated, each at most once, from: " + ", ".join(DEFAULT_ORDER)


@dataclass(frozen=True)
class SamplerChainConfig(Config):
    samplers: str = param(";".join(DEFAULT_ORDER), legal=SAMPLERS_LEGAL,
                          help="llama.cpp's --samplers: the chain's order (alt names top-k, top-p, nucleus, typical, "
                               "typ, min-p, temp, top-n-sigma accepted). Empty: just the draw.")
    temperature: float = param(0.8, lo=0.0, hi=100.0, help="Divide logits by this (<= 0: keep only the largest "
                                                           "logit, llama.cpp's greedy). llama.cpp default 0.8.")
    top_k: int = param(40, lo=0, hi=1_000_000, help="Keep the k largest logits (0 = off). llama.cpp default 40.")
    top_p: float = param(0.95, lo=0.0, hi=1.0, help="Nucleus: the first tokens (by p) whose cumulative p >= top_p, "
                                                    "at least min_keep (1 = off).")
    min_p: float = param(0.05, lo=0.0, hi=1.0, help="Keep p >= min_p * p_max over the current candidates (0 = off).")
    typical_p: float = param(1.0, lo=0.0, hi=1.0, lo_open=True,
                             help="Locally typical: smallest set by |-ln p - H| with cumulative p > typical_p "
                                  "(1 = off).")
    top_n_sigma: float = param(-1.0, lo=-1.0, hi=100.0, help="Keep logits >= max - n*sigma (<= 0 = off; llama.cpp "
                                                            "default -1).")
    min_keep: int = param(0, lo=0, hi=100_000, help="top_p / min_p / typical / xtc keep at least this many "
                                                    "(llama.cpp --min-keep, default 0).")
    xtc_probability: float = param(0.0, lo=0.0, hi=1.0, help="XTC: chance per step of removing the top choices "
                                                            "(0 = off).")
    xtc_threshold: float = param(0.1, lo=0.0, hi=0.5, help="XTC: tokens with p >= this are 'top choices'; all but "
                                                          "the least likely of them go.")
    dynatemp_range: float = param(0.0, lo=0.0, hi=100.0, help="Dynamic temperature: T ranges over [T - r, T + r] "
                                                             "by normalised entropy (0 = off).")
    dynatemp_exponent: float = param(1.0, lo=0.0, hi=100.0, lo_open=True,
                                     help="Dynamic temperature: exponent on the normalised entropy.")
    repeat_penalty: float = param(1.0, lo=0.0, hi=100.0, lo_open=True,
                                  help="Divide positive / multiply negative logits of tokens seen in the window "
                                       "(1 = off).")
    frequency_penalty: float = param(0.0, lo=-100.0, hi=100.0, help="Subtract count * this from seen tokens' "
                                                                   "logits (0 = off).")
    presence_penalty: float = param(0.0, lo=-100.0, hi=100.0, help="Subtract this from seen tokens' logits "
                                                                  "(0 = off).")
    penalty_last_n: int = param(64, lo=-1, hi=1_000_000, help="Penalty window: last n tokens, prompt included "
                                                             "(0 = off, -1 = all).")
    dry_multiplier: float = param(0.0, lo=0.0, hi=100.0, help="DRY: penalty multiplier (0 = off).")
    dry_base: float = param(1.75, lo=1.0, hi=100.0, help="DRY: penalty base, raised to (repeat length - allowed).")
    dry_allowed_length: int = param(2, lo=1, hi=100_000, help="DRY: repeats up to this long are not penalised.")
    dry_penalty_last_n: int = param(-1, lo=-1, hi=1_000_000, help="DRY: tokens scanned, prompt included "
                                                                 "(0 = off, -1 = all).")
    dry_sequence_breakers: str = param(json.dumps(list(DEFAULT_BREAKERS)), legal="a JSON list of strings, or none",
                                       help="DRY: strings that end a repeat (llama.cpp default \\n : \" *); each cut "
                                            "to 40 characters.")
    logit_bias: str = param("", legal="TOKEN_ID+BIAS or TOKEN_ID-BIAS (BIAS a number or inf), comma-separated",
                            help="Added to the logits before the chain, llama.cpp's --logit-bias; -inf bans a token.")

    def check(self) -> None:
        parse_samplers(self.samplers)
        parse_logit_bias(self.logit_bias)
        parse_breakers(self.dry_sequence_breakers)


_BREAKER_CACHE: dict[tuple, dict] = {}       # (model key, V, breakers) -> processed breakers (vocabulary scan, once)


def processed_breakers(lm, breakers: tuple[str, ...]) -> dict:
    """llama_sampler_init_dry's breaker processing over the model's vocabulary, cached per model and breakers."""
    key = (getattr(lm, "key", id(lm)), lm.vocab_size, breakers)
    if key not in _BREAKER_CACHE:
        tok = lm.tokenizer
        n = min(lm.vocab_size, len(tok) if hasattr(tok, "__len__") else lm.vocab_size)
        if hasattr(tok, "batch_decode"):
            texts = tok.batch_decode([[i] for i in range(n)], skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)
        else:
            texts = [lm.token_text(i) for i in range(n)]
        _BREAKER_CACHE[key] = dry_breakers(texts, tok, breakers) if breakers else {}
    return _BREAKER_CACHE[key]


def build_chain(cfg: SamplerChainConfig, lm, generator: torch.Generator) -> list[Sampler]:
    """The samplers of one run, in chain order (logit_bias first when set), as common_sampler_init builds them."""
    V, device = lm.vocab_size, lm.device
    pairs = parse_logit_bias(cfg.logit_bias)
    bad = [t for t, _ in pairs if t >= V]
    if bad:
        raise UserError(f"sampler_chain: logit_bias: token id {bad[0]} is outside the vocabulary [0, {V - 1}]")
    chain: list[Sampler] = [LogitBias(pairs, V, device)] if pairs else []
    for name in parse_samplers(cfg.samplers):
        if name == "penalties":
            chain.append(Penalties(cfg.penalty_last_n, cfg.repeat_penalty, cfg.frequency_penalty,
                                   cfg.presence_penalty, V, device))
        elif name == "dry":
            enabled = cfg.dry_multiplier != 0.0 and cfg.dry_penalty_last_n != 0
            breakers = processed_breakers(lm, parse_breakers(cfg.dry_sequence_breakers)) if enabled else {}
            chain.append(Dry(cfg.dry_multiplier, cfg.dry_base, cfg.dry_allowed_length, cfg.dry_penalty_last_n,
                             breakers, V, device))
        elif name == "top_n_sigma":
            chain.append(TopNSigma(cfg.top_n_sigma))
        elif name == "top_k":
            chain.append(TopK(cfg.top_k))
        elif name == "typ_p":
            chain.append(Typical(cfg.typical_p, cfg.min_keep))
        elif name == "top_p":
            chain.append(TopP(cfg.top_p, cfg.min_keep))
        elif name == "min_p":
            chain.append(MinP(cfg.min_p, cfg.min_keep))
        elif name == "xtc":
            chain.append(Xtc(cfg.xtc_probability, cfg.xtc_threshold, cfg.min_keep, generator))
        elif name == "temperature":
            chain.append(Temperature(cfg.temperature, cfg.dynatemp_range, cfg.dynatemp_exponent))
    return chain


def track(c: Cands, values: torch.Tensor, tracked: torch.Tensor, fill) -> torch.Tensor:
    """values [n] of the candidate list at the tracked token ids [N] (fill where a token is not in the list): an
    index on the full vocabulary in id order, else an id match ([N, n]; n is k after top_k)."""
    if c.identity:
        return values[tracked]
    match = c.ids.unsqueeze(0) == tracked.unsqueeze(1)                               # [N, n]
    if values.dtype == torch.bool:
        return (match & values.unsqueeze(0)).any(1)
    return torch.where(match, values.unsqueeze(0), fill).amax(1)


class Chain(Selector):
    """One run's sampler chain as a selector (docs/strategies.md#sampler_chain): the samplers' state (penalty and
    DRY windows) is per run; `accept` feeds every sampler the emitted token, as llama_sampler_chain_accept."""

    name = "sampler_chain"

    def __init__(self, cfg: SamplerChainConfig, ctx: RunContext):
        self.ctx = ctx
        self.samplers = build_chain(cfg, ctx.lm, ctx.generator)
        self.generator = ctx.generator
        self.n_tracked = min(max(ctx.num_alternatives, TRACKED), ctx.lm.vocab_size)
        self._full = None                     # (arange(V), ones(V)): the full list's ids and flags, made once

    def reset(self) -> None:
        for s in self.samplers:
            s.reset(self.ctx.prompt_ids)

    def accept(self, token: int) -> None:
        for s in self.samplers:
            s.accept(token)

    def apply(self, logits: torch.Tensor, step: int) -> Choice:
        logits = logits.float()                                                      # [V]
        logp0 = torch.log_softmax(logits, -1)                                        # [V] the model's distribution
        V = logits.shape[0]
        if self._full is None or self._full[0].shape[0] != V:
            self._full = (torch.arange(V, device=logits.device), torch.ones(V, dtype=torch.bool, device=logits.device))
        c = Cands(self._full[0], logits, self._full[1], logp0.exp(), True, True)     # the whole vocabulary
        tracked = torch.topk(logp0, self.n_tracked).indices                          # [N]
        alive = c.alive()                                                            # [V]
        count, mass, alive_tr = alive.sum().float(), logits.new_tensor(1.0), alive[tracked]
        counts, masses, alive_t, p_in_t, stats = [], [], [], [], []
        no_p = torch.zeros(self.n_tracked, device=logits.device)
        for i, s in enumerate(self.samplers):
            c_in = c
            c, st = s.apply(c_in)
            stats += [(i, k, v) for k, v in st.items()]
            if c is not c_in:                                                        # a no-op changes nothing
                alive = c.alive()                                                    # [n]
                count, mass = alive.sum().float(), (c.p0 * alive).sum()
                alive_tr = track(c, alive, tracked, False)                           # [N]
                if c_in.logits is logits:                                            # the model's own row
                    p_in = c_in.p0[tracked]
                else:
                    l_in = c_in.masked()                                             # [n_in]
                    p_in = (track(c_in, l_in, tracked, float("-inf")) - torch.logsumexp(l_in, 0)).exp()  # [N]
            else:
                p_in = no_p
            counts.append(count)
            masses.append(mass)
            alive_t.append(alive_tr)
            p_in_t.append(p_in)
        pos, score = draw(c, self.generator)
        token = c.ids[pos]
        final_alive = c.alive()
        S = len(self.samplers)
        parts = [token.double().reshape(1), score.double().reshape(1),
                 final_alive.sum().double().reshape(1), (c.p0 * final_alive).sum().double().reshape(1),
                 tracked.double(), logp0[tracked].double(), track(c, c.probs(), tracked, 0.0).double()]
        if S:
            parts += [torch.stack(counts).double(), torch.stack(masses).double(),
                      torch.stack(alive_t).double().flatten(), torch.stack(p_in_t).double().flatten()]
        parts += [v.double().reshape(1) for _, _, v in stats]
        host = torch.cat([x.to(logits.device) for x in parts]).tolist()          # the step's one host copy
        return self._rows(step, host, stats)

    def _rows(self, step: int, host: list[float], stats) -> Choice:
        N, S = self.n_tracked, len(self.samplers)
        token, score, kept, kept_mass = int(host[0]), host[1], int(host[2]), host[3]
        at = 4
        ids = [int(x) for x in host[at:at + N]]
        logp, p_final = host[at + N:at + 2 * N], host[at + 2 * N:at + 3 * N]
        at += 3 * N
        counts, masses = host[at:at + S], host[at + S:at + 2 * S]
        at += 2 * S
        alive = [host[at + i * N:at + (i + 1) * N] for i in range(S)]
        at += S * N
        p_in = [host[at + i * N:at + (i + 1) * N] for i in range(S)]
        at += S * N
        extra: dict[int, dict] = {}
        for (i, k, _), v in zip(stats, host[at:]):
            extra.setdefault(i, {})[k] = bool(v) if k == "xtc_fired" else v
        position = len(self.ctx.prompt_ids) + step
        for i, s in enumerate(self.samplers):
            self.ctx.trace.add("stage", step, branch_id=0, parent_id=0, position=position, stage=s.name,
                               stage_pos=i, n_kept=int(counts[i]), mass_kept=masses[i], **extra.get(i, {}))
        candidates = []
        for j in range(N):
            gone = next((i for i in range(S) if not alive[i][j]), None)
            candidates.append({"token_id": ids[j], "logprob": logp[j], "rank": j,
                               "removed_by": self.samplers[gone].name if gone is not None else None,
                               "removed_at": gone, "p_stage": p_in[gone][j] if gone is not None else None,
                               "p_final": p_final[j]})
        return Choice(token, score, {"kept": kept, "kept_mass": kept_mass, "n_stages": S}, candidates=candidates)


@register
class SamplerChainStrategy(Strategy):
    name = "sampler_chain"
    title = "llama.cpp sampler chain (penalties, DRY, top-nσ, top-k, typical, top-p, min-p, XTC, temperature)"
    paper = ("llama.cpp src/llama-sampling.cpp; Holtzman et al. 2020 (top-p), Meister et al. 2022 (typical), "
             "Nguyen et al. 2024 (min-p), Tang et al. 2024 (top-nσ), p-e-w (XTC, DRY), kalomaze (dynamic temperature)")
    explanation = ("llama.cpp does not pick a token in one rule: it passes the model's scores through a chain of "
                   "samplers, each working on what the previous one left. Penalties and DRY push down tokens that "
                   "would repeat the text; top-k, typical, top-p, min-p and XTC each cut candidates by their own "
                   "rule; temperature reshapes what is left; then one token is drawn at random. The order matters, "
                   "and the funnel figure shows, at every step, how many tokens and how much of the model's "
                   "probability each stage let through.")
    Config = SamplerChainConfig
    deterministic = False

    def run(self, ctx: RunContext, cfg: SamplerChainConfig) -> RunGen:
        return (yield from token_loop(ctx, Chain(cfg, ctx)))
