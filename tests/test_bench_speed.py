"""The issue-21 benches' own logic, on the scripted fake (the timings themselves are `make bench`'s)."""

import json

from bench import speculative_cpu
from tests.fake import FakeLM, hashed_logits, no_eos


def test_the_input_grounded_prompt_set_is_kept_in_bench_and_has_at_least_12_tasks():
    rows = [json.loads(line) for line in speculative_cpu.GROUNDED_FILE.read_text().splitlines() if line.strip()]
    assert len(rows) >= 12 and len({r["name"] for r in rows}) == len(rows)
    assert {r["task"] for r in rows} <= {"quote", "rename", "edit", "correct", "reformat"}
    assert all(len(r["prompt"]) > 80 for r in rows)               # each gives a text or code to work on
    assert speculative_cpu.grounded_prompts()[0] == (rows[0]["name"], rows[0]["prompt"])


def test_the_speculative_bench_checks_identity_and_reports_medians(fake_registry):
    lm = FakeLM(no_eos(hashed_logits(len(FakeLM().vocab))))
    sets = {"grounded": lambda: [("repeat", " the cat sat on the mat the cat sat on the mat")]}
    configs = {"grounded": {"prompt_lookup g16": ("speculative", {"draft": "prompt_lookup", "num_draft_tokens": 8})}}
    rows, mismatches = speculative_cpu.measure(lm, sets, configs, tokens=12, reps=2, prompt_format="raw")
    (row,) = rows
    assert not mismatches and row["same"] == "1/1" and row["prompts"] == 1
    assert row["speedup"] > 0 and row["decode_speedup"] > 0 and row["tokens_per_round"] >= 1
    assert speculative_cpu.target_lines(rows)[0].startswith("target: grounded")
