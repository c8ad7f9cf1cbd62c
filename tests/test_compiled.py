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
def tiny_registry(tmp_path_factory):
    """One tiny random Llama folder as four registry entries: compiled steps and transformers' stock kernels, in
    float32 and with dynamic int8 linears."""
    from declab.models.loading import embedded_folder
    base = load_registry().get(load_registry().default)
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.2)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(embedded_folder(base)), local_files_only=True).save_pretrained(folder)
    registry = folder / "models.yaml"
    entry = ("    source: {{path: {f}}}\n    chat: false\n    dtype: float32\n    device: cpu\n    kernels: {k}\n"
             "    quantization: {q}\n")
    registry.write_text("models:\n" + "".join(f"  {key}:\n" + entry.format(f=folder, k=k, q=q) for key, k, q in (
        ("tiny-compiled", "compiled", "none"), ("tiny-stock", "transformers", "none"),
        ("tiny-int8-compiled", "compiled", "int8"), ("tiny-int8", "auto", "int8"))))
    mp = pytest.MonkeyPatch()
    mp.setenv("DECLAB_MODELS", str(registry))
    yield load_registry()
    mp.undo()


@pytest.fixture(scope="module")
def tiny_pair(tiny_registry):
    from declab.models.loading import load_lm
    compiled, _ = load_lm(tiny_registry.get("tiny-compiled"))     # compiles the 128-position bucket at load
    stock, _ = load_lm(tiny_registry.get("tiny-stock"))
    return compiled, stock


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


@pytest.mark.model
def test_a_second_bucket_compiles_once_and_each_bucket_keeps_its_own_graph(tiny_pair):
    """A run past 128 positions compiles the 256 bucket; afterwards steps skip the guards the buckets share, so a
    128-bucket run must still take its own graph (tokens equal to the stock kernels' on both)."""
    compiled, stock = tiny_pair
    long = greedy(compiled, 150)                              # prompt + 150 > 128: the 256 bucket
    assert set(compiled.compiled.compile_s) == {128, 256}
    assert long.sequences[0].token_ids == greedy(stock, 150).sequences[0].token_ids
    assert greedy(compiled, 20).sequences[0].token_ids == greedy(stock, 20).sequences[0].token_ids
    assert greedy(compiled, 140).sequences[0].token_ids == long.sequences[0].token_ids[:140]


def test_bucket_lengths():
    assert [bucket(n) for n in (1, 57, 128, 129, 300, 4096)] == [128, 128, 128, 256, 512, 4096]


def test_registry_refuses_compiled_with_bitsandbytes(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("models:\n  a: {source: {hub: x/y}, kernels: compiled, quantization: bnb-4bit}\n")
    with pytest.raises(UserError, match="kernels.*compiled needs quantization none or int8"):
        load_registry(p)


@pytest.mark.model
def test_compiled_int8_calls_fbgemm_int8_linears_and_decodes_like_them_eagerly(tiny_registry, monkeypatch):
    """kernels: compiled with quantization: int8: every linear (the LM head too) is an Int8Linear behind the
    opaque declab::int8_linear op; one compiled step runs each of them once, and a greedy run decodes what the same
    modules decode without the compiled graph."""
    import copy
    from declab.models.compiled import Int8Linear
    from declab.models.loading import load_lm
    lm, _ = load_lm(tiny_registry.get("tiny-int8-compiled"))
    int8 = [m for m in lm.model.modules() if isinstance(m, Int8Linear)]
    assert len(int8) == 2 * 7 + 1 and isinstance(lm.model.lm_head, Int8Linear)         # q k v o gate up down, head
    assert not any(type(m) is torch.nn.Linear for m in lm.model.modules())
    assert set(lm.compiled.compile_s) == {128}                                           # compiled at load
    calls, kernel = [], torch.fbgemm_linear_int8_weight_fp32_activation
    monkeypatch.setattr(torch, "fbgemm_linear_int8_weight_fp32_activation",
                        lambda *a: calls.append(1) or kernel(*a))
    out = lm.prefill(lm.as_ids([1, 2, 3]), max_len=40)
    assert len(calls) == len(int8)                                                       # the eager prefill
    calls.clear()
    lm.step([[4]], out.cache)                                                            # one compiled step
    assert len(calls) == len(int8), "the compiled step did not run each int8 linear once"
    monkeypatch.undo()
    eager = copy.copy(lm)
    eager.compiled = None                                    # the same modules, eager forwards on a dynamic cache
    a, b = greedy(lm, 40), greedy(eager, 40)
    assert len(a.sequences[0].token_ids) == 40 and a.sequences[0].token_ids == b.sequences[0].token_ids
    ta, tb = (r.frame[r.frame.kind == "token"].reset_index(drop=True) for r in (a, b))
    for col in ("logprob", "entropy"):
        assert torch.allclose(torch.tensor(ta[col].to_numpy()), torch.tensor(tb[col].to_numpy()), atol=1e-3), col


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
