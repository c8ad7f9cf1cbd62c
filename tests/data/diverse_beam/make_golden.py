"""Make the golden outputs of tests/test_diverse_beam_golden.py ONCE with transformers 4.56.2 (not in the main venv).

transformers 5 removed group beam search from its core, so the reference lives in a separate virtual environment:

    python3 -m venv /tmp/hf4beam && /tmp/hf4beam/bin/pip install torch==2.13.0 'transformers==4.56.2'
    /tmp/hf4beam/bin/python tests/data/diverse_beam/make_golden.py /tmp/hf4beam_model

MODEL_DIR is a copy of the converted embedded model (~/.cache/declab/models/smollm2-135m-instruct) whose
config.json has `rope_theta: 100000` at top level instead of the 5.x `rope_parameters` block (4.x cannot read that
block and silently falls back to rope_theta 10000). Prompt ids come from declab itself (`LM.encode_prompt` run with
.venv/bin/python in a subprocess), so both sides see the same tokens. Before writing anything the script checks
parity: 4.56 greedy must equal declab's greedy on every prompt.

Per prompt it records, all on CPU in float32 with the default (sdpa) attention:
- "diverse": generate(num_beams=4, num_beam_groups=2, diversity_penalty=1.0, num_return_sequences=4)
  (`_group_beam_search` with BeamSearchScorer and HammingDiversityLogitsProcessor);
- "beam_group1": the same code path with one group and no penalty (generate routed to `_group_beam_search` by
  patching GenerationConfig.get_generation_mode), which is the BeamSearchScorer beam search of 4.36-4.49;
- "beam_generate": plain generate(num_beams=4, num_return_sequences=4), i.e. 4.56's vectorised `_beam_search`.
Each with its `sequences` (generated ids, cut at the first EOS) and `sequences_scores` (float32, as returned).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM
from transformers.generation.configuration_utils import GenerationConfig, GenerationMode

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
OUT = HERE / "golden.json"
EOS = 2
MAX_NEW = 24
PROMPTS = [("Name three primary colours.", "chat"), ("The capital of France is", "raw"),
           ("What is 2+2? Answer in one word.", "chat")]
CASES = {
    "diverse": dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0, num_return_sequences=4),
    "beam_group1": dict(num_beams=4, num_return_sequences=4),
    "beam_generate": dict(num_beams=4, num_return_sequences=4),
}

ENCODE = """
import json, sys
from declab.run import get_lm, Run, RunRequest
lm = get_lm("smollm2-135m-instruct")
out = []
for prompt, fmt in json.loads(sys.argv[1]):
    ids = lm.encode_prompt(prompt, fmt)
    greedy = Run(lm, RunRequest(model=lm.key, strategy="greedy", prompt=prompt, prompt_format=fmt,
                                max_new_tokens=%d)).run_to_end().sequences[0].token_ids
    out.append({"ids": ids, "greedy": greedy})
print("JSON" + json.dumps(out))
""" % MAX_NEW


def cut(ids: list[int]) -> list[int]:
    return ids[: ids.index(EOS)] if EOS in ids else ids


def main(model_dir: str) -> None:
    enc = subprocess.run([str(ROOT / ".venv/bin/python"), "-c", ENCODE, json.dumps(PROMPTS)], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    encoded = json.loads(enc.stdout.split("JSON", 1)[1])
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    assert model.config.rope_theta == 100000.0, model.config.rope_theta
    force_group = {"on": False}
    original_mode = GenerationConfig.get_generation_mode

    def patched_mode(self, assistant_model=None):
        mode = original_mode(self, assistant_model)
        return GenerationMode.GROUP_BEAM_SEARCH if force_group["on"] and mode == GenerationMode.BEAM_SEARCH else mode
    GenerationConfig.get_generation_mode = patched_mode

    records = []
    for (prompt, fmt), e in zip(PROMPTS, encoded):
        ids = torch.tensor([e["ids"]])
        with torch.inference_mode():
            greedy = model.generate(ids, do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=EOS)[0, ids.shape[1]:]
        assert cut(greedy.tolist()) == e["greedy"], ("greedy parity failed", prompt, greedy.tolist(), e["greedy"])
        rec = {"prompt": prompt, "prompt_format": fmt, "prompt_ids": e["ids"], "max_new_tokens": MAX_NEW, "cases": {}}
        for name, kw in CASES.items():
            force_group["on"] = name == "beam_group1"
            with torch.inference_mode():
                out = model.generate(ids, do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=EOS,
                                     eos_token_id=EOS, return_dict_in_generate=True, output_scores=True, **kw)
            force_group["on"] = False
            seqs = [cut(row[ids.shape[1]:].tolist()) for row in out.sequences]
            rec["cases"][name] = {"params": kw, "sequences": seqs,
                                  "sequences_scores": [float(s) for s in out.sequences_scores]}
            print(prompt, name, [round(float(s), 4) for s in out.sequences_scores], file=sys.stderr)
        records.append(rec)
    OUT.write_text(json.dumps({"transformers": transformers.__version__, "torch": torch.__version__,
                               "made_by": "tests/data/diverse_beam/make_golden.py", "eos": EOS, "pad": EOS,
                               "records": records}, indent=1) + "\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/hf4beam_model")
