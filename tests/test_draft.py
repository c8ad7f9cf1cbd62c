"""The embedded draft model (built by tools/draft_build.py, loaded by declab/models/draft.py): the build pipeline
on a tiny random Llama (features, distillation lowers the KL, save -> load gives a model whose forward is exactly
frozen layers + adapter + shared head), the models.yaml `draft` source, and the stored draft for
SmolLM2-135M-Instruct (small, loads offline, reuses the target's first layers and head, agrees with the target far
above an untrained sub-network)."""

from __future__ import annotations

import copy

import pytest
import torch

from declab.core.errors import UserError
from declab.models.draft import DEFAULT_WEIGHTS, SubVocabHead, build_draft_model, read_draft_info
from declab.models.registry import load_registry
from declab.run import get_lm
from tools import draft_build as D
from tools.draft_data import build_prompts


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def tiny_rows(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_ids": torch.randint(3, 97, (5,), generator=g).tolist(),
             "answer_ids": torch.randint(3, 97, (int(torch.randint(6, 14, (), generator=g)),), generator=g).tolist()}
            for _ in range(n)]


def test_teacher_features_match_a_plain_forward(tiny):
    rows = tiny_rows(3)
    feats = D.teacher_features(tiny, rows, frozen=2, top_k=5, batch=2, log=lambda m: None)
    for r, f in zip(rows, feats):
        ids = torch.tensor([r["prompt_ids"] + r["answer_ids"]])
        with torch.inference_mode():
            o = tiny(input_ids=ids, output_hidden_states=True)
        n_p, L = len(r["prompt_ids"]), ids.shape[1]
        assert f["feats"][2].shape == (L - 1, 32) and f["top_idx"].shape == (L - n_p, 5)
        assert torch.allclose(f["feats"][2].float(), o.hidden_states[2][0, : L - 1], atol=2e-3)
        logp = o.logits[0, n_p - 1: L - 1].log_softmax(-1)
        assert torch.equal(f["top_idx"][:, 0].long(), logp.argmax(-1))
        assert torch.allclose(f["top_logp"].float(), logp.topk(5, -1).values, atol=2e-3)


@pytest.mark.parametrize("weights", ["float16", "int8"])
def test_training_lowers_the_kl_and_the_saved_draft_is_frozen_layers_plus_adapter(tiny, tmp_path, weights):
    rows = tiny_rows(24)
    recs = D.with_features(rows, D.teacher_features(tiny, rows, frozen=2, top_k=8, log=lambda m: None))
    feats = {"train": recs[:20], "held_out": recs[20:]}
    adapter, info = D.train_adapter(copy.deepcopy(tiny), feats, frozen=2, num_layers=1, init="last", epochs=6,
                                    lr=3e-3, max_tokens=64, eval_every=1000, log=lambda m: None)
    first, last = info["history"][0], info["history"][-1]
    train_kl = D.evaluate_adapter(adapter, tiny.lm_head.weight.detach(), feats["train"], 2, only_greedy=False)["kl"]
    assert info["source_layers"] == [3] and last["step"] == info["steps"] > 0
    assert train_kl < D.evaluate_adapter(D.Adapter(tiny, 2, 1, "last"), tiny.lm_head.weight.detach(),
                                         feats["train"], 2, only_greedy=False)["kl"]
    assert first["kl"] > 0
    path = tmp_path / "d.safetensors"
    D.save_draft(adapter, info, path, weights=weights)
    assert read_draft_info(path)["frozen"] == 2 and read_draft_info(path)["weights"] == weights
    model, _ = build_draft_model(copy.deepcopy(tiny), path)
    assert model.config.num_hidden_layers == 3
    # the draft's layers 0..1 are the target's, its top is the (float16-stored) adapter, the head is shared
    for a, b in zip(model.model.layers[:2].parameters(), tiny.model.layers[:2].parameters()):
        assert torch.equal(a, b)
    assert torch.equal(model.lm_head.weight, tiny.lm_head.weight)
    r = rows[0]
    ids = torch.tensor([r["prompt_ids"] + r["answer_ids"]])
    with torch.inference_mode():
        h = tiny(input_ids=ids, output_hidden_states=True).hidden_states[2]
        for name, t in adapter.body.state_dict().items():           # what the storage keeps
            if weights == "int8" and t.dim() == 2 and not name.startswith("embed"):
                scale = (t.abs().amax(1, keepdim=True) / 127).clamp_min(1e-12).half().float()
                t.copy_(torch.round(t / ((t.abs().amax(1, keepdim=True) / 127).clamp_min(1e-12))).clamp(-127, 127)
                        * scale)
            else:
                t.copy_(t.half().float())
        want = adapter(h, torch.ones(ids.shape, dtype=torch.long)) @ tiny.lm_head.weight.T
        got = model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4)


def test_registry_checks_draft_sources(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("models:\n  a: {source: {hub: x/y}}\n  d: {source: {draft: w.safetensors}}\n")
    with pytest.raises(UserError, match="needs the key of its base model"):
        load_registry(p)
    p.write_text("models:\n  a: {source: {hub: x/y}}\n  d: {source: {draft: w.safetensors, base: ghost}}\n")
    with pytest.raises(UserError, match="unknown base model 'ghost'"):
        load_registry(p)
    p.write_text("models:\n  a: {source: {hub: x/y}, pairs: [d]}\n  d: {source: {draft: w.safetensors, base: a}}\n")
    spec = load_registry(p).get("d")
    assert spec.source_text == "draft w.safetensors on a"


def test_sub_vocabulary_head_is_the_full_head_restricted(tiny):
    ids = torch.tensor([0, 3, 5, 40, 96])
    head = SubVocabHead(tiny.lm_head.weight, ids)
    h = torch.randn(2, 3, 32)
    full = tiny.lm_head(h)                                             # [2, 3, V]
    got = head(h)
    assert got.shape == full.shape and head.out_features == 97
    assert torch.allclose(got[..., ids], full[..., ids], atol=1e-6)
    outside = torch.ones(97, dtype=torch.bool)
    outside[ids] = False
    assert torch.isneginf(got[..., outside]).all()                     # never drafted: q = 0 outside


def test_frequency_vocabulary_keeps_frequent_and_special_tokens():
    class Tok:
        all_special_ids = [0, 2]

        def __len__(self):
            return 50

        def __call__(self, docs, add_special_tokens=False):
            return {"input_ids": [[7, 7, 7, 9] for _ in docs]}
    rows = [{"prompt_ids": [11, 12], "answer_ids": [12, 12, 30]}]
    ids = D.frequency_vocab(Tok(), rows, size=6, docs=["a", "b"], log=lambda m: None).tolist()
    assert ids == sorted(ids) and len(ids) == 6
    assert {0, 2, 7, 12} <= set(ids)                                    # special + the most frequent
    assert 49 not in ids                                                # unseen, late merge


# ------------------------------------------------------------------------------------------------ stored draft
def test_stored_draft_is_small_and_described():
    assert DEFAULT_WEIGHTS.stat().st_size <= 25e6
    info = read_draft_info(DEFAULT_WEIGHTS)
    assert info["base"] == "smollm2-135m-instruct" and info["frozen"] >= 1 and info["adapter_layers"] >= 1
    reg = load_registry()
    assert reg.get("smollm2-135m-instruct").pairs[0] == "smollm2-135m-draft"
    assert reg.get("smollm2-135m-draft").source["base"] == "smollm2-135m-instruct"


@pytest.mark.model
def test_stored_draft_reuses_the_target_and_agrees_with_it(real_lm):
    draft = get_lm("smollm2-135m-draft")
    info = read_draft_info(DEFAULT_WEIGHTS)
    E = info["frozen"]
    assert draft.vocab_size == real_lm.vocab_size and draft.eos_ids == real_lm.eos_ids
    assert draft.model.config.num_hidden_layers == E + info["adapter_layers"]
    for a, b in zip(draft.model.model.layers[:E].parameters(), real_lm.model.model.layers[:E].parameters()):
        assert torch.equal(a, b)
    head = draft.model.lm_head                                          # FR-Spec: the target's rows for its vocabulary
    if isinstance(head, SubVocabHead):
        assert head.vocab_ids.numel() == info["draft_vocab"] and set(real_lm.eos_ids) <= set(head.vocab_ids.tolist())
        assert torch.equal(head.weight, real_lm.model.lm_head.weight[head.vocab_ids])
    else:
        assert torch.equal(head.weight, real_lm.model.lm_head.weight)
    # teacher-forced top-1 agreement on the target's greedy answers to two held-out prompts
    rows = []
    for prompt in build_prompts()[1][:2]:
        ids = real_lm.encode_prompt(prompt, "chat")
        with torch.inference_mode():
            out = real_lm.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=40,
                                         pad_token_id=2)[0, len(ids):].tolist()
        rows.append({"prompt_ids": ids, "answer_ids": out})
    result = D.agreement(real_lm.model, draft.model, rows)
    assert result["top1_agreement"] >= 0.4, result          # an untrained early exit agrees on <= 6%
