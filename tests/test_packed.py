"""The exact fast CPU path (issue 21): float32 linears through oneDNN with packed weights (declab/models/packed.py)."""

import pytest
import torch

from declab.core.errors import UserError
from declab.models.packed import PackedLinear, available, pack_linears, use_packed

needs_onednn = pytest.mark.skipif(not available(), reason="this PyTorch has no oneDNN linear")


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_is_float32_exact_and_each_row_does_not_depend_on_the_batch(bias):
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(576, 1536, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(1536, 576, generator=g) * 0.05)
    packed = PackedLinear(lin)
    assert isinstance(packed, torch.nn.Linear) and packed.weight is lin.weight and packed.bias is lin.bias
    x = torch.randn(1, 17, 576, generator=g)                                  # [B, T, in]
    with torch.inference_mode():
        ref = lin(x)                                                          # MKL: the stock kernel
        got = packed(x)
        assert got.shape == ref.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)           # the same products, summed otherwise
        for t in (1, 2, 5, 16):                                               # a verification of t positions
            alone = torch.stack([packed(x[:, i:i + 1])[0, 0] for i in range(t)])
            assert torch.equal(packed(x[:, :t])[0], alone)                    # bit-identical to one at a time


@needs_onednn
def test_pack_linears_replaces_exactly_the_float32_linears():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(),
                                torch.nn.Sequential(torch.nn.Linear(8, 4, bias=False)),
                                torch.nn.Linear(4, 4).to(torch.bfloat16), torch.nn.Embedding(10, 4))
    x = torch.randn(3, 8)
    with torch.inference_mode():
        before = model[2](model[1](model[0](x)))
        assert pack_linears(model) == 2
        assert type(model[0]) is PackedLinear and type(model[2][0]) is PackedLinear
        assert type(model[3]) is torch.nn.Linear                              # bfloat16 stays stock
        torch.testing.assert_close(model[2](model[1](model[0](x))), before, rtol=1e-5, atol=1e-6)
        assert pack_linears(model) == 0                                       # already packed: nothing to do


def test_kernel_choice_follows_the_registry_field():
    if available():
        assert use_packed("auto", "cpu", torch.float32, "none") and use_packed("onednn", "cpu", torch.float32, "int8")
    assert not use_packed("transformers", "cpu", torch.float32, "none")
    assert not use_packed("auto", "cuda", torch.bfloat16, "none") and not use_packed("auto", "cpu", torch.float16,
                                                                                      "none")
    with pytest.raises(UserError, match="kernels: onednn needs float32 on a CPU"):
        use_packed("onednn", "cuda", torch.bfloat16, "none")


def test_registry_rejects_an_unknown_kernel_choice(tmp_path):
    from declab.models.registry import load_registry
    path = tmp_path / "models.yaml"
    path.write_text("models:\n  m:\n    source: {hub: a/b}\n    kernels: fast\n")
    with pytest.raises(UserError, match="field 'kernels': must be one of auto, onednn, transformers"):
        load_registry(path)
    path.write_text("models:\n  m:\n    source: {hub: a/b}\n    kernels: transformers\n")
    assert load_registry(path).get("m").kernels == "transformers"


@pytest.mark.model
@needs_onednn
def test_the_embedded_default_decodes_what_stock_generate_does(real_lm):
    """The default entry takes the packed path, the -stock entry keeps transformers' kernels, and the lab's greedy
    loop on the packed model gives stock `generate`'s tokens; a multi-position forward's rows equal step-by-step
    forwards up to float rounding (what speculative verification compares with)."""
    from declab.run import Run, RunRequest, get_lm
    stock = get_lm("smollm2-135m-instruct-stock")
    assert type(real_lm.model.lm_head) is PackedLinear and type(real_lm.model.model.layers[0].mlp.up_proj) is \
        PackedLinear
    assert type(stock.model.lm_head) is torch.nn.Linear and type(stock.model.model.layers[0].self_attn.q_proj) is \
        torch.nn.Linear
    for prompt, fmt in (("The capital of France is", "raw"), ("Name three primary colours.", "chat"),
                        ("Repeat exactly: the quick brown fox jumps over the lazy dog.", "chat")):
        ids = stock.encode_prompt(prompt, fmt)
        with torch.inference_mode():
            ref = stock.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=32,
                                       pad_token_id=stock.tokenizer.eos_token_id)[0, len(ids):].tolist()
        ref = ref[: next((i for i, t in enumerate(ref) if t in stock.eos_ids), len(ref))]
        got = Run(real_lm, RunRequest(model=real_lm.key, strategy="greedy", prompt=prompt, prompt_format=fmt,
                                      max_new_tokens=32)).run_to_end().sequences[0].token_ids
        assert got == ref, prompt
    ids = real_lm.encode_prompt("The capital of France is", "raw")
    new = [5, 260, 1789, 30, 216]
    both = real_lm.prefill(ids)
    together = real_lm.step([new], both.cache, all_logits=True).logits[0]    # [5, V]
    out = real_lm.prefill(ids)
    for i, t in enumerate(new):
        out = real_lm.step([[t]], out.cache)
        torch.testing.assert_close(out.logits[0], together[i], rtol=0, atol=2e-4)   # attention sums otherwise
