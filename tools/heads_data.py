"""Training data of the trained drafting heads (tools/heads_build.py): the target's greedy answers to the draft
build's prompts (tools/draft_data.py: disjoint training / held-out topics) and, from one teacher-forced target
forward per sequence, the states the heads read (dossier D.0):

* `f`   the last-layer state after the final norm (HF `hidden_states[-1]`, what `lm_head` sees), every position:
        Medusa, Hydra and EAGLE read it;
* `h_E` the state entering layer E (`hidden_states[E]`, E = the Kangaroo exit layer), every position;
* the target's top-K next-token log-probs at every answer position (soft targets of EAGLE and Kangaroo).

The SpecDec++ acceptance head needs the draft's side too (`acceptance_rows`): the embedded draft reads the target's
answer X, a token Y_i ~ q(.|X_<i) is drawn at every answer position (T = 1), the soft label is
a_i = min(1, p(Y_i) / q(Y_i)); a second draft forward over Z (Z_i = X_i with probability `mixing_ratio`, else Y_i)
gives the draft state the head reads at every position where Z_i = Y_i.

Everything is cached per stage in the work folder (`<declab cache>/heads-build`), so a build resumes where it
stopped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from tools.draft_build import _topk_logp, generate_answers, load_base
from tools.draft_data import build_prompts

NUM_TRAIN = 360           # training prompts answered (the first of build_prompts' 480)
NUM_HELD_OUT = 48
MAX_NEW = 128
TOP_K = 64


def stage_answers(work: Path, num_train: int = NUM_TRAIN, max_new: int = MAX_NEW, log=print) -> dict:
    """{'train': [...], 'held_out': [...]} rows {'prompt_ids', 'answer_ids'}: the target's greedy answers."""
    train, held = build_prompts(480, NUM_HELD_OUT)
    out = {}
    model = tok = None
    for split, prompts, seed in (("held_out", held, 1), ("train", train[:num_train], 2)):
        path = work / f"answers-{split}-{len(prompts)}-n{max_new}.json"
        if not path.exists():
            if model is None:
                model, tok = load_base()
            rows = generate_answers(model, tok, prompts, sample=False, seed=seed, max_new=max_new,
                                    log=lambda m: log(f"  answers {split}: {m.strip()}"))
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps([{k: r[k] for k in ("prompt_ids", "answer_ids")} for r in rows]))
            tmp.rename(path)
        out[split] = json.loads(path.read_text())
    return out


def teacher_states(model, rows: list[dict], exit_layer: int, top_k: int = TOP_K, batch: int = 8,
                   log=print) -> list[dict]:
    """One teacher-forced target forward per (prompt + answer), right-padded batches. Per row: 'f' [L, H] (after the
    final norm) and 'h_E' [L, H] (entering layer E), float16, every position; 'top_idx' / 'top_logp' [n_a, K] the
    target's top-K next-token log-probs at positions n_p-1 .. L-2 (those that predict the answer)."""
    out: list[dict | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["prompt_ids"]) + len(rows[i]["answer_ids"]))
    head = model.get_output_embeddings().weight                                  # [V, H]
    t0 = time.perf_counter()
    for b in range(0, len(order), batch):
        idx = order[b:b + batch]
        ids_list = [rows[i]["prompt_ids"] + rows[i]["answer_ids"] for i in idx]
        width = max(len(x) for x in ids_list)
        ids = torch.tensor([x + [0] * (width - len(x)) for x in ids_list])         # [B, W]
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids_list])
        with torch.inference_mode():
            o = model.model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
            for j, i in enumerate(idx):
                n_p, L = len(rows[i]["prompt_ids"]), len(ids_list[j])
                f = o.last_hidden_state[j, :L]                                     # [L, H] post-norm
                top_idx, top_logp = _topk_logp(f[n_p - 1: L - 1] @ head.T, top_k)  # [n_a, K]
                out[i] = {"f": f.to(torch.float16).clone(),
                          "h_E": o.hidden_states[exit_layer][j, :L].to(torch.float16).clone(),
                          "top_idx": top_idx, "top_logp": top_logp}
        log(f"  states {min(b + batch, len(order))}/{len(order)} {time.perf_counter() - t0:.0f}s")
    return out


def stage_states(work: Path, answers: dict, exit_layer: int, top_k: int = TOP_K, log=print) -> dict:
    """Per split, training records {'ids', 'n_prompt', 'f', 'h_E', 'top_idx', 'top_logp'} (see teacher_states),
    cached per split in `work`."""
    out = {}
    model = None
    for split, rows in answers.items():
        path = work / f"states-{split}-{len(rows)}-E{exit_layer}-k{top_k}.pt"
        if not path.exists():
            if model is None:
                model, _ = load_base()
            tmp = path.with_suffix(".tmp")
            torch.save(teacher_states(model, rows, exit_layer, top_k, log=log), tmp)
            tmp.rename(path)
        states = torch.load(path)
        out[split] = [{"ids": r["prompt_ids"] + r["answer_ids"], "n_prompt": len(r["prompt_ids"]), **s}
                      for r, s in zip(rows, states)]
    return out


if __name__ == "__main__":
    import sys
    from declab.core.paths import cache_root
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
    w = cache_root() / "heads-build"
    w.mkdir(parents=True, exist_ok=True)
    stage_states(w, stage_answers(w), 2)
