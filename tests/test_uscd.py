"""USCD (docs/strategies.md#uscd): lame-prompt derivation (HumanEval, MBPP, inside a chat message); property
tests 5.4 (a) lame == standard keeps greedy, (b) threshold 0 = plain decoding (greedy and sampled), (c) the lame
context always holds the same generated suffix; every step re-derived from an unbatched no-cache reference (both
rows of the padded B=2 batch see exactly their own prompt); the gate mapping to the reference's std threshold; the
CLI --lame-prompt option; a short run on the embedded model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from declab.cli import main as cli_main
from declab.core.errors import UserError
from tests.fake import FakeLM
from declab.run import Run, RunRequest
from strategies.uscd import lame_prompt, std_of, std_to_threshold

HE_PROMPT = '''from typing import List


def has_close_elements(numbers: List[float], threshold: float) -> bool:
    """ Check if in given list of numbers, are any two numbers closer to each other than
    given threshold.
    >>> has_close_elements([1.0, 2.0, 3.0], 0.5)
    False
    >>> has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3)
    True
    """
'''

HE_LAME = '''from typing import List


def has_close_elements(numbers: List[float], threshold: float) -> bool:
    """ Check if in given list of numbers, are any two numbers closer to each other than
    given threshold.
    """
'''

HE_EXAMPLE_HEADER = '''def add(x: int, y: int):
    """Add two numbers x and y
    For example:
    >>> add(2, 3)
    5
    """
'''

HE_ARROW = '''def digits(s):
    """Return the sum of the digits.

    Examples:
        digits("a1b2") => 3
        digits("") => 0
    """
'''

MBPP = '''"""
Write a function to find the shared elements from the given two lists.
assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))
"""
'''


# ------------------------------------------------------------------------------------------------ lame prompt
def test_lame_prompt_humaneval_doctests_removed():
    assert lame_prompt(HE_PROMPT) == HE_LAME


def test_lame_prompt_example_header_and_arrow_examples():
    out = lame_prompt(HE_EXAMPLE_HEADER)
    assert ">>>" not in out and "5\n" not in out and "example" not in out.lower()
    assert out.startswith('def add(x: int, y: int):\n    """Add two numbers x and y\n')
    arrow = lame_prompt(HE_ARROW)
    assert "=>" not in arrow and "Examples" not in arrow and "Return the sum of the digits." in arrow


HE_SECTIONS = '''def even_odd_palindrome(n):
    """
    Given a positive integer n, return a tuple of counts.

    Example 1:

        Input: 3
        Output: (1, 2)
        Explanation:
        Integer palindrome are 1, 2, 3.

    Example 2:
        Input: 12
        Output: (4, 6)

    Note:
        1. 1 <= n <= 10^3
    Examples:
    For lst = [0,3,2] the output should be 10
    """
'''


def test_lame_prompt_example_sections():
    """The reference's own lame prompt of this problem (HumanEval/107) drops the "Note:" section too (issue 20);
    the blank line before the removed block stays."""
    assert lame_prompt(HE_SECTIONS) == ('def even_odd_palindrome(n):\n    """\n    Given a positive integer n, return a '
                                        'tuple of counts.\n\n    """\n')


def test_lame_prompt_mbpp_assert_removed():
    assert lame_prompt(MBPP) == '"""\nWrite a function to find the shared elements from the given two lists.\n"""\n'


def test_lame_prompt_inside_chat_message_and_unchanged_without_examples():
    msg = "Complete the following Python function in one code block.\n\n```python\n" + HE_PROMPT + "```"
    lame = lame_prompt(msg)
    assert lame == "Complete the following Python function in one code block.\n\n```python\n" + HE_LAME + "```"
    plain = "Write a haiku about the sea.\nIt should rhyme."
    assert lame_prompt(plain) == plain


def test_threshold_mapping_to_reference_std():
    """u = torch.std(p_s) as the reference computes it (Bessel-corrected, contrast.py); u <= T  <=>
    sum p^2 <= (V-1) T^2 + 1/V (the published T=0.005 at V=32016 -> 0.80). V = 50 tells V-1 from V: a gate with
    V T^2 would disagree at the 0.1% margins below (issue 20 item 7)."""
    assert std_to_threshold(0.005, 32016) == pytest.approx(0.8004, abs=1e-4)
    g = torch.Generator().manual_seed(0)
    for V in (50, 1000, 32016):
        for scale in (0.5, 3.0, 12.0):
            p = (torch.randn(V, generator=g, dtype=torch.float64) * scale).softmax(-1)
            u = torch.std(p)                                           # the reference's statistic
            for T in (float(u) * 0.999, float(u) * 1.001):
                assert bool(u <= T) == bool((p * p).sum() <= std_to_threshold(T, V))
                assert std_of(float((p * p).sum()), V) == pytest.approx(float(u), rel=1e-9)


# ------------------------------------------------------------------------------------------------ fake model
def context_logits(V: int, scale: float = 2.5):
    """Logits that depend on the whole context (so a lame context that drifted would show), EOS never likely."""
    def fn(context: list[int]) -> torch.Tensor:
        h = 0
        for t in context:
            h = (h * 1_000_003 + t + 1) % (2 ** 31)
        out = torch.randn(V, generator=torch.Generator().manual_seed(h)) * scale
        out[0] = -30.0
        return out
    return fn


class Recorder:
    def __init__(self, fn):
        self.fn, self.contexts = fn, []

    def __call__(self, context):
        self.contexts.append(list(context))
        return self.fn(context)


def run(lm, prompt=" the cat sat\n on the mat", n=24, seed=0, strategy="uscd", lame=None, **params):
    return Run(lm, RunRequest(model=lm.key, strategy=strategy, prompt=prompt, params=params, max_new_tokens=n,
                              seed=seed, lame_prompt=lame)).run_to_end()


def fake(scale=2.5):
    V = len(FakeLM().vocab)
    return FakeLM(context_logits(V, scale))


def tokens(res):
    return res.frame[res.frame.kind == "token"].reset_index(drop=True)


def reference(lm, std_ids, lame_ids, n, thr, gamma=0.6667, w=(1.0, -0.7)):
    """Unbatched, no-cache USCD greedy (5.2): both contexts get the chosen token."""
    V = lm.vocab_size
    gen, rows = [], []
    for _ in range(n):
        ps = lm.logits_fn(std_ids + gen).double().softmax(-1)
        pl = lm.logits_fn(lame_ids + gen).double().softmax(-1)
        contrast = float((ps * ps).sum()) <= thr
        if contrast:
            mix = w[0] * ps + w[1] * pl
            keep = (ps >= gamma / V) & (mix > 0)
            scores = torch.where(keep, mix.clamp_min(1e-300).log(), torch.tensor(-math.inf, dtype=torch.float64))
        else:
            scores = ps.log()
        tok = int(scores.argmax())
        rows.append((tok, contrast, int(ps.argmax())))
        gen.append(tok)
        if tok in lm.eos_ids:
            break
    return rows


@pytest.mark.parametrize("thr", [0.0, 0.3, 0.8, 1.0])
def test_matches_unbatched_reference(fake_registry, thr):
    lm = fake()
    prompt, lame = " the cat sat\n on the mat and the dog", " a dog"
    res = run(lm, prompt=prompt, lame=lame, threshold=thr, temperature=0.0, n=20)
    ref = reference(lm, lm.encode_prompt(prompt, "raw"), lm.encode_prompt(lame, "raw"), 20, thr)
    tok = tokens(res)
    assert tok.token_id.tolist() == [r[0] for r in ref]
    assert tok.contrast.tolist() == [r[1] for r in ref]
    assert tok.plain_token.tolist() == [r[2] for r in ref]
    assert tok.flip.tolist() == [r[0] != r[2] for r in ref]
    # the gate is what the recorded statistic says
    assert (tok.contrast == (tok.sum_sq <= thr)).all()
    if thr == 0.3:
        assert 0 < tok.contrast.sum() < len(tok)                       # both branches exercised
        assert tok.flip.any()                                           # the contrast changed something


def test_a_lame_equal_to_standard_keeps_greedy(fake_registry):
    """5.4 (a): lame == standard and 0 < |w_l| < w_s: (w_s - |w_l|) p_s keeps the argmax -> greedy output."""
    lm = fake(scale=1.0)                                                # flat: the gate is open on most steps
    prompt = " the cat sat on the mat"
    greedy = run(lm, prompt=prompt, strategy="greedy", n=24)
    res = run(lm, prompt=prompt, lame=prompt, threshold=1.0, temperature=0.0, n=24)
    assert res.sequences[0].token_ids == greedy.sequences[0].token_ids
    assert tokens(res).contrast.all() and not tokens(res).flip.any()
    assert res.meta["metrics"]["lame_same_as_prompt"] is True


def test_b_threshold_zero_is_plain_decoding(fake_registry):
    """5.4 (b): threshold 0 -> never contrast: greedy equals greedy, sampling equals `sample` with the same seed."""
    lm = fake(scale=1.0)
    g = run(lm, strategy="greedy", n=24)
    u = run(lm, threshold=0.0, temperature=0.0, lame=" a dog", n=24)
    assert u.sequences[0].token_ids == g.sequences[0].token_ids
    assert not tokens(u).contrast.any()
    for seed in (1, 2):
        s = run(lm, strategy="sample", n=24, seed=seed, temperature=0.8, top_p=0.95)
        u = run(lm, threshold=0.0, n=24, seed=seed, lame=" a dog")   # published 0.8 / 0.95
        assert u.sequences[0].token_ids == s.sequences[0].token_ids


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_c_lame_context_gets_the_same_suffix(fake_registry, temperature):
    """5.4 (c): every forward of the lame row sees lame_ids + exactly the generated tokens so far (no drift), and
    the standard row std_ids + the same tokens (the padding is never seen)."""
    V = len(FakeLM().vocab)
    rec = Recorder(context_logits(V, 1.0))
    lm = FakeLM(rec)
    prompt = " the cat sat\n on the mat and the dog ran"
    res = run(lm, prompt=prompt, lame=" a dog", temperature=temperature, threshold=0.9, n=16)
    gen = tokens(res).token_id.tolist()
    std, lame = lm.encode_prompt(prompt, "raw"), lm.encode_prompt(" a dog", "raw")
    seen = [c for c in rec.contexts]
    lame_ctx = [c[len(lame):] for c in seen if c[:len(lame)] == lame and len(c) >= len(lame)]
    std_ctx = [c[len(std):] for c in seen if c[:len(std)] == std and len(c) >= len(std)]
    assert [gen[:i] for i in range(len(gen))] == [s for s in lame_ctx if len(s) <= len(gen)][-len(gen):]
    assert [gen[:i] for i in range(len(gen))] == [s for s in std_ctx if len(s) <= len(gen)][-len(gen):]
    assert lm.forwards == len(gen)                                      # one B=2 forward per step (prefill incl.)


def test_derived_lame_prompt_and_trace(fake_registry):
    lm = fake()
    prompt = " the cat sat\n>>> the dog\n it\n\n on the mat"
    res = run(lm, prompt=prompt, temperature=0.0, n=10)
    assert res.sequences[0].extra["lame_prompt"] == " the cat sat\n\n on the mat"
    assert res.meta["sequences"][0]["lame_prompt"] == " the cat sat\n\n on the mat"
    m = res.meta["metrics"]
    assert m["lame_same_as_prompt"] is False and m["contrast_steps"] == int(tokens(res).contrast.sum())
    cand = res.frame[res.frame.kind == "candidate"]
    assert set(cand.source) == {"standard", "lame", "contrast"}
    assert (cand.groupby(["step", "source"]).size() == 5).all()
    # std column = the reference's torch.std(p_s) (Bessel-corrected) recomputed from sum p^2
    tok = tokens(res)
    V = lm.vocab_size
    assert ((tok.u_std ** 2 - (tok.sum_sq - 1 / V) / (V - 1)).abs() < 1e-9).all()


def test_std_threshold_overrides(fake_registry):
    lm = fake()
    V = lm.vocab_size
    res = run(lm, temperature=0.0, std_threshold=0.03, threshold=0.0, lame=" a dog", n=16)
    tok = tokens(res)
    assert (tok.contrast == (tok.u_std <= 0.03 + 1e-12)).all()
    assert (tok.contrast == (tok.sum_sq <= std_to_threshold(0.03, V))).all()


def test_bad_parameters(fake_registry):
    for params in ({"threshold": 1.5}, {"top_p": 0.0}, {"temperature": -1.0}):
        with pytest.raises(UserError):
            run(fake(), **params)


def test_cli_lame_prompt(fake_registry, tmp_path, capsys):
    out = tmp_path / "r.csv"
    code = cli_main(["run", "--model", "fake", "--strategy", "uscd", "--prompt", " the cat sat on the mat",
                     "--lame-prompt", " a dog", "--set", "temperature=0", "--max-new-tokens", "6", "--csv", str(out),
                     "--quiet"])
    assert code == 0
    meta = json.loads((tmp_path / "r.meta.json").read_text())
    assert meta["extras"]["lame_prompt"] == " a dog"
    assert meta["sequences"][0]["lame_prompt"] == " a dog"
    assert meta["metrics"]["lame_prompt_tokens"] == 2


# ------------------------------------------------------------------------------------------------ real model
@pytest.mark.model
def test_embedded_chat_humaneval_prompt(real_lm):
    """The chat format: the lame prompt is the same chat message without the examples; threshold 0 = greedy
    through the padded two-row batch; the default gate contrasts on some steps."""
    msg = "Complete the following Python function in one ```python code block.\n\n```python\n" + HE_PROMPT + "```"
    req = dict(model=real_lm.key, prompt=msg, max_new_tokens=8, prompt_format="chat")
    g = Run(real_lm, RunRequest(strategy="greedy", **req)).run_to_end()
    u0 = Run(real_lm, RunRequest(strategy="uscd", params={"threshold": 0.0, "temperature": 0.0}, **req)).run_to_end()
    assert u0.sequences[0].token_ids == g.sequences[0].token_ids
    lame = u0.sequences[0].extra["lame_prompt"]
    assert ">>>" not in lame and "has_close_elements(numbers" in lame
    m = u0.meta["metrics"]
    assert m["lame_prompt_tokens"] < len(real_lm.encode_prompt(msg, "chat")) and m["contrast_steps"] == 0


def test_mechanism_figure(fake_registry):
    from viz.mechanism import mechanism_figures
    lm = fake()
    res = run(lm, prompt=" the cat sat\n on the mat and the dog", lame=" a dog",
              threshold=0.3, temperature=0.0, n=20)
    figs = mechanism_figures(res.frame, res.meta)
    assert "uscd" in figs and "contrastive" not in figs
    fig = figs["uscd"]
    names = [t.name for t in fig.data]
    tok = tokens(res)
    flips = next(t for t in fig.data if t.name == "flipped vs plain greedy")
    assert list(flips.x) == tok.step[tok.flip.astype(bool)].tolist()
    on = next(t for t in fig.data if t.name == "contrast applied (unsure)")
    assert list(on.x) == tok.step[tok.contrast.astype(bool)].tolist()
    assert "plain step (sure)" in names and "p_lame(chosen)" in names
    assert any(s.y0 == 0.3 for s in fig.layout.shapes)                 # the threshold line
