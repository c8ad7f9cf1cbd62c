"""USCD: uncertainty-aware selective contrastive decoding against a "lame" prompt (code generation).

Paper: Wang, Ding, Shen, Luo, He, Yu, Tao, "USCD: Improving Code Generation of LLMs by Uncertainty-Aware Selective
Contrastive Decoding" (arXiv 2409.05923); reference `alphadl/CodeGen-USCD` (`bigcode_eval/contrast.py`
EnsembleLogitsProcessor, `main.py`, run script `codellama_7b_weight_10_-07_pass@1.sh`).
Spec: docs/strategies.md#uscd.

Lame prompt (5.1): the standard prompt with its input-output examples removed. Derived automatically by
`lame_prompt()`: HumanEval style, every doctest example (a `>>>` line and its expected-output lines), every
"Example(s) [N]:" / "For example:" / "Constraints:" / "Variables:" / "Note:" section (the header and what is
indented under it or looks like an example), "Note: ..." and "E.g. ..." lines with their continuation lines, and
example lines anywhere (`f(...) == / ==> / ➞ / = result`, `Input:` / `Output:` / `Explanation:`, "For x = ... the
output (result) should be ..."), except definitions under a line ending "as follows:" (`fib4(0) -> 0`); a blank line
before a removed block stays, blank lines inside or after one go; MBPP style, every `assert ...` test line.
Against the reference's own HumanEval lame prompts (`data/humaneval/human_eval_neg.jsonl`, vendored as
tests/data/uscd/human_eval_neg.jsonl) this agrees exactly on 103 of the 164 problems (77 before these rules; 86% of
the reference's lines matched): the reference's prompts were edited by hand and also delete explanatory
specification sentences ("Separate groups are balanced ...", "Empty sum should be equal to 0 ..."), which no rule
here tells from the task's statement; we keep those (the lame prompt then says more than the reference's, never
less). Where agreement matters, give the reference's own text (bench/humaneval.py `uscd_ref` does). On HumanEval
this changes all but 4 prompts (38, 41, 50, 83: no examples, the reference leaves them unchanged too; there the
lame prompt equals the prompt, so greedy uscd = greedy plain decoding by 5.4 (a)). The rules work on any text, so
they apply inside a chat message as well (the prompt text is the user message; the lame text is wrapped in the
same chat template). The user can give it instead: ctx.inputs.lame_prompt (app text box, CLI `--lame-prompt`), in
the same format as the prompt (a chat message when the prompt is one); a given lame prompt is used as it is.

Rule (5.2, as implemented by the reference), per step with p_s, p_l the standard / lame next-token distributions:
    contrast  iff  sum_v p_s(v)^2 <= threshold                  (uncertain; else plain decoding on ln p_s)
    keep = { v : p_s(v) >= gamma / V }                          (plausibility: gamma times the mean probability)
    scores(v) = ln(w_s p_s(v) + w_l p_l(v)) on keep, -inf elsewhere and where the argument is <= 0
    temperature 0: argmax (lowest id on ties); else temperature then top-p, one draw (HF warper order).
If no kept token has a positive mixture (possible only when gamma is large), the step falls back to plain decoding
and says so (`fallback` column); the reference would produce NaN there.

The gate without the vocabulary (5.2 "interpretation"). The reference's statistic is u = torch.std(p_s) over the
vocabulary, Bessel-corrected (torch's default), contrasting when u <= T. Since sum p = 1,
u^2 = (sum p^2 - 1/V) / (V - 1), so u <= T  <=>  sum p^2 <= (V-1) T^2 + 1/V: the reference gate is exactly a
threshold on the collision probability sum p^2 (the chance two draws agree; 1 for a point mass, about p_max^2 for
a peaked distribution), which does not depend on V. Our `threshold` is that bound; the published T = 0.005 with
CodeLlama's V = 32016 gives 32015 * 0.005^2 + 1/32016 = 0.8004, so the default is 0.8 (contrast unless roughly
p_max >~ 0.9). To reproduce the reference's raw T on another vocabulary set `std_threshold` (> 0 overrides
`threshold` with (V-1) T^2 + 1/V for the run's V). The trace records u (`u_std`, the reference's torch.std),
sum p^2 (`sum_sq`), p_max and the entropy.

Paper / reference symbol -> config field: T (`mean_num`) -> threshold (re-parameterised, above) or std_threshold
(raw); gamma (`filter_num`, 0.6667 in the published run) -> gamma; src_weights (1.0, -0.7) -> w_standard,
w_lame; temperature 0.8, top_p 0.95 (published run, n_samples 1) -> temperature, top_p; temperature 0 = greedy.

Batching and the drift fix. Both prompts run as ONE batch of two rows (one B=2 forward per step). `lame_padding`:
`masked` (default): the shorter prompt is left-padded, with an attention mask and per-row position ids, so each row
sees exactly its own prompt. `eos`, the reference's setting (the one to reproduce the paper with): bigcode's
tokenizer call uses padding="max_length" with pad = EOS and right padding, then both rows are cut to the standard
prompt's length, and generate() gets no attention mask (pad == EOS, so transformers attends to every position): the
lame row is the lame prompt followed by EOS tokens up to the standard prompt's length (a lame prompt longer than the
standard one is cut to it), all attended, positions 0..L-1 in both rows. Our default masks them because a lame row
that reads a run of </s> tokens measures something else than the prompt without its examples.
Deviation from the reference (on purpose, 5.2 "differences to watch"): the token chosen from the standard row's
scores is appended to BOTH rows every step, in both branches, so the lame context never drifts from the real
output (the reference lets the lame row decode and sample on its own).

Loop: uscd owns its loop instead of the engine's per-token loop (declab/core/loop.py): every step is one B = 2
forward over two left-padded rows with their own attention mask and position ids, and the chosen token is fed to
both rows; the shared loop drives one row of one model.

Trace, per step: the `token` row (logprob = ln p_s of the chosen token, score = the score it was chosen by) with
`u_std`, `sum_sq`, `p_max`, `contrast` (the gate), `keep_size`, `p_std` / `p_lame` (of the chosen token),
`plain_token` (argmax p_s) and `flip` (the choice differs from plain greedy), `contrast_token` (argmax of the
contrast scores, also on plain steps), `fallback`; `candidate` rows with `source` standard / lame / contrast (top
`num_alternatives` of each, contrast = the contrast scores whether or not the gate applied them). Metrics:
contrast_steps, contrast_fraction, flips, lame_prompt_tokens, lame_same_as_prompt. The lame prompt text is in the
returned sequence's `lame_prompt`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from declab.core.errors import UserError
from declab.core.sampling import entropy_bits, kept_count
from declab.core import Config, Progress, RunContext, RunGen, Sequence, Strategy, param, register
from declab.core.metrics import ContrastMetrics
from strategies.contrastive import NEG_INF, add_candidates, choose, ranked

REFERENCE_V = 32016          # CodeLlama's vocabulary (the published run)
REFERENCE_T = 0.005


def std_to_threshold(T: float, vocab_size: int) -> float:
    """The reference's std threshold T on a vocabulary of V -> the equivalent bound on sum p^2, (V-1) T^2 + 1/V
    (`torch.std` is Bessel-corrected: u^2 = (sum p^2 - 1/V) / (V - 1))."""
    return (vocab_size - 1) * T * T + 1.0 / vocab_size


def std_of(sum_sq: float, vocab_size: int) -> float:
    """The reference's statistic u = torch.std(p_s) (Bessel-corrected) from sum p^2: sqrt((sum p^2 - 1/V) / (V-1))."""
    V = vocab_size
    return math.sqrt(max((sum_sq - 1.0 / V) / (V - 1), 0.0)) if V > 1 else 0.0


# ------------------------------------------------------------------------------------------------ lame prompt
_EXAMPLE_HEADER = re.compile(r"^\s*(for\s+)?(an?\s+)?(exam[pb]les?|constraints|variables|note)\s*(usage|\d+)?\s*[:.]?\s*$",
                             re.I)
_EXAMPLE_LINE = re.compile(r"^\s*(input\s*:|output\s*:|explanation\s*:|for\s.*\b(output|result)\s+should\s+be\b"
                           r"|(for\s+)?[A-Za-z_][\w.]*\(.*\)\s*(==>?|➞|=>|->|=|should\s+return|returns?|#\s*=>"
                           r"|#\s*returns?)\s*\S)", re.I)
_NOTE = re.compile(r"^\s*(note\s*:|e\.g\.)", re.I)               # an explanatory note: the line and its continuation
_DEFINITION = re.compile(r"(as\s+follows|defined\s+as)\s*:\s*$", re.I)   # what follows defines, it is no example
_CLOSE = ('"""', "'''")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def lame_prompt(text: str) -> str:
    """The prompt without its input-output examples (see the module docstring): doctest `>>>` examples and their
    outputs; "Example(s) [N]:" / "Constraints:" / "Variables:" / "Note:" sections (the header and what is indented
    under it or looks like an example: `Input:` / `Output:` / `Explanation:` lines, `f(...) == / ==> / ➞ / = result`
    calls, "For x = ... the output should be ..."), also such example lines on their own (except in a block that a
    line ending "as follows:" / "defined as:" introduces: a definition such as `fib4(0) -> 0`); "Note: ..." and
    "E.g. ..." lines with their continuation lines; and MBPP `assert` test lines. A blank line just before a removed
    block stays (at most one before a closing docstring quote); blank lines inside or after one go. Text without
    examples comes back unchanged."""
    out: list[str] = []
    in_doctest = False
    section = None                       # indentation of the "Example:" header whose section is being dropped
    note = None                          # indentation of a "Note: ..." line whose continuation is being dropped
    definition = False
    removed = False                      # the previous non-blank line was removed
    pending: list[str] = []
    for line in text.split("\n"):
        s = line.strip()
        drop = True
        if s.startswith(">>>"):
            in_doctest = True
        elif in_doctest and s and not s.startswith(_CLOSE):
            pass                         # an expected output line of the example above
        else:
            in_doctest = False
            if note is not None and not (s and not s.startswith(_CLOSE) and _indent(line) >= note
                                         and not _EXAMPLE_HEADER.match(line)):
                note = None
            if note is not None:
                pass
            elif section is not None and (not s or _indent(line) > section or _EXAMPLE_LINE.match(line)
                                          or _EXAMPLE_HEADER.match(line)):
                pass
            else:
                section = None
                if definition and (not s or s.startswith(_CLOSE)):
                    definition = False
                if _DEFINITION.search(line):
                    definition = True
                    drop = False
                elif _EXAMPLE_HEADER.match(line):
                    section = _indent(line)
                elif _NOTE.match(line):
                    note = _indent(line)
                elif not (s.startswith("assert ") or s.startswith("assert(")
                          or (_EXAMPLE_LINE.match(line) and not definition)):
                    drop = False
        if not drop and not s and removed:
            pending.append(line)         # a blank line after a removed block: kept unless a closing quote follows
            continue
        if not drop:
            if pending and not s.startswith(_CLOSE):
                out.extend(pending)
            pending = []
            out.append(line)
        removed = drop or (removed and not s)
    result = "\n".join(out + pending)
    # at most one blank line before a closing docstring quote
    result = re.sub(r"\n([ \t]*\n)+([ \t]*(\"\"\"|'''))", r"\n\1\2", result)
    return result if result.strip() else text


def reference_pad_id(lm) -> int:
    """The reference's pad token: the tokenizer's EOS (bigcode harness: `tokenizer.pad_token = tokenizer.eos_token`)."""
    tid = getattr(getattr(lm, "tokenizer", None), "eos_token_id", None)
    return int(tid) if isinstance(tid, int) else next(iter(sorted(lm.eos_ids)), 0)


# ------------------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class USCDConfig(Config):
    threshold: float = param(0.8, lo=0.0, hi=1.0, help="Gate: contrast when sum p_std^2 <= threshold (uncertain). "
                                                       "= V*T^2 + 1/V of the reference's std threshold T; the published "
                                                       "T=0.005 at V=32016 gives 0.80. 0 = never contrast, 1 = always.")
    std_threshold: float = param(0.0, lo=0.0, hi=1.0, help="If > 0: the reference's raw std threshold T "
                                                           "(vocabulary-dependent), overriding `threshold`.")
    gamma: float = param(0.6667, lo=0.0, hi=1000.0, help="Plausibility filter: keep tokens with p_std >= gamma / V "
                                                         "(gamma times the mean probability; published run 0.6667).")
    w_standard: float = param(1.0, lo=-100.0, hi=100.0, help="Weight of p_std in the mixture (published: 1.0).")
    w_lame: float = param(-0.7, lo=-100.0, hi=100.0, help="Weight of p_lame in the mixture (published: -0.7; "
                                                          "negative = contrast).")
    temperature: float = param(0.8, lo=0.0, hi=100.0, help="0 = greedy; > 0 = sample (published run: 0.8).")
    top_p: float = param(0.95, lo=0.0, hi=1.0, lo_open=True, help="Top-p after temperature (published run: 0.95).")
    lame_padding: str = param("masked", choices=("masked", "eos"),
                              help="How the two prompts share one batch. masked: left-pad the shorter row and mask "
                                   "the padding (each row sees only its own prompt). eos: the reference's setting "
                                   "(published run): the lame row is cut or right-padded with EOS tokens to the "
                                   "standard prompt's length, all attended, so it reads the lame prompt then </s>s.")


@register
class USCD(Strategy):
    name = "uscd"
    title = "USCD (uncertainty-aware selective contrast with a lame prompt)"
    paper = ("Wang et al. 2024, USCD: Improving Code Generation of LLMs by Uncertainty-Aware Selective Contrastive "
             "Decoding (arXiv 2409.05923)")
    explanation = ("The same model reads two prompts at once: the real one and a 'lame' copy with its input-output "
                   "examples removed. Where the model is sure of the next token it decodes normally; where it is "
                   "unsure, it subtracts part of what the lame prompt predicts (p_std - 0.7 p_lame), which pushes "
                   "away from the noise the model would produce without the examples. Both prompts always receive "
                   "the same chosen token.")
    Config = USCDConfig
    deterministic = False
    takes_lame_prompt = True

    def run(self, ctx: RunContext, cfg: USCDConfig) -> RunGen:
        lm, trace = ctx.lm, ctx.trace
        std_ids = list(ctx.prompt_ids)
        lame_text, lame_ids = self.lame_ids(ctx)
        V = lm.vocab_size
        thr = std_to_threshold(cfg.std_threshold, V) if cfg.std_threshold > 0 else cfg.threshold
        floor = cfg.gamma / V
        k = min(ctx.num_alternatives, V)

        # one batch of two rows, each with its own mask and positions
        a, b = len(std_ids), len(lame_ids)
        if cfg.lame_padding == "eos":
            # the reference: both prompts tokenized with padding="max_length", pad = EOS, then cut to the standard
            # prompt's length; no attention mask (pad == eos, so transformers attends to every position)
            eos = reference_pad_id(lm)
            lame_row = lame_ids[:a] + [eos] * (a - b)
            ids = torch.tensor([std_ids, lame_row], dtype=torch.long)
            mask = torch.ones(2, a, dtype=torch.long)
            next_pos = torch.tensor([[a], [a]], dtype=torch.long)
        else:
            L = max(a, b)
            pad = next(iter(sorted(lm.eos_ids)), 0)
            ids = torch.tensor([[pad] * (L - a) + std_ids, [pad] * (L - b) + lame_ids], dtype=torch.long)
            mask = torch.tensor([[0] * (L - a) + [1] * a, [0] * (L - b) + [1] * b], dtype=torch.long)
            next_pos = torch.tensor([[a], [b]], dtype=torch.long)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        out = lm.prefill(ids, attention_mask=mask, position_ids=pos)
        one = torch.ones(2, 1, dtype=torch.long)

        generated: list[int] = []
        total = 0.0
        n_contrast = flips = 0
        steps = 0
        for step in range(ctx.max_new_tokens):
            t0 = lm.clock_ms()
            lp = out.logits.log_softmax(-1)                                 # [2, V]
            p = lp.exp()
            ps, pl = p[0], p[1]
            sum_sq = (ps * ps).sum()
            keep = ps >= floor
            mix = cfg.w_standard * ps + cfg.w_lame * pl
            cscores = torch.where(keep & (mix > 0), mix.clamp_min(1e-45).log(), torch.full_like(mix, NEG_INF))
            gate = bool(sum_sq <= thr)
            finite = bool(torch.isfinite(cscores).any()) if gate else True
            use_contrast = gate and finite
            scores = cscores if use_contrast else lp[0]
            token, dist = choose(scores, cfg.temperature, cfg.top_p, ctx.generator)
            stops = torch.topk(lp[0], k)
            ltops = torch.topk(lp[1], k)
            ctops = torch.topk(cscores, k)
            stats = torch.stack([lp[0].argmax().float(), cscores.argmax().float(), sum_sq, ps.max(),
                                 entropy_bits(lp[0]), keep.sum().float(), ps[token], pl[token], lp[0, token],
                                 scores[token], kept_count(dist, cfg.temperature).float()]).tolist()
            plain, ctok = int(stats[0]), int(stats[1])
            sel_ms = lm.clock_ms() - t0
            flip = token != plain
            flips += flip
            n_contrast += use_contrast
            steps += 1
            u_std = std_of(stats[2], V)
            trace.add("token", step, branch_id=0, parent_id=0, position=a + step, token_id=token,
                      token_text=lm.token_text(token), logprob=stats[8], entropy=stats[4],
                      score=stats[9] if math.isfinite(stats[9]) else None, model=lm.key, accepted=True,
                      dt_ms=out.fwd_ms + sel_ms, u_std=u_std, sum_sq=stats[2], p_max=stats[3], contrast=use_contrast,
                      keep_size=int(stats[5]), p_std=stats[6], p_lame=stats[7], plain_token=plain, flip=flip,
                      contrast_token=ctok, fallback=gate and not finite, fwd_ms=out.fwd_ms, sel_ms=sel_ms,
                      kept=int(stats[10]))
            add_candidates(ctx, step, token,
                           ranked("standard", stops.indices.tolist(), stops.values.tolist(), "logprob") +
                           ranked("lame", ltops.indices.tolist(), ltops.values.tolist(), "logprob") +
                           ranked("contrast", ctops.indices.tolist(), ctops.values.tolist(), "score"))
            total += stats[8]
            ctx.metrics = self.metrics(n_contrast, flips, steps, lame_ids, std_ids)
            if token in lm.eos_ids:
                break
            generated.append(token)
            yield Progress(step, generated)
            if step + 1 < ctx.max_new_tokens:
                mask = torch.cat([mask, one], dim=1)
                # the chosen token goes to BOTH rows (no drift of the lame context)
                out = lm.step(torch.tensor([[token], [token]], dtype=torch.long), out.cache, attention_mask=mask,
                              position_ids=next_pos)
                next_pos = next_pos + 1
        ctx.metrics = self.metrics(n_contrast, flips, steps, lame_ids, std_ids)
        return [Sequence(token_ids=list(generated), score=total, extra={"lame_prompt": lame_text})]

    @staticmethod
    def lame_ids(ctx: RunContext) -> tuple[str, list[int]]:
        """The lame prompt's text and ids, in the same format as the prompt (from ctx.inputs; without a prompt text
        there, the prompt ids are decoded and the lame text encoded raw)."""
        lm, inputs = ctx.lm, ctx.inputs
        given = inputs.lame_prompt
        text, fmt = inputs.prompt, inputs.prompt_format or "raw"
        if not text:
            text, fmt = lm.decode(ctx.prompt_ids), "raw"
        lame = given if isinstance(given, str) and given.strip() else lame_prompt(text)
        ids = lm.encode_prompt(lame, fmt)
        if not ids:
            raise UserError("uscd: the lame prompt encodes to no tokens; give a lame prompt with some text")
        return lame, ids

    @staticmethod
    def metrics(n_contrast: int, flips: int, steps: int, lame_ids: list[int], std_ids: list[int]) -> ContrastMetrics:
        return ContrastMetrics(contrast_steps=n_contrast,
                               contrast_fraction=round(n_contrast / steps, 6) if steps else 0.0, flips=flips,
                               lame_prompt_tokens=len(lame_ids), lame_same_as_prompt=lame_ids == std_ids)
