"""The embedded draft model: a small, fast sibling of SmolLM2-135M-Instruct for speculative decoding, EAD and
contrastive decoding (issue 12).

The embedded default has no smaller same-tokenizer model on the machine, so we make one (Kangaroo-style
self-drafting, Liu et al. 2024, arXiv 2404.18911, with DistillSpec-style training, Zhou et al. 2023,
arXiv 2310.08461, and an FR-Spec head, Zhao et al. 2025, arXiv 2502.14856):

    draft(x) = head_N(norm_d(adapter(layers_target[0:E](embed(x)))))

* `layers_target[0:E]`: the target's first E decoder layers, frozen, taken from the target's weights at load time
  (not stored);
* `adapter`: A decoder layers of the same shape (initialised from the target's last A layers, `init=last`) and the
  final norm `norm_d`, the only trained weights; stored in the repository
  (`declab/models/drafts/<key>.safetensors`, package data: int8 matrices with a float16 scale per row, weight-only:
  the draft computes in float32), with the build recipe and its training history in the file's metadata;
* `embed`: the target's embedding; `head_N`: the target's tied LM head restricted to the N = 16,384 most frequent
  tokens (FR-Spec: counted over the training answers and the prose corpus, see `frequency_vocab`), -inf elsewhere.
  The head is the costliest single matmul of a 135M model with a 49k vocabulary; a third of it keeps the draft under
  40% of the target's cost with 12 layers. Speculative sampling stays exact (the draft just never proposes the rest).

It is a plain `LlamaForCausalLM` with E + A layers and a `SubVocabHead`, so the LM wrapper (KV cache, crop...) works
unchanged. Untrained sub-networks of this model agree with the target on <= 6% of greedy tokens (early exit after
6-15 layers, layer skipping), so the adapter is trained by distillation:

1. prompts (tools/draft_data.py): chat prompts from templates x topics plus standalone prompts; held-out prompts
   use a disjoint topic list;
2. the target answers every prompt (batched `generate`, greedy; sampled answers optional);
3. one teacher-forced target forward per sequence gives the features entering layer E (`hidden_states[E]`) and the
   target's top-K next-token log-probs at every answer position;
4. the adapter is trained on the precomputed features (the frozen layers never run again) to minimise the forward
   KL(p_target || q_draft) over the target's top-K tokens (renormalised, sampled softmax over the rest), answer
   positions only; the best held-out checkpoint is kept; training can continue from a stored draft (`--init-from`);
5. evaluation: teacher-forced top-1 agreement with the target on the held-out prompts' greedy answers, and the
   per-token cost ratio draft / target measured in one process (interleaved, batch 1, KV cache, median).

The shipped draft (E = 8, A = 4; 1,440 training prompts x 160 greedy tokens, 48 held-out prompts): see the README
section "Two-model decoding" for its measured agreement and cost.

    python -m tools.draft_build build [--work DIR] [--out PATH] [--frozen 8 --adapter-layers 4 --init last]
    python -m tools.draft_build vocab --weights PATH --out PATH [--draft-vocab N]   # re-set the FR-Spec vocabulary
    python -m tools.draft_build eval  [--weights PATH]              # agreement and cost ratio of a stored draft

An offline build tool (tools/ is not part of the installed engine). Loading the draft at run time is
declab.models: models.yaml source `{draft: PATH, base: KEY}`, declab/models/loading.py calls
declab.models.draft.build_draft_model.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch

from declab.core.corpus import default_corpus_documents
from declab.core.paths import cache_root
from declab.models.draft import DEFAULT_WEIGHTS, build_draft_model, load_tensors, pack_tensors, read_draft_info
from declab.models.loading import embedded_folder
from declab.models.registry import load_registry
from tools.draft_data import build_prompts

BASE_KEY = "smollm2-135m-instruct"

# build recipe (defaults; the stored file's metadata records what was used)
NUM_FROZEN = 8            # E: target layers reused as they are
NUM_ADAPTER = 4           # A: trained decoder layers
TOP_K = 64                # teacher log-probs kept per position
DRAFT_VOCAB = 16384       # tokens the draft's LM head keeps (FR-Spec; 0 = the whole vocabulary)
MAX_NEW = 160             # answer length generated per prompt
GEN_BATCH = 24
SAMPLE_TEMPERATURE = 0.8


def _threads(n: int | None = None) -> None:
    torch.set_num_threads(int(n or os.environ.get("DECLAB_DRAFT_THREADS", "1")))


def base_folder(key: str = BASE_KEY) -> Path:
    return embedded_folder(load_registry().get(key))


def load_base(key: str = BASE_KEY):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = base_folder(key)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(folder))
    return model, tok


def chat_ids(tok, prompt: str) -> list[int]:
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return [int(i) for i in ids]


# ------------------------------------------------------------------------------------------- stage 2: answers
def _topk_logp(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k ids (int32) and their log-probs (float16) of logits [N, V], without materialising log_softmax."""
    logits = logits.float()
    top = logits.topk(k, dim=-1)
    return top.indices.to(torch.int32), (top.values - logits.logsumexp(-1, keepdim=True)).to(torch.float16)


def generate_answers(model, tok, prompts: list[str], sample: bool, seed: int, batch: int = GEN_BATCH,
                     max_new: int = MAX_NEW, capture: int | None = None, top_k: int = TOP_K,
                     log=print) -> list[dict]:
    """The target's answers, batched with left padding. Returns [{'prompt_ids', 'answer_ids', 'sampled'}].
    With capture=E, each row also gets its distillation features, read off the generation itself (no second
    forward): 'feats' {E: the states entering layer E at every position but the last, float16} and the target's
    top-K next-token log-probs at the answer positions ('top_idx', 'top_logp', from the raw logits)."""
    out = []
    eos_cfg = model.generation_config.eos_token_id
    eos = set(eos_cfg if isinstance(eos_cfg, list) else [eos_cfg])
    pad = tok.pad_token_id if tok.pad_token_id is not None else 2
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    for b in range(0, len(prompts), batch):
        enc = [chat_ids(tok, p) for p in prompts[b:b + batch]]
        width = max(len(e) for e in enc)
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc])
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
        with torch.inference_mode():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=sample,
                                 temperature=SAMPLE_TEMPERATURE if sample else None, top_p=None, top_k=None,
                                 pad_token_id=pad, return_dict_in_generate=True, output_logits=capture is not None,
                                 output_hidden_states=capture is not None)
        seqs = gen.sequences
        if capture is not None:
            hs = torch.cat([step[capture] for step in gen.hidden_states], dim=1)      # [B, width + steps - 1, H]
            logits = torch.stack(gen.logits, dim=1)                                    # [B, steps, V]
        for j, (e, row) in enumerate(zip(enc, seqs[:, width:].tolist())):
            answer = []
            for t in row:
                answer.append(t)
                if t in eos:
                    break
            item = {"prompt_ids": e, "answer_ids": answer, "sampled": sample}
            if capture is not None:
                n_p, n_a = len(e), len(answer)
                start = width - n_p                                                    # left padding
                item["feats"] = {capture: hs[j, start: start + n_p + n_a - 1].to(torch.float16).clone()}
                item["top_idx"], item["top_logp"] = _topk_logp(logits[j, :n_a], top_k)
            out.append(item)
        log(f"  generated {min(b + batch, len(prompts))}/{len(prompts)} ({'sampled' if sample else 'greedy'}) "
            f"{time.perf_counter() - t0:.0f}s")
    return out


NUM_TRAIN_PROMPTS = (480, 1440)   # greedy answers to the first 480 training prompts, then to 960 more
NUM_SAMPLED_TRAIN = 0             # training prompts also answered by sampling (0: greedy answers only)


def answer_parts(num_sampled_train: int | None = None) -> list[tuple[str, str, list[str], int]]:
    """(split, part, prompts, seed) of every answer set: greedy answers to the held-out prompts and to
    NUM_TRAIN_PROMPTS training prompts (in two parts: the build grew); with num_sampled_train > 0 also sampled
    answers (temperature SAMPLE_TEMPERATURE) to that many training prompts and to the held-out ones."""
    first, _ = build_prompts(NUM_TRAIN_PROMPTS[0])
    train, held = build_prompts(NUM_TRAIN_PROMPTS[1])
    seen = set(first)
    parts = [("held_out", "greedy", held, 1), ("train", "greedy", first, 2),
             ("train", "greedy-more", [p for p in train if p not in seen], 5)]
    n = NUM_SAMPLED_TRAIN if num_sampled_train is None else num_sampled_train
    if n > 0:
        parts += [("train", "sampled", first[:n], 3), ("held_out", "sampled", held, 4)]
    return parts


def stage_answers(work: Path, frozen: int = NUM_FROZEN, top_k: int = TOP_K, log=print) -> dict:
    """Answers for train/held-out prompts, greedy and sampled, each part cached in `work`. Sampled parts are
    generated with their features captured (saved beside them); greedy parts get theirs in `stage_features`."""
    data: dict = {"train": [], "held_out": []}
    model = tok = None
    for split, mode, prompts, seed in answer_parts():
        path = work / f"answers-{split}-{mode}.json"
        if not path.exists():
            if model is None:
                model, tok = load_base()
            capture = frozen if mode == "sampled" else None
            rows = generate_answers(model, tok, prompts, sample=mode == "sampled", seed=seed, capture=capture,
                                    top_k=top_k, log=log)
            if capture is not None:
                torch.save([{k: r[k] for k in ("feats", "top_idx", "top_logp")} for r in rows],
                           _feature_path(work, split, mode, frozen, top_k))
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps([{k: r[k] for k in ("prompt_ids", "answer_ids", "sampled")} for r in rows]))
            tmp.rename(path)
        for r in json.loads(path.read_text()):
            data[split].append(dict(r, part=mode))
    return data


def _feature_path(work: Path, split: str, mode: str, frozen: int, top_k: int) -> Path:
    return work / f"features-{split}-{mode}-E{frozen}-k{top_k}.pt"


# ------------------------------------------------------------------------------------------ stage 3: features
def teacher_features(model, rows: list[dict], frozen: int, top_k: int = TOP_K, batch: int = 8,
                     log=print) -> list[dict]:
    """One teacher-forced forward per (prompt + answer), batched with right padding: the states entering layer E
    (float16, every position but the last) and the top-K next-token log-probs at the answer positions."""
    feats: list[dict | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["prompt_ids"]) + len(rows[i]["answer_ids"]))
    head = model.get_output_embeddings().weight
    t0 = time.perf_counter()
    for b in range(0, len(order), batch):
        idx = order[b:b + batch]
        ids_list = [rows[i]["prompt_ids"] + rows[i]["answer_ids"] for i in idx]
        width = max(len(x) for x in ids_list)
        ids = torch.tensor([x + [0] * (width - len(x)) for x in ids_list])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids_list])
        with torch.inference_mode():
            o = model.model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
            for j, i in enumerate(idx):
                n_p, L = len(rows[i]["prompt_ids"]), len(ids_list[j])
                top_idx, top_logp = _topk_logp(o.last_hidden_state[j, n_p - 1: L - 1] @ head.T, top_k)
                feats[i] = {"feats": {frozen: o.hidden_states[frozen][j, : L - 1].to(torch.float16).clone()},
                            "top_idx": top_idx, "top_logp": top_logp}
        log(f"{min(b + batch, len(order))}/{len(order)} {time.perf_counter() - t0:.0f}s")
    return feats


def with_features(rows: list[dict], feats: list[dict]) -> list[dict]:
    """Training records: ids, n_prompt, sampled flag, feats, top_idx, top_logp."""
    return [{"ids": r["prompt_ids"] + r["answer_ids"], "n_prompt": len(r["prompt_ids"]),
             "sampled": r.get("sampled", False), **f} for r, f in zip(rows, feats)]


def stage_features(work: Path, data: dict, frozen: int = NUM_FROZEN, top_k: int = TOP_K, batch: int = 8,
                   log=print) -> dict:
    """Per split, one dict per sequence: ids, n_prompt, feats {E: states entering layer E, float16 [L-1, H]},
    the target's top-K next-token log-probs at the answer positions, sampled flag. Greedy parts: one teacher-forced
    target forward per sequence (cached per part); sampled parts: captured during generation."""
    out: dict = {"train": [], "held_out": []}
    model = None
    for split, mode, _prompts, _seed in answer_parts():
        rows = [r for r in data[split] if r["part"] == mode]
        path = _feature_path(work, split, mode, frozen, top_k)
        if not path.exists():
            if model is None:
                model, _ = load_base()
            torch.save(teacher_features(model, rows, frozen, top_k, batch,
                                        log=lambda m: log(f"  features {split}/{mode} {m}")), path)
        out[split] += with_features(rows, torch.load(path))
    return out


# ---------------------------------------------------------------------------------------------- stage 4: train
def adapter_config(base_config, num_layers: int):
    cfg = copy.deepcopy(base_config)
    cfg.num_hidden_layers = num_layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = list(cfg.layer_types)[:num_layers]
    return cfg


class Adapter(torch.nn.Module):
    """A decoder layers + final norm over features entering layer E (training view of the draft's top part)."""

    def __init__(self, base_model, frozen: int, num_layers: int, init: str = "next"):
        super().__init__()
        from transformers import LlamaModel
        cfg = adapter_config(base_model.config, num_layers)
        cfg.vocab_size = 8                                          # the embedding is never used here
        self.body = LlamaModel(cfg)
        layers = base_model.model.layers
        src = list(range(frozen, frozen + num_layers)) if init == "next" else \
            list(range(len(layers) - num_layers, len(layers)))
        for dst, s in enumerate(src):
            self.body.layers[dst].load_state_dict(layers[s].state_dict())
        self.body.norm.load_state_dict(base_model.model.norm.state_dict())
        self.source_layers = src

    def load_stored(self, path: Path, frozen: int) -> None:
        """Load the adapter layers and norm of a stored draft (declab/models/drafts/*.safetensors) with the same
        E and A."""
        state = {}
        for k, v in load_tensors(path).items():
            if k.startswith("model.layers."):
                i, rest = k[len("model.layers."):].split(".", 1)
                state[f"layers.{int(i) - frozen}.{rest}"] = v
            elif k.startswith("model.norm."):
                state[k[len("model."):]] = v
        missing = [k for k in self.body.state_dict() if k.startswith(("layers.", "norm.")) and k not in state]
        if missing:
            raise ValueError(f"{path}: no stored weights for {missing[:3]} (a draft with another E or A?)")
        self.body.load_state_dict(state, strict=False)

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.body(inputs_embeds=feats, attention_mask=mask, use_cache=False).last_hidden_state


def _batches(seqs: list[dict], max_tokens: int, rng: torch.Generator) -> list[list[int]]:
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]["ids"]))
    out, cur, width = [], [], 0
    for i in order:
        n = len(seqs[i]["ids"]) - 1
        if cur and max(width, n) * (len(cur) + 1) > max_tokens:
            out.append(cur)
            cur, width = [], 0
        cur.append(i)
        width = max(width, n)
    if cur:
        out.append(cur)
    perm = torch.randperm(len(out), generator=rng).tolist()
    return [out[p] for p in perm]


def _collate(seqs: list[dict], idx: list[int], frozen: int):
    """Right-padded features [B, W, H] (positions 0..L-2 of each sequence: the last token feeds nothing we score),
    mask, (row, position) of every answer position, the teacher's top-K ids and log-probs there."""
    width = max(len(seqs[i]["ids"]) - 1 for i in idx)
    H = seqs[idx[0]]["feats"][frozen].shape[-1]
    feats = torch.zeros(len(idx), width, H)
    mask = torch.zeros(len(idx), width, dtype=torch.long)
    pos, tidx, tlogp = [], [], []
    for j, i in enumerate(idx):
        s = seqs[i]
        L = len(s["ids"])
        feats[j, :L - 1] = s["feats"][frozen].float()
        mask[j, :L - 1] = 1
        n_p = s["n_prompt"]
        pos.append(torch.stack([torch.full((L - n_p,), j), torch.arange(n_p - 1, L - 1)], 1))
        tidx.append(s["top_idx"].long())
        tlogp.append(s["top_logp"].float())
    return feats, mask, torch.cat(pos), torch.cat(tidx), torch.cat(tlogp)


def distill_loss(hidden: torch.Tensor, head: torch.Tensor, pos: torch.Tensor, tidx: torch.Tensor,
                 tlogp: torch.Tensor, num_negatives: int | None = None,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`kl_loss` at the (row, position) pairs `pos` of hidden [B, W, H]."""
    return kl_loss(hidden[pos[:, 0], pos[:, 1]], head, tidx, tlogp, num_negatives, generator)


def kl_loss(h: torch.Tensor, head: torch.Tensor, tidx: torch.Tensor, tlogp: torch.Tensor,
            num_negatives: int | None = None, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward KL over the teacher's top-K (renormalised): sum_k p_k (log p_k - log q_k), mean over the N states
    h [N, H] (q = softmax(h head^T)). Also returns the top-1 agreement count (student argmax == teacher argmax).
    A hard label is K = 1 with log-prob 0 (the KL is then the cross-entropy).

    num_negatives=None: q is the student's softmax over the whole vocabulary. With a number, q is normalised over
    a sampled vocabulary only: every token in the batch's teacher top-K plus that many uniformly drawn others
    (sampled softmax; the head is the costliest part of a training step, and the batch's top-K tokens are a few
    thousand of 49k). Evaluation always uses the whole vocabulary."""
    p = tlogp.softmax(-1)                                                # [N, K] renormalised teacher
    if num_negatives is None:
        logq = (h @ head.T).log_softmax(-1)                              # [N, V]
        kl = (p * (p.clamp_min(1e-12).log() - logq.gather(1, tidx))).sum(-1).mean()
        return kl, (logq.argmax(-1) == tidx[:, 0]).sum()
    V = head.shape[0]
    extra = torch.randint(0, V, (num_negatives,), generator=generator)
    vocab, inverse = torch.unique(torch.cat([tidx.reshape(-1), extra]), return_inverse=True)
    local = inverse[: tidx.numel()].view_as(tidx)                       # teacher ids -> columns of the subset
    logq = (h @ head[vocab].T).log_softmax(-1)                           # [N, |subset|]
    kl = (p * (p.clamp_min(1e-12).log() - logq.gather(1, local))).sum(-1).mean()
    return kl, (vocab[logq.argmax(-1)] == tidx[:, 0]).sum()


def evaluate_adapter(adapter: Adapter, head: torch.Tensor, seqs: list[dict], frozen: int,
                     only_greedy: bool = True) -> dict:
    adapter.eval()
    n = agree = 0
    kl_sum = 0.0
    with torch.inference_mode():
        for i, s in enumerate(seqs):
            if only_greedy and s["sampled"]:
                continue
            feats, mask, pos, tidx, tlogp = _collate(seqs, [i], frozen)
            kl, a = distill_loss(adapter(feats, mask), head, pos, tidx, tlogp)
            n += len(pos)
            agree += int(a)
            kl_sum += float(kl) * len(pos)
    adapter.train()
    return {"top1_agreement": agree / max(n, 1), "kl": kl_sum / max(n, 1), "positions": n}


def train_adapter(base_model, feats: dict, frozen: int = NUM_FROZEN, num_layers: int = NUM_ADAPTER,
                  init: str = "next", epochs: float = 3.0, lr: float = 3e-4, max_tokens: int = 2048,
                  seed: int = 0, eval_every: int = 100, time_limit_s: float | None = None,
                  num_negatives: int | None = 4096, on_best=None, init_from: Path | None = None,
                  log=print) -> tuple[Adapter, dict]:
    """AdamW with linear warm-up and cosine decay; only the adapter's layers and norm are trained. init_from: a
    stored draft (same E and A) whose adapter weights replace the target-layer initialisation (continued training)."""
    torch.manual_seed(seed)
    rng = torch.Generator().manual_seed(seed)
    adapter = Adapter(base_model, frozen, num_layers, init)
    if init_from is not None:
        adapter.load_stored(Path(init_from), frozen)
    adapter.train()
    head = base_model.lm_head.weight.detach()                            # [V, H] frozen, shared
    train, held = feats["train"], feats["held_out"]
    per_epoch = len(_batches(train, max_tokens, rng))
    total = max(1, int(per_epoch * epochs))
    opt = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warm = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    history = [{"step": 0, **evaluate_adapter(adapter, head, held, frozen)}]
    log(f"  step 0/{total} held-out {history[-1]}")
    step, t0, seen = 0, time.perf_counter(), 0
    best = None
    while step < total:
        for idx in _batches(train, max_tokens, rng):
            if step >= total:
                break
            f, m, pos, tidx, tlogp = _collate(train, idx, frozen)
            kl, agree = distill_loss(adapter(f, m), head, pos, tidx, tlogp, num_negatives, rng)
            opt.zero_grad(set_to_none=True)
            kl.backward()
            torch.nn.utils.clip_grad_norm_(adapter.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            seen += len(pos)
            if step % 10 == 0:
                el = time.perf_counter() - t0
                log(f"  step {step}/{total} kl {float(kl.detach()):.3f} train-agree {int(agree) / len(pos):.3f} "
                    f"{seen / el:.0f} pos/s {el:.0f}s")
            if step % eval_every == 0 or step == total:
                history.append({"step": step, **evaluate_adapter(adapter, head, held, frozen)})
                log(f"  step {step}/{total} held-out {history[-1]}")
                if history[-1]["top1_agreement"] >= max(h["top1_agreement"] for h in history):
                    best = {k: v.detach().clone() for k, v in adapter.state_dict().items()}, step
                    if on_best is not None:
                        on_best(adapter, history)
            if time_limit_s and time.perf_counter() - t0 > time_limit_s:
                total = step
                break
    if history[-1]["step"] != step:
        history.append({"step": step, **evaluate_adapter(adapter, head, held, frozen)})
        if history[-1]["top1_agreement"] >= max(h["top1_agreement"] for h in history):
            best = {k: v.detach().clone() for k, v in adapter.state_dict().items()}, step
    if best is not None:                               # keep the best held-out agreement seen
        adapter.load_state_dict(best[0])
    return adapter, {"frozen": frozen, "adapter_layers": num_layers, "init": init, "source_layers":
                     adapter.source_layers, "epochs": epochs, "steps": step, "lr": lr, "max_tokens": max_tokens,
                     "num_negatives": num_negatives,
                     "train_s": round(time.perf_counter() - t0, 1), "best_step": best[1] if best else 0,
                     "history": history}


# ----------------------------------------------------------------------------- stage 5: the draft's vocabulary
def frequency_vocab(tok, rows: list[dict], size: int = DRAFT_VOCAB, docs: list[str] | None = None,
                    log=print) -> torch.Tensor:
    """FR-Spec (Zhao et al. 2025, "FR-Spec: Accelerating Large-Vocabulary Language Models via Frequency-Ranked
    Speculative Sampling", arXiv 2502.14856): the draft's LM head keeps only the `size` most frequent tokens. Counted
    over the training rows (prompts and the target's answers) and the default prose corpus of superposed decoding
    (CPython's documentation, on every machine); ties and the rest in BPE merge order (a lower id is an earlier,
    more frequent merge); the tokenizer's special tokens (EOS...) always kept. docs: another corpus instead.
    Sorted ids [size] (int64)."""
    V = len(tok)
    counts = torch.zeros(V, dtype=torch.float64)                                  # [V]
    for r in rows:
        ids = torch.as_tensor(r["prompt_ids"] + r["answer_ids"])
        counts.index_add_(0, ids, torch.ones(len(ids), dtype=torch.float64))
    docs = default_corpus_documents() if docs is None else docs
    corpus = 0
    for b in range(0, len(docs), 256):
        for ids in tok(docs[b:b + 256], add_special_tokens=False)["input_ids"]:
            counts.index_add_(0, torch.as_tensor(ids, dtype=torch.long), torch.ones(len(ids), dtype=torch.float64))
            corpus += len(ids)
    score = counts + 0.5 * (1 - torch.arange(V, dtype=torch.float64) / V)          # ties: merge order
    score[torch.as_tensor(sorted(set(tok.all_special_ids)), dtype=torch.long)] = float("inf")
    keep = score.topk(min(size, V)).indices.sort().values                           # [size]
    log(f"  draft vocabulary: {len(keep)} of {V} tokens ({int((counts > 0).sum())} seen in {corpus} corpus + "
        f"{sum(len(r['prompt_ids']) + len(r['answer_ids']) for r in rows)} answer-set tokens)")
    return keep


# ------------------------------------------------------------------------------------ stage 6: save and load
def save_draft(adapter: Adapter, info: dict, path: Path, weights: str = "float16",
               vocab_ids: torch.Tensor | None = None) -> None:
    """The adapter's layers (as draft layers E..E+A-1) and final norm, recipe + numbers as metadata; with vocab_ids
    also the draft's output vocabulary (`lm_head.vocab_ids`, int32, see SubVocabHead).
    weights: 'float16', or 'int8' (matrices as int8 with one float16 scale per output row, symmetric; weight-only:
    the draft still computes in float32 after `load_tensors` de-quantizes them; half the size of float16)."""
    from safetensors.torch import save_file
    E = info["frozen"]
    tensors = {}
    for name, t in adapter.body.state_dict().items():
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            tensors[f"model.layers.{E + int(i)}.{rest}"] = t
        elif name.startswith("norm."):
            tensors[f"model.{name}"] = t
    tensors = pack_tensors(tensors, weights)
    if vocab_ids is not None:
        tensors["lm_head.vocab_ids"] = vocab_ids.to(torch.int32).contiguous()
        info = dict(info, draft_vocab=int(vocab_ids.numel()))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt", "declab_draft": json.dumps(dict(info, weights=weights))})


# ------------------------------------------------------------------------------------------- stage 7: evaluate
def agreement(target, draft, seqs: list[dict], temperature: float = 1.0) -> dict:
    """Teacher-forced over each (prompt + answer), at the answer positions: top-1 agreement (draft argmax ==
    target argmax) and the expected speculative-sampling acceptance E[sum_v min(p(v), q(v))] at `temperature`."""
    n = agree = 0
    beta = 0.0
    with torch.inference_mode():
        for s in seqs:
            ids = torch.as_tensor(s["prompt_ids"] + s["answer_ids"])[None]
            n_p = len(s["prompt_ids"])
            lp = target(input_ids=ids).logits[0, n_p - 1: -1].float()               # [n_a, V]
            lq = draft(input_ids=ids).logits[0, n_p - 1: -1].float()
            agree += int((lp.argmax(-1) == lq.argmax(-1)).sum())
            beta += float(torch.minimum((lp / temperature).softmax(-1), (lq / temperature).softmax(-1)).sum())
            n += lp.shape[0]
    return {"top1_agreement": round(agree / max(n, 1), 4), "expected_acceptance": round(beta / max(n, 1), 4),
            "positions": n}


def cost_ratio(target, draft, new_tokens: int = 32, reps: int = 7) -> dict:
    """Median ms per decoded token at batch 1 with KV cache (argmax feedback), target and draft interleaved in one
    process; the ratio draft / target is the `c` of the speculative-decoding speedup formula."""
    from transformers import DynamicCache
    prompt = torch.arange(100, 140)[None]

    def per_token(model) -> float:
        with torch.inference_mode():
            cache = DynamicCache(config=model.config)
            out = model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
            t = out.logits[:, -1].argmax(-1, keepdim=True)
            t0 = time.perf_counter()
            for _ in range(new_tokens):
                out = model(input_ids=t, past_key_values=cache, use_cache=True, logits_to_keep=1)
                t = out.logits[:, -1].argmax(-1, keepdim=True)
            return (time.perf_counter() - t0) * 1000 / new_tokens

    times = {"target": [], "draft": []}
    for _ in range(reps):
        times["target"].append(per_token(target))
        times["draft"].append(per_token(draft))
    t_ms, d_ms = statistics.median(times["target"]), statistics.median(times["draft"])
    return {"target_ms_per_token": round(t_ms, 2), "draft_ms_per_token": round(d_ms, 2),
            "cost_ratio": round(d_ms / t_ms, 4), "threads": torch.get_num_threads()}


def evaluate_draft(weights: Path = DEFAULT_WEIGHTS, work: Path | None = None, timing: bool = True) -> dict:
    target, tok = load_base()
    draft, info = build_draft_model(load_base()[0], weights)
    result = {"recipe": {k: v for k, v in info.items() if k != "history"}}
    answers = None
    if work is not None and (work / "answers-held_out-greedy.json").exists():
        answers = {m: json.loads((work / f"answers-held_out-{m}.json").read_text()) for m in ("greedy", "sampled")
                   if (work / f"answers-held_out-{m}.json").exists()}
    if answers is None:
        held = build_prompts()[1]
        answers = {"greedy": generate_answers(target, tok, held, sample=False, seed=1, log=lambda *a: None)}
    result["held_out_greedy"] = agreement(target, draft, answers["greedy"])
    if "sampled" in answers:
        result["held_out_sampled"] = agreement(target, draft, answers["sampled"])
    if timing:
        result["cost"] = cost_ratio(target, draft)
    return result


def build(work: Path, out: Path, frozen: int = NUM_FROZEN, num_layers: int = NUM_ADAPTER, init: str = "last",
          epochs: float = 3.0, lr: float = 1e-3, max_tokens: int = 1024, time_limit_s: float | None = None,
          init_from: Path | None = None, draft_vocab: int = DRAFT_VOCAB, weights: str = "int8", log=print) -> dict:
    t0 = time.perf_counter()
    data = stage_answers(work, frozen=frozen, log=log)
    feats = stage_features(work, data, frozen=frozen, log=log)
    base, tok = load_base()
    vocab_ids = frequency_vocab(tok, data["train"], draft_vocab, log=log) if draft_vocab else None
    recipe = dict(base=BASE_KEY, top_k=TOP_K, max_new=MAX_NEW, sample_temperature=SAMPLE_TEMPERATURE,
                  train_sequences=len(data["train"]), held_out_sequences=len(data["held_out"]))

    def checkpoint(adapter, history):                # the best so far, usable if the build is cut short
        save_draft(adapter, dict(recipe, frozen=frozen, adapter_layers=num_layers, init=init, partial=True,
                                 history=history, build_s=round(time.perf_counter() - t0, 1)), out,
                   vocab_ids=vocab_ids)
        log(f"  checkpoint {out}")

    adapter, info = train_adapter(base, feats, frozen=frozen, num_layers=num_layers, init=init, epochs=epochs, lr=lr,
                                  max_tokens=max_tokens, time_limit_s=time_limit_s, eval_every=60,
                                  on_best=checkpoint, init_from=init_from, log=log)
    if init_from is not None:
        previous = read_draft_info(Path(init_from))
        info["continued_from"] = {k: previous.get(k) for k in ("epochs", "steps", "lr", "train_sequences", "best_step")}
    info.update(base=BASE_KEY, top_k=TOP_K, max_new=MAX_NEW, sample_temperature=SAMPLE_TEMPERATURE,
                train_sequences=len(data["train"]), held_out_sequences=len(data["held_out"]),
                build_s=round(time.perf_counter() - t0, 1))
    save_draft(adapter, info, out, weights=weights, vocab_ids=vocab_ids)
    log(f"saved {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return info


def set_vocab(weights: Path, out: Path, vocab_ids: torch.Tensor | None) -> None:
    """Copy a stored draft with its output vocabulary replaced (None: the whole vocabulary)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(weights), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "lm_head.vocab_ids"}
        info = json.loads(f.metadata()["declab_draft"])
    info.pop("draft_vocab", None)
    if vocab_ids is not None:
        tensors["lm_head.vocab_ids"] = vocab_ids.to(torch.int32).contiguous()
        info["draft_vocab"] = int(vocab_ids.numel())
    save_file(tensors, str(out), metadata={"format": "pt", "declab_draft": json.dumps(info)})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.draft_build", description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["answers", "features", "build", "vocab", "eval"])
    ap.add_argument("--work", default=None,
                    help="cache folder for the build stages (default: <declab cache>/draft-build)")
    ap.add_argument("--out", default=str(DEFAULT_WEIGHTS), help="where build writes the draft weights")
    ap.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="the draft weights eval reads")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default $DECLAB_DRAFT_THREADS or 1)")
    ap.add_argument("--frozen", type=int, default=NUM_FROZEN)
    ap.add_argument("--adapter-layers", type=int, default=NUM_ADAPTER)
    ap.add_argument("--init", choices=["next", "last"], default="last")
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--max-tokens", type=int, default=1024, help="padded tokens per training batch")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weights-format", choices=["int8", "float16"], default="int8",
                    help="how build stores the trained matrices (int8 + a float16 scale per row: half the size)")
    ap.add_argument("--time-limit", type=float, default=None, help="stop training after this many seconds")
    ap.add_argument("--draft-vocab", type=int, default=DRAFT_VOCAB,
                    help="tokens the draft's LM head keeps (FR-Spec; 0 = all); `vocab` re-sets it on --weights")
    ap.add_argument("--init-from", default=None, help="continue training from this stored draft (same E and A)")
    ap.add_argument("--no-timing", action="store_true")
    args = ap.parse_args(argv)
    _threads(args.threads)
    work = Path(args.work or cache_root() / "draft-build")
    work.mkdir(parents=True, exist_ok=True)
    if args.command == "answers":
        stage_answers(work, frozen=args.frozen)
    elif args.command == "features":
        stage_features(work, stage_answers(work, frozen=args.frozen), frozen=args.frozen)
    elif args.command == "build":
        build(work, Path(args.out), frozen=args.frozen, num_layers=args.adapter_layers, init=args.init,
              epochs=args.epochs, lr=args.lr, max_tokens=args.max_tokens, time_limit_s=args.time_limit,
              init_from=args.init_from, draft_vocab=args.draft_vocab, weights=args.weights_format)
    elif args.command == "vocab":
        _, tok = load_base()
        data = stage_answers(work, frozen=args.frozen)
        ids = frequency_vocab(tok, data["train"], args.draft_vocab) if args.draft_vocab else None
        set_vocab(Path(args.weights), Path(args.out), ids)
    else:
        print(json.dumps(evaluate_draft(Path(args.weights), work, timing=not args.no_timing), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
