"""models.yaml `kernels: compiled` (declab/models/compiled.py): the per-token loop's decoding steps through
torch.compile on a bucketed StaticCache. A tiny random Llama (2 layers, the embedded tokenizer) keeps the compile
short; its speed on the embedded model is `make bench`'s row, and its token equality with `generate` there too."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, StaticCache

from declab.core.errors import UserError
from declab.models.compiled import bucket
from declab.models.registry import load_registry
from declab.run import Run, RunRequest

PROMPT = "The history of the printing press begins"


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """The same tiny random Llama folder as two registry entries: compiled steps and transformers' stock kernels."""
    from declab.models.loading import embedded_folder, load_lm
    base = load_registry().get(load_registry().default)
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.2)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(embedded_folder(base)), local_files_only=True).save_pretrained(folder)
    registry = folder / "models.yaml"
    entry = "    source: {{path: {f}}}\n    chat: false\n    dtype: float32\n    device: cpu\n    kernels: {k}\n"
    registry.write_text("models:\n  tiny-compiled:\n" + entry.format(f=folder, k="compiled")
                        + "  tiny-stock:\n" + entry.format(f=folder, k="transformers"))
    mp = pytest.MonkeyPatch()
    mp.setenv("DECLAB_MODELS", str(registry))
    reg = load_registry()
    compiled, _ = load_lm(reg.get("tiny-compiled"))          # compiles the 128-position bucket at load
    stock, _ = load_lm(reg.get("tiny-stock"))
    yield compiled, stock
    mp.undo()


def greedy(lm, n: int):
    return Run(lm, RunRequest(model=lm.key, strategy="greedy", prompt=PROMPT, prompt_format="raw",
                              max_new_tokens=n)).run_to_end()


@pytest.mark.model
def test_compiled_greedy_decodes_and_traces_what_the_stock_kernels_do(tiny_pair):
    """Token for token and column for column (logprob, entropy) the same run; with the StaticCache's position
    counter frozen into the graph (the pitfall in compiled.py) the tokens would go wrong from the third step."""
    compiled, stock = tiny_pair
    assert isinstance(compiled.new_cache(max_len=60), StaticCache) and compiled.new_cache(60).get_max_length() == 128
    assert compiled.compiled.compile_s and set(compiled.compiled.compile_s) == {128}
    a, b = greedy(compiled, 40), greedy(stock, 40)
    assert len(a.sequences[0].token_ids) == 40 and a.sequences[0].token_ids == b.sequences[0].token_ids
    ta, tb = (r.frame[r.frame.kind == "token"].reset_index(drop=True) for r in (a, b))
    assert list(ta.columns) == list(tb.columns)
    for col in ("logprob", "entropy"):
        assert torch.allclose(torch.tensor(ta[col].to_numpy()), torch.tensor(tb[col].to_numpy()), atol=1e-4), col


@pytest.mark.model
def test_runs_in_one_bucket_reuse_the_compiled_graph(tiny_pair):
    from torch._dynamo.utils import counters
    compiled, stock = tiny_pair
    greedy(compiled, 8)
    before = dict(counters["stats"])
    c = greedy(compiled, 30)                                  # another length in the same 128 bucket
    assert dict(counters["stats"]) == before, "a run in a compiled bucket compiled again"
    assert c.sequences[0].token_ids == greedy(stock, 30).sequences[0].token_ids


def test_bucket_lengths():
    assert [bucket(n) for n in (1, 57, 128, 129, 300, 4096)] == [128, 128, 128, 256, 512, 4096]


def test_registry_refuses_compiled_with_quantization(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("models:\n  a: {source: {hub: x/y}, kernels: compiled, quantization: int8}\n")
    with pytest.raises(UserError, match="kernels.*compiled needs quantization none"):
        load_registry(p)


@pytest.mark.model
def test_a_step_that_cannot_compile_is_one_line(tiny_pair, monkeypatch):
    """No C++ compiler (or anything else Inductor trips on) at load: a UserError naming the fix, not a traceback."""
    from declab.models.compiled import CompiledStep
    compiled, _ = tiny_pair

    def broken(*args, **kwargs):
        raise RuntimeError("InductorError: CppCompileError: C++ compile error\nmore lines")
    monkeypatch.setattr(torch, "compile", broken)
    step = CompiledStep(compiled.model)
    with pytest.raises(UserError, match=r"kernels: compiled could not compile .*CppCompileError.*Use kernels: auto"):
        step.warm(compiled.new_cache, compiled.as_ids([1, 2, 3]), 40)
