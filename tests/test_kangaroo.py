"""Kangaroo (strategies/kangaroo.py, declab/models/split.py; docs/strategies.md#spec_tree, dossier D.4) on the embedded
model: the split forward (shallow layers, then deep layers, on one shared cache) equals a full target forward; greedy
spec_tree with drafter=kangaroo equals target greedy; the confidence stop rule eta; the round's cache arithmetic;
the frozen LM head is the target's own; the shipped adapter file; the training tool on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from declab.models.heads import heads_file, load_heads, load_module, read_heads_info
from declab.models.split import KangarooAdapter, cache_length, cache_lengths, crop_layers, deep, full, shallow
from declab.run import Run, RunRequest
from strategies.kangaroo import KangarooDrafter
from strategies.two_model import ModelState
from tools.heads_kangaroo import held_out_numbers, train_kangaroo

PROMPTS = ("Rewrite this sentence in the past tense: The cat sits on the mat and looks at the birds.",
           "Give me three tips for staying focused while studying.")


def ids(res):
    return res.sequences[0].token_ids


def stored_adapter(lm) -> KangarooAdapter:
    """The shipped adapter read straight from its file (the strategy gets the same through lm.trained_head)."""
    tensors, info = load_heads(heads_file(lm, "kangaroo"))
    return load_module(KangarooAdapter(lm.model.config, int(info["exit_layer"])), tensors, "heads.")


@pytest.mark.model
def test_split_forward_equals_a_full_forward(real_lm):
    lm, E = real_lm, 2
    seq = lm.encode_prompt(PROMPTS[0], "chat") + [504, 2103, 282, 253, 1345, 30, 7, 11]
    ref = lm.prefill(seq, all_logits=True).logits[0]                              # [T, V]
    cache = DynamicCache(config=lm.model.config)
    n0 = len(seq) - 8
    rows = [full(lm, seq[:n0], cache, E)]                                         # prefill, [n0, V]
    drafts = [shallow(lm, [t], cache, E) for t in seq[n0:n0 + 4]]                 # drafting: layers < E run ahead
    assert cache_lengths(cache, 4) == [n0 + 4, n0 + 4, n0, n0]
    verify = deep(lm, torch.cat(drafts, dim=1), cache, E)                         # multi-token verify, [4, V]
    assert verify.shape == (4, lm.vocab_size) and verify.dtype == torch.float32
    rows.append(verify[:2])
    crop_layers(cache, n0 + 2)                                                    # 1 draft accepted after the root
    assert set(cache_lengths(cache, len(cache.layers))) == {n0 + 2}
    rows.append(deep(lm, shallow(lm, seq[n0 + 2:n0 + 3], cache, E), cache, E))    # one-token step
    rows.append(full(lm, seq[n0 + 3:], cache, E))                                 # a 5-token step
    out = torch.cat(rows)                                                         # [T, V]
    assert out.shape == ref.shape
    assert float((out - ref).abs().max()) < 1e-3
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


@pytest.mark.model
def test_greedy_spec_tree_with_kangaroo_equals_target_greedy(real_lm):
    def go(prompt, strategy, **params):
        return Run(real_lm, RunRequest(model=real_lm.key, strategy=strategy, prompt=prompt, prompt_format="chat",
                                       params=params, max_new_tokens=32)).run_to_end()
    for prompt in PROMPTS:
        greedy = ids(go(prompt, "greedy"))
        res = go(prompt, "spec_tree", drafter="kangaroo", tree_budget=6, tree_depth=6, measure_speedup=False)
        assert res.status == "ok", res.error
        assert ids(res) == greedy
        m = res.meta["metrics"]
        assert m["drafter"] == "kangaroo" and m["mean_accepted_length"] >= 1.0
        props = res.frame[res.frame["kind"] == "propose"]
        assert len(props) and (props["source"] == "kangaroo").all()
        assert ((props["q"] > 0) & (props["q"] <= 1)).all()
    assert isinstance(real_lm.trained_head("kangaroo").module, KangarooAdapter)


def _round(lm, drafter, seq, budget=6):
    """One spec_tree round by hand (greedy): propose, verify, accept the longest matching prefix + the bonus."""
    target = ModelState(lm, "target")
    tree = drafter.propose(seq, budget, budget, 3, None)
    logits, ms, states = drafter.verify_forward(target, seq, tree)
    path = [0]
    for u in range(1, len(tree)):
        if int(logits[u - 1].argmax()) != tree.tokens[u]:
            break
        path.append(u)
    new = list(seq) + [tree.tokens[u] for u in path[1:]] + [int(logits[path[-1]].argmax())]
    drafter.observe(new, tree, logits, path)
    return tree, logits, ms, states, target, new


@pytest.mark.model
def test_stop_rule_eta_cache_arithmetic_and_the_frozen_head(real_lm):
    lm = real_lm
    seq = lm.encode_prompt("Count from one to twenty in words, separated by commas.", "chat")
    adapter = stored_adapter(lm)
    eager = KangarooDrafter(lm, 0.0, lm.eos_ids, adapter=adapter)     # eta = 0: never stops early
    shy = KangarooDrafter(lm, 1.0, lm.eos_ids, adapter=adapter)       # eta = 1: every draft is unsure
    tree, logits, ms, states, target, new = _round(lm, eager, seq)
    chain = all(len(c) <= 1 for c in tree.children)
    assert chain and tree.scheme == "deterministic" and tree.tokens[0] == seq[-1]
    assert len(tree) - 1 == 6 or tree.tokens[-1] in lm.eos_ids               # full length (branching ignored)
    assert logits.shape == (len(tree), lm.vocab_size) and states is None and ms > 0
    assert all(0 < q <= 1 for q in tree.q[1:])
    assert target.cache is eager.cache and target.forwards == 2               # prefill + the verify forward
    # the cache holds exactly new[:-1] in every layer; the adapter's cache plus the pending states too
    L = len(lm.model.model.layers)
    assert set(cache_lengths(eager.cache, L)) == {len(new) - 1}
    pending = 0 if eager.pending is None else eager.pending.shape[1]
    assert cache_length(eager.acache, 0) + pending == len(new) - 1
    assert target.ids == new[:-1]
    # the next round continues exactly: its target logits equal a plain forward of the sequence
    tree2, logits2, *_ = _round(lm, eager, new)
    ref = lm.prefill(new + tree2.tokens[1:], all_logits=True).logits[0, len(new) - 1:]   # [N, V]
    assert float((logits2 - ref).abs().max()) < 1e-3
    one, *_ = _round(lm, shy, seq)
    assert len(one) == 2                                                      # one drafted token
    # shapes and weights: the LM head is the target's own tensor, the adapter is small and holds no head
    assert eager.head is lm.model.lm_head and eager.head.weight.data_ptr() == lm.model.lm_head.weight.data_ptr()
    assert isinstance(eager.adapter, KangarooAdapter) and eager.exit_layer == 2
    names = set(eager.adapter.state_dict())
    assert names == {"input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                     "self_attn.v_proj.weight", "self_attn.o_proj.weight", "norm.weight"}
    assert not any(p.requires_grad for p in eager.adapter.parameters())
    with torch.inference_mode():
        z = eager.adapter(torch.randn(1, 3, lm.model.config.hidden_size))
    assert z.shape == (1, 3, lm.model.config.hidden_size)


@pytest.mark.model
def test_the_shipped_adapter_file(real_lm):
    path = heads_file(real_lm, "kangaroo")
    info = read_heads_info(path)
    assert path.stat().st_size <= 10_000_000
    assert info["exit_layer"] == 2 and info["weights"] == "float16"
    for key in ("lr", "epochs", "steps", "positions", "train_s"):
        assert key in info
    acc, chain = info["held_out"]["top1_by_offset"], info["held_out"]["chain_accepted_by_offset"]
    assert len(acc) >= 2 and info["held_out"]["positions"] > 0 and all(0 <= a <= 1 for a in acc)
    assert all(a >= b for a, b in zip(chain, chain[1:]))                     # a longer chain is only rarer


def test_held_out_numbers_count_fully_accepted_chains_and_simulate_tau():
    ok, conf = torch.tensor([True, True, False, True]), torch.tensor([0.9, 0.5, 0.9, 0.9])
    out = held_out_numbers([(ok, conf)], max_offset=3, etas=(0.0, 0.7, 1.0))
    assert out["chain_accepted_by_offset"] == [0.75, 0.3333, 0.0] and out["positions"] == 4
    assert out["top1_by_offset"] == [0.75, 0.4444, 0.0]          # conditional: 0.3333 / 0.75, 0 / 0.3333
    # eta 0: drafts run to the answer's end; eta 1: one draft; eta 0.7: t=0 stops after its 2nd draft (q 0.5)
    assert out["tau_by_eta"] == {"0.0": 2.0, "0.7": 2.0, "1.0": 1.75}


def test_train_kangaroo_writes_a_file_the_adapter_loads(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()

    def record(n_p, n_a):
        L, K = n_p + n_a, 8
        top = torch.randn(n_a, K).log_softmax(-1).sort(-1, descending=True).values
        return {"ids": list(range(L)), "n_prompt": n_p, "h_E": torch.randn(L, 64).half(),
                "top_idx": torch.randint(0, 300, (n_a, K), dtype=torch.int32), "top_logp": top.half()}
    states = {"train": [record(5, 9), record(3, 12), record(4, 6)], "held_out": [record(4, 7)]}
    out = tmp_path / "kangaroo.safetensors"
    info = train_kangaroo(states, model, out, time_limit_s=None, max_epochs=2, num_negatives=16, log=lambda m: None)
    assert info["exit_layer"] == 2 and info["steps"] >= 2 and len(info["held_out"]["top1_by_offset"]) == 6
    tensors, stored = load_heads(out)
    adapter = load_module(KangarooAdapter(cfg, stored["exit_layer"]), tensors, "heads.")
    assert stored["weights"] == "float16" and stored["held_out"] == info["held_out"]
    with torch.inference_mode():
        assert adapter(torch.randn(1, 4, 64)).shape == (1, 4, 64)
