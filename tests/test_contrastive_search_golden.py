"""Golden test: declab's contrastive search equals transformers 4.x `generate(penalty_alpha=0.6, top_k=4)` token for
token on the embedded SmolLM2-135M-Instruct (float32, CPU).

tests/data/contrastive_search/golden.json was made once by make_golden.py beside it, in a separate virtual
environment with transformers 4.55.4 (4.56.x forwards contrastive search to a Hub repo, unreachable offline; see the
script). The same file carries 4.x greedy outputs: declab's greedy must match them first (parity check: a wrong
rope config in 4.x would show there)."""

import json

import pytest

from declab.run import Run, RunRequest
from tests.conftest import EMBEDDED, ROOT

pytestmark = pytest.mark.model
GOLDEN = json.loads((ROOT / "tests" / "data" / "contrastive_search" / "golden.json").read_text(encoding="utf-8"))
CASES = GOLDEN["cases"]


def run(lm, case, strategy, n, **params):
    return Run(lm, RunRequest(model=EMBEDDED, strategy=strategy, prompt=case["prompt"],
                              prompt_format=case["prompt_format"], params=params, max_new_tokens=n)).run_to_end()


def test_golden_file_is_what_it_says():
    assert GOLDEN["transformers"].startswith("4.") and GOLDEN["dtype"] == "float32"
    assert GOLDEN["penalty_alpha"] == 0.6 and GOLDEN["top_k"] == 4
    # the cases are not trivial: contrastive search departs from greedy in every one
    assert all(c["contrastive_ids"][:16] != c["greedy_ids"] for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=[c["prompt"][:24] for c in CASES])
def test_greedy_parity_with_transformers_4(real_lm, case):
    assert real_lm.encode_prompt(case["prompt"], case["prompt_format"]) == case["prompt_ids"]
    res = run(real_lm, case, "greedy", GOLDEN["greedy_max_new_tokens"])
    assert res.sequences[0].token_ids == case["greedy_ids"]


@pytest.mark.parametrize("case", CASES, ids=[c["prompt"][:24] for c in CASES])
def test_contrastive_search_equals_transformers_4(real_lm, case):
    res = run(real_lm, case, "contrastive_search", GOLDEN["max_new_tokens"],
              penalty_alpha=GOLDEN["penalty_alpha"], top_k=GOLDEN["top_k"])
    assert res.meta["prompt_ids"] == case["prompt_ids"]
    assert res.sequences[0].token_ids == case["contrastive_ids"]
    tokens = res.frame[res.frame.kind == "token"]
    assert tokens.overridden.any()
