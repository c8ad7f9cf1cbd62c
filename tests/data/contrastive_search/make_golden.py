"""Make golden.json: transformers 4.x contrastive search on the embedded SmolLM2-135M-Instruct (float32, CPU).

Run ONCE, in a separate virtual environment (never needed by the test suite):

    python3 -m venv /tmp/hf4cs55 && /tmp/hf4cs55/bin/pip install torch==2.13.0 'transformers==4.55.4' safetensors
    /tmp/hf4cs55/bin/python tests/data/contrastive_search/make_golden.py ~/.cache/declab/models/smollm2-135m-instruct

Why 4.55.4 and not 4.56.2: in 4.56.x `generate(penalty_alpha=...)` no longer runs the in-core `_contrastive_search`;
it forwards to the Hub repo transformers-community/contrastive-search (custom_generate, remote code), which this
offline machine cannot fetch (tried: ConnectionError on custom_generate/generate.py). 4.55.4 is the last release
whose `generation/utils.py` still has `_contrastive_search` / `_ranking_fast` in core (checked in the wheel); the
Hub repo carries that same code.

The folder is the safetensors cache declab converts the embedded GGUF to (saved by transformers 5.x). 4.x cannot
read its `rope_parameters` block and would silently use rope_theta 10000 (docs/strategies.md#contrastive_search), so the model is copied to
a temporary folder whose config.json carries `rope_theta: 100000` instead. Parity check first: 4.x greedy is stored
beside the contrastive-search output and tests/test_contrastive_search_golden.py checks that declab's greedy gives
the same tokens, so a config mismatch would show there, not as a contrastive-search failure.
"""

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

PROMPTS = [("The city council met on Tuesday to discuss", "raw"),
           ("Once upon a time, in a small village,", "raw"),
           ("The history of the printing press begins", "raw"),
           ("Name three primary colours.", "chat")]
PENALTY_ALPHA, TOP_K, NEW_TOKENS, GREEDY_TOKENS = 0.6, 4, 32, 16
EOS = 2


def cut(ids):
    return ids[: ids.index(EOS)] if EOS in ids else ids


def main(src: str) -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        for f in Path(src).iterdir():
            shutil.copy(f, tmp)
        cfg = json.loads((Path(tmp) / "config.json").read_text())
        rope = cfg.pop("rope_parameters", {}) or {}
        cfg["rope_theta"] = float(rope.get("rope_theta", 100000.0))
        cfg["torch_dtype"] = cfg.pop("dtype", "float32")
        assert cfg["rope_theta"] == 100000.0, cfg["rope_theta"]
        (Path(tmp) / "config.json").write_text(json.dumps(cfg, indent=2))
        model = AutoModelForCausalLM.from_pretrained(tmp, torch_dtype=torch.float32).eval()
        # 4.x cannot resolve the 5.x tokenizer class name; the fast tokenizer file and template are the same data
        tok = PreTrainedTokenizerFast(tokenizer_file=str(Path(tmp) / "tokenizer.json"))
        tok.chat_template = (Path(tmp) / "chat_template.jinja").read_text()
    assert model.config.rope_theta == 100000.0
    cases = []
    for text, fmt in PROMPTS:
        if fmt == "chat":
            ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          tokenize=True)
        else:
            ids = tok(text, add_special_tokens=False)["input_ids"]
        x = torch.tensor([ids])
        with torch.inference_mode():
            greedy = model.generate(x, do_sample=False, max_new_tokens=GREEDY_TOKENS, pad_token_id=EOS)
            cs = model.generate(x, do_sample=False, penalty_alpha=PENALTY_ALPHA, top_k=TOP_K,
                                max_new_tokens=NEW_TOKENS, pad_token_id=EOS)
        case = {"prompt": text, "prompt_format": fmt, "prompt_ids": list(ids),
                "greedy_ids": cut(greedy[0, len(ids):].tolist()),
                "contrastive_ids": cut(cs[0, len(ids):].tolist()),
                "contrastive_text": tok.decode(cut(cs[0, len(ids):].tolist()))}
        print(json.dumps(case, ensure_ascii=False))
        cases.append(case)
    out = {"made_by": "tests/data/contrastive_search/make_golden.py",
           "transformers": transformers.__version__, "torch": torch.__version__, "dtype": "float32",
           "device": "cpu", "penalty_alpha": PENALTY_ALPHA, "top_k": TOP_K, "max_new_tokens": NEW_TOKENS,
           "greedy_max_new_tokens": GREEDY_TOKENS, "cases": cases}
    path = Path(__file__).resolve().parent / "golden.json"
    path.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path.home() / ".cache/declab/models/smollm2-135m-instruct"))
