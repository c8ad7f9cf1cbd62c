"""beam / diverse_beam on the embedded model against golden outputs of transformers 4.56.2.

tests/data/diverse_beam/golden.json was made once by tests/data/diverse_beam/make_golden.py in a separate venv with
transformers 4.56.2 (group beam search left the core in 4.57); see that script for how. Sequences must match token
for token; sequences_scores to 1e-4. (They were equal to the last bit on the CPU the golden file was made on, both sides
float32, sdpa attention, same torch; on an AMD EPYC without AVX-512, MKL takes other float32 kernels and every score
moves by about 8e-6, the same on the old and the new code, while every token stays the same.)"""

import json

import pytest
import torch

from declab.run import Run, RunRequest
from tests.conftest import EMBEDDED, ROOT

pytestmark = pytest.mark.model

GOLDEN = json.loads((ROOT / "tests" / "data" / "diverse_beam" / "golden.json").read_text())
RECORDS = GOLDEN["records"]
SCORE_TOL = 1e-4          # float32 scores across CPUs (see the module docstring); tokens are compared exactly


def run(lm, rec, strategy, **params):
    return Run(lm, RunRequest(model=EMBEDDED, strategy=strategy, prompt=rec["prompt"],
                              prompt_format=rec["prompt_format"], params=params,
                              max_new_tokens=rec["max_new_tokens"])).run_to_end()


def test_golden_file_is_what_it_says():
    assert GOLDEN["transformers"] == "4.56.2" and len(RECORDS) == 3
    for rec in RECORDS:
        # 4.56's vectorised plain beam search agreed with its BeamSearchScorer path on these prompts
        assert rec["cases"]["beam_group1"] == rec["cases"]["beam_generate"]


@pytest.mark.parametrize("rec", RECORDS, ids=lambda r: r["prompt"][:16])
def test_diverse_beam_equals_transformers_4_56(real_lm, rec):
    assert real_lm.encode_prompt(rec["prompt"], rec["prompt_format"]) == rec["prompt_ids"]
    gold = rec["cases"]["diverse"]
    res = run(real_lm, rec, "diverse_beam", **gold["params"])
    assert [s.token_ids for s in res.sequences] == gold["sequences"]
    assert [s.score for s in res.sequences] == pytest.approx(gold["sequences_scores"], abs=SCORE_TOL)


@pytest.mark.parametrize("rec", RECORDS, ids=lambda r: r["prompt"][:16])
def test_beam_equals_transformers_4_56(real_lm, rec):
    gold = rec["cases"]["beam_group1"]
    res = run(real_lm, rec, "beam", num_beams=4)
    assert [s.token_ids for s in res.sequences] == gold["sequences"]
    assert [s.score for s in res.sequences] == pytest.approx(gold["sequences_scores"], abs=SCORE_TOL)


def test_one_group_without_penalty_is_plain_beam_and_loglik_is_the_models(real_lm):
    rec = RECORDS[2]
    res = run(real_lm, rec, "diverse_beam", num_beams=4, num_beam_groups=1, diversity_penalty=0.0)
    gold = rec["cases"]["beam_group1"]
    assert [s.token_ids for s in res.sequences] == gold["sequences"]
    assert [s.score for s in res.sequences] == pytest.approx(gold["sequences_scores"], abs=SCORE_TOL)
    # the recorded log-likelihood is the model's, teacher-forced without any cache tricks
    ids = rec["prompt_ids"]
    for s in res.sequences[:2]:
        full = ids + s.token_ids + ([2] if s.extra["eos"] else [])
        with torch.inference_mode():
            logits = real_lm.model(torch.tensor([full])).logits[0, len(ids) - 1:-1].float()
        ll = float(torch.log_softmax(logits, -1).gather(1, torch.tensor(full[len(ids):])[:, None]).sum())
        assert s.extra["loglik"] == pytest.approx(ll, abs=2e-3)
        assert s.extra["penalty"] == 0.0 and s.score == pytest.approx(s.extra["loglik"] / s.extra["gen_len"], abs=1e-4)
