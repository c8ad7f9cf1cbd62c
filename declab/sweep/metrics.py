"""Sweep metrics: one function per metric, each defined in its docstring, computed on one run's best sequence.

A sweep file names them under `metrics:` (`METRICS`); each becomes a summary column of that name. A metric that does
not apply to a run (pass@1 without tests, grammar validity without a grammar, n-grams of a sequence shorter than n)
is left empty (NA), never reported as 0.

    rep_n, distinct_n     n = 2 (the `ngram` field of the sweep file changes it); rep_2 / distinct_3 ... name n
    perplexity            under the model, teacher-forced
    pass_at_1             HumanEval prompts (the `humaneval` set)
    grammar_valid         prompts with a grammar (the `grammar` set, or a prompt's `grammar` key)

n-grams are counted over the generated token ids (the model's tokenizer; the prompt excluded, generation stopped
at the first EOS, which is not counted): a sequence of L tokens has the L - n + 1 contiguous windows
t[i .. i+n-1], i = 0 .. L-n; repeated windows count once per occurrence in the total and once in the distinct set.
"""

from __future__ import annotations

import math
import re

import torch

from declab.sweep import code
from strategies.grammar import BUILTIN_GRAMMARS
from strategies.grammar.mask import parses

NAMED = ("perplexity", "pass_at_1", "grammar_valid")
NGRAM = re.compile(r"(rep|distinct)_(n|[1-9])")


def legal_text() -> str:
    return "rep_n, distinct_n (or rep_1..rep_9, distinct_1..distinct_9), " + ", ".join(NAMED)


def is_metric(name) -> bool:
    return isinstance(name, str) and (name in NAMED or NGRAM.fullmatch(name) is not None)


def ngrams(token_ids: list[int], n: int) -> list[tuple[int, ...]]:
    """The L - n + 1 contiguous n-token windows of a sequence (none when L < n)."""
    return [tuple(token_ids[i:i + n]) for i in range(len(token_ids) - n + 1)]


def distinct_n(token_ids: list[int], n: int = 2) -> float | None:
    """distinct-n (Li et al. 2016): |set of n-gram windows| / (L - n + 1), over the generated token ids; 1 = no
    n-gram occurs twice. None when the sequence has fewer than n tokens."""
    grams = ngrams(token_ids, n)
    return len(set(grams)) / len(grams) if grams else None


def rep_n(token_ids: list[int], n: int = 2) -> float | None:
    """rep-n (Welleck et al. 2020, sequence level): 1 - distinct-n, the share of n-gram windows that repeat an
    earlier window of the same sequence (0 = no repetition; the degeneration measure). None when L < n."""
    d = distinct_n(token_ids, n)
    return None if d is None else 1.0 - d


@torch.no_grad()
def perplexity(lm, prompt_ids: list[int], token_ids: list[int]) -> float | None:
    """exp(-(1/L) sum_i ln p(t_i | prompt, t_<i)) of the L generated tokens under the model itself: its raw
    next-token distribution (temperature 1, no top-k / top-p / penalties, whatever the strategy used), teacher-forced
    in one forward over prompt + generated tokens. None when nothing was generated."""
    if not token_ids:
        return None
    ids = list(prompt_ids) + list(token_ids)
    logits = lm.prefill(ids, all_logits=True).logits[0]                 # [P+L, V]
    logp = torch.log_softmax(logits[len(prompt_ids) - 1:-1].float(), dim=-1)   # [L, V]: row i predicts t_i
    target = torch.as_tensor(token_ids, dtype=torch.long, device=logp.device)  # [L]
    nll = -logp.gather(1, target[:, None]).mean()
    return float(math.exp(float(nll)))


def pass_at_1(task_id: str | None, text: str) -> float | None:
    """pass@1 with one sample (Chen et al. 2021): 1.0 when the reply's code (declab.sweep.code.extract_code: the first
    code block, after the prompt's imports) passes the problem's unit tests in the sandbox (declab.sweep.code.execute),
    else 0.0; a sweep's mean over prompts and seeds is the pass@1 estimate. None for a prompt without tests."""
    if task_id is None:
        return None
    problem = code.problems()[task_id]
    passed, _why = code.execute(code.program(problem, code.extract_code(text)))
    return 1.0 if passed else 0.0


def grammar_valid(lm, grammar: str | None, token_ids: list[int]) -> float | None:
    """1.0 when the generated tokens are a complete sentence of the prompt's grammar (a fresh xgrammar matcher
    accepts every token and then the end of the sequence: strategies.grammar.mask.parses), else 0.0 (including a
    sentence cut off by max_new_tokens). None for a prompt without a grammar."""
    if grammar is None:
        return None
    return 1.0 if parses(lm, BUILTIN_GRAMMARS[grammar], token_ids) else 0.0


def compute(name: str, lm, prompt, prompt_ids: list[int], token_ids: list[int], text: str, ngram: int):
    """One named metric of one run (prompt: a declab.sweep.prompts.Prompt)."""
    m = NGRAM.fullmatch(name)
    if m:
        n = ngram if m.group(2) == "n" else int(m.group(2))
        return (rep_n if m.group(1) == "rep" else distinct_n)(token_ids, n)
    if name == "perplexity":
        return perplexity(lm, prompt_ids, token_ids)
    if name == "pass_at_1":
        return pass_at_1(prompt.task_id, text)
    if name == "grammar_valid":
        return grammar_valid(lm, prompt.grammar, token_ids)
    raise KeyError(name)
