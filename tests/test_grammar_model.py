"""gcd and asap on the embedded SmolLM2-135M-Instruct: every output of every built-in grammar parses under its
grammar (checked with a fresh xgrammar matcher), and exact mode on the paper's binary toy."""

from __future__ import annotations

import pytest

from declab.run import Run, RunRequest
from strategies import grammar as G

pytestmark = pytest.mark.model

# grammar -> (prompt, max new tokens, samples): prompts the small model answers inside the budget
CASES = {
    "binary_len_3": ("Write a binary string of length 3.", 6, 3),
    "binary_len_5": ("Write a binary string of length 5.", 8, 2),
    "arithmetic": ("Write an arithmetic expression that equals 12.", 24, 1),
    "json": ("Give a JSON object with a name and an age.", 40, 1),
    "sql_select": ("Write an SQL query that lists the names of all users older than 30.", 40, 1),
    "sygus_string": ("Write an SMT-LIB string expression over `name` that returns its first letter.", 40, 1),
}


def run(lm, strategy, grammar, prompt, n, samples, seed=0, **params):
    return Run(lm, RunRequest(model=lm.key, strategy=strategy, prompt=prompt, max_new_tokens=n, seed=seed,
                              params={"grammar": grammar, "num_samples": samples, **params})).run_to_end()


@pytest.mark.parametrize("grammar", list(CASES))
def test_every_output_parses_under_its_grammar(real_lm, grammar):
    prompt, n, samples = CASES[grammar]
    text = G.BUILTIN_GRAMMARS[grammar]
    for strategy in ("gcd", "asap"):
        res = run(real_lm, strategy, grammar, prompt, n, samples, exact_max_nodes=0)
        assert res.status == "ok", res.error
        assert len(res.sequences) == samples
        for s in res.sequences:
            assert s.extra["complete"], (strategy, s.text)
            assert G.parses(real_lm, text, s.token_ids), (strategy, s.text)     # a fresh matcher
            assert s.text.strip()


def test_exact_mode_on_the_binary_toy(real_lm):
    res = run(real_lm, "asap", "binary_len_3", CASES["binary_len_3"][0], 6, 25, seed=1)
    m = res.meta["metrics"]
    assert m["kl_exact"] is True and m["z"] > 0
    assert m["efg_root"] >= m["z"] * (1 - 1e-4)                # an upper bound (batched vs cached forwards differ
    target = res.frame[res.frame.kind == "target"]             # in the last float32 bits)
    assert set(target["token_text"]) == {"000", "100", "101", "110", "111"}
    assert target["q"].sum() == pytest.approx(1.0)
    kl = res.frame[res.frame.kind == "kl"]
    assert kl["exact"].all() and kl["samples"].tolist() == list(range(1, 26))
    assert m["kl_gcd_limit"] > 0.1                             # GCD is biased on this prompt
