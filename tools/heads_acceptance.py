"""Train SpecDec++'s acceptance-prediction head for the embedded pair (target smollm2-135m-instruct, draft
smollm2-135m-draft): data, training, held-out evaluation, and the weights file the strategy reads
(declab/models/heads/smollm2-135m/acceptance-smollm2-135m-draft.safetensors; declab/models/acceptance.py).

Huang et al., "SpecDec++: Boosting Speculative Decoding via Adaptive Candidate Lengths", arXiv 2405.19715; code
Kaffaljidhmah2/SpecDec_pp (data/gen_acceptance.py, specdec_pp/train.py). Spec: docs/strategies.md#speculative.

Data (T = 1), per training answer X (the target's greedy answer to a prompt; tools/heads_data.py):
    1. the draft reads prompt + X teacher-forced: q(.|X_<i) at every answer position i, and Y_i ~ q(.|X_<i)
       (the draft's FR-Spec head: q is 0 outside its 16k vocabulary, so Y_i is always in it);
    2. p(Y_i | X_<i) from the target's post-norm states f (heads_data.stage_states): logits = f @ lm_head.T;
    3. soft label a_i = exp(min(0, ln p(Y_i) - ln q(Y_i))) = min(1, p/q), the chance that speculative sampling
       accepts Y_i;
    4. Z_i = X_i with probability `mixing_ratio` (0.15), else Y_i; the draft reads prompt + Z and the head's input
       at answer position i is the draft's post-norm last state there (the state after reading Z_i). Positions where
       the mix chose X_i, and prompt positions, carry no label (the reference's IGNORE_INDEX).
    The draft is frozen, so its states are computed once and cached; training then only runs the head.

Loss (specdec_pp/train.py): sum_i [w (1 - a_i) CE(logits_i, 0) + a_i CE(logits_i, 1)] / sum_i [w (1 - a_i) + a_i],
`weight_mismatch` w = 6 (rejections weigh 6x: the head errs on the side of stopping). Training: AdamW, 3 epochs,
cosine schedule with warm-up ratio 0.03 (the README's run). Batch size and learning rate are this lab's (the
reference: 32 sequences per step at the HF default lr 5e-5 over Alpaca; 360 answers at that setting would be ~35
steps): BATCH positions per step, LR.

Because of w, the head's probability is not the acceptance itself: where the true rate is a, the weighted loss is
minimised by a^ = a / (a + w (1 - a)), so a^ <= a; the evaluation reports both, and the held-out calibration table
(predicted bin -> mean a) shows it. The stop rule 1 - prod a^ > h uses a^ as is (the paper tunes h for it).

Paper symbol -> here: a_i -> `a` (soft label); w -> WEIGHT_MISMATCH; mixing_ratio -> MIXING_RATIO;
resnet_num_layers -> RESNET_NUM_LAYERS (3, declab/models/acceptance.py).

Measured with the shipped file (360 training answers, 33,505 labelled positions; 48 held-out answers on disjoint
topics, 4,439 positions; rows 409 s + 54 s and training 16 s on one CPU thread): held-out mean a 0.477, mean a^
0.303 (0.657 debiased), soft AUC 0.66, soft BCE 0.748 against 0.796 for the training-mean constant (0.692 for the
held-out mean itself). The draft's own probability q(Y_i) ranks better: AUC 0.77 held-out (0.85 against the head's
0.80 on the training rows). Part of the gap is the data: the draft was distilled on these same training answers
(tools/draft_build.py), so its acceptance there (mean a 0.70) is far above held-out (0.48) and the head learns
an optimistic picture; a cleaner build uses answers to prompts the draft never saw (`build_acceptance` takes any
answers / states dicts).

Run: python -m tools.heads_acceptance [--time-limit S] [--threads N] (needs the heads-build answers and states of
tools/heads_data.py in <declab cache>/heads-build).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from declab.core.paths import cache_root
from declab.models.acceptance import RESNET_NUM_LAYERS, AcceptanceHead, head_tensors, kind_for
from declab.models.draft import DEFAULT_WEIGHTS, build_draft_model
from declab.models.heads import heads_folder, save_heads
from declab.models.registry import load_registry
from tools.draft_build import BASE_KEY, load_base
from tools.heads_data import stage_answers, stage_states

DRAFT_KEY = "smollm2-135m-draft"
MIXING_RATIO = 0.15
WEIGHT_MISMATCH = 6.0
EPOCHS = 3
WARMUP_RATIO = 0.03
LR = 1e-3
BATCH = 256                # labelled positions per optimiser step
TEMPERATURE = 1.0          # labels at T = 1 (D.5)
SEED = 0
FORWARD_BATCH = 8          # sequences per draft forward
NUM_BINS = 10              # calibration table
ROWS_VERSION = 2           # bump when acceptance_rows changes what it stores (invalidates the cached rows)


# ------------------------------------------------------------------------------------------- data
def load_pair():
    """(target LM-head weight W [V, H] float32, the draft model): the draft is built from a second copy of the
    target (build_draft_model turns the model it gets into the draft in place)."""
    target, _ = load_base()
    W = target.get_output_embeddings().weight.detach().float().clone()            # [V, H]
    del target
    draft, _ = build_draft_model(load_base()[0], DEFAULT_WEIGHTS)
    return W, draft.eval()


def _draft_vocab(draft) -> tuple[torch.Tensor, torch.Tensor]:
    """The draft's LM head as (weight [N, H], token ids [N]) over its own vocabulary (FR-Spec sub-vocabulary, or
    the whole one)."""
    head = draft.lm_head
    ids = getattr(head, "vocab_ids", None)
    weight = head.weight.detach()
    return weight, ids if ids is not None else torch.arange(weight.shape[0])


def _forward_states(draft, seqs: list[list[int]]) -> torch.Tensor:
    """Post-norm last-layer states of right-padded sequences [B, W, H] (the state the draft's LM head reads)."""
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])                # [B, W]
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])    # [B, W]
    return draft.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state   # [B, W, H]


@torch.inference_mode()
def acceptance_rows(draft, W: torch.Tensor, records: list[dict], mixing_ratio: float = MIXING_RATIO,
                    seed: int = SEED, batch: int = FORWARD_BATCH, log=print) -> dict:
    """SpecDec++ training rows of `records` (stage_states rows: 'ids', 'n_prompt', 'f'), steps 1-4 of the module
    docstring. Returns {'states' [N, H] float16 (draft state at each labelled position), 'a' [N] float32 (soft
    label), 'q' [N] float32 (the draft's probability of Y_i: the training-free proxy the head replaces), 'y_is_x' [N]
    bool (the drafted token equals the target's), 'record' [N], 'pos' [N] (answer index)}."""
    gen = torch.Generator().manual_seed(seed)
    sub_w, sub_ids = _draft_vocab(draft)                                          # [N_v, H], [N_v]
    out = {k: [] for k in ("states", "a", "q", "y_is_x", "record", "pos")}
    t0 = time.perf_counter()
    for b in range(0, len(records), batch):
        rows = records[b:b + batch]
        hidden = _forward_states(draft, [r["ids"] for r in rows])                 # [B, W, H] teacher-forced on X
        z_seqs, keep = [], []
        for j, r in enumerate(rows):
            n_p, L = r["n_prompt"], len(r["ids"])
            X = torch.tensor(r["ids"][n_p:])                                      # [n_a] answer tokens
            logq = (hidden[j, n_p - 1:L - 1] @ sub_w.T).float().div(TEMPERATURE).log_softmax(-1)   # [n_a, N_v]
            pick = torch.multinomial(logq.exp(), 1, generator=gen).squeeze(1)    # [n_a] index into sub vocab
            Y = sub_ids[pick]                                                     # [n_a] drafted tokens Y_i
            ln_q = logq.gather(1, pick[:, None]).squeeze(1)                       # [n_a]
            logits_p = r["f"][n_p - 1:L - 1].float() @ W.T / TEMPERATURE          # [n_a, V] target logits
            ln_p = logits_p.gather(1, Y[:, None]).squeeze(1) - logits_p.logsumexp(-1)   # [n_a]
            a = torch.exp(torch.clamp(ln_p - ln_q, max=0.0))                      # [n_a] soft labels min(1, p/q)
            mix = torch.rand(len(X), generator=gen) < mixing_ratio                # [n_a] True: Z_i = X_i (ignored)
            Z = torch.where(mix, X, Y)                                            # [n_a]
            z_seqs.append(r["ids"][:n_p] + Z.tolist())
            keep.append((~mix, a, ln_q.exp(), Y == X))
        hidden_z = _forward_states(draft, z_seqs)                                 # [B, W, H] over prompt + Z
        for j, (r, (m, a, q, same)) in enumerate(zip(rows, keep)):
            n_p, L = r["n_prompt"], len(r["ids"])
            idx = torch.nonzero(m).squeeze(1)                                     # [n] labelled answer positions
            out["states"].append(hidden_z[j, n_p:L][idx].to(torch.float16))      # [n, H] state after reading Z_i
            out["a"].append(a[idx].float())
            out["q"].append(q[idx].float())
            out["y_is_x"].append(same[idx])
            out["record"].append(torch.full((len(idx),), b + j, dtype=torch.int32))
            out["pos"].append(idx.to(torch.int32))
        log(f"  acceptance rows {min(b + batch, len(records))}/{len(records)} {time.perf_counter() - t0:.0f}s")
    return {k: torch.cat(v) for k, v in out.items()}


def stage_rows(work: Path, states: dict, mixing_ratio: float = MIXING_RATIO, seed: int = SEED, log=print) -> dict:
    """acceptance_rows per split, cached in `work` (keyed by the draft weights' size and mtime)."""
    stat = DEFAULT_WEIGHTS.stat()
    tag = f"v{ROWS_VERSION}-{stat.st_size}-{int(stat.st_mtime)}"
    out, pair = {}, None
    for split, records in states.items():
        path = work / f"acceptance-{split}-{len(records)}-mix{mixing_ratio}-s{seed}.pt"
        cached = torch.load(path) if path.exists() else None
        if cached is None or cached.get("draft") != tag:
            if pair is None:
                pair = load_pair()
            t0 = time.perf_counter()
            rows = acceptance_rows(pair[1], pair[0], records, mixing_ratio, seed, log=log)
            cached = dict(rows, draft=tag, seconds=round(time.perf_counter() - t0, 1))
            tmp = path.with_suffix(".tmp")
            torch.save(cached, tmp)
            tmp.rename(path)
        out[split] = cached
    return out


# ------------------------------------------------------------------------------------------- training
def weighted_loss(logits: torch.Tensor, a: torch.Tensor, w: float = WEIGHT_MISMATCH) -> torch.Tensor:
    """sum[w (1 - a) CE(., 0) + a CE(., 1)] / sum[w (1 - a) + a]  (logits [N, 2], a [N])."""
    logp = logits.float().log_softmax(-1)                                         # [N, 2]
    w0, w1 = w * (1.0 - a), a                                                     # [N], [N]
    return -(w0 * logp[:, 0] + w1 * logp[:, 1]).sum() / (w0 + w1).sum().clamp_min(1e-12)


def train_head(train: dict, epochs: float = EPOCHS, lr: float = LR, batch: int = BATCH, w: float = WEIGHT_MISMATCH,
               warmup_ratio: float = WARMUP_RATIO, num_layers: int = RESNET_NUM_LAYERS, seed: int = SEED,
               time_limit_s: float | None = None, log=print) -> tuple[AcceptanceHead, dict]:
    """AdamW (weight decay 0), linear warm-up over warmup_ratio of the steps, then cosine to 0."""
    torch.manual_seed(seed)
    rng = torch.Generator().manual_seed(seed)
    X, a = train["states"].float(), train["a"].float()                            # [N, H], [N]
    head = AcceptanceHead(X.shape[1], num_layers)
    head.train()
    per_epoch = math.ceil(len(a) / batch)
    total = max(1, int(per_epoch * epochs))
    warm = max(1, round(warmup_ratio * total))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else
                                              0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
    step, t0, losses = 0, time.perf_counter(), []
    while step < total:
        for idx in torch.randperm(len(a), generator=rng).split(batch):
            if step >= total:
                break
            loss = weighted_loss(head(X[idx]), a[idx], w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            losses.append(float(loss.detach()))
            if step % 100 == 0 or step == total:
                log(f"  step {step}/{total} loss {sum(losses[-100:]) / len(losses[-100:]):.4f} "
                    f"{time.perf_counter() - t0:.0f}s")
            if time_limit_s and time.perf_counter() - t0 > time_limit_s:
                log(f"  time limit {time_limit_s:.0f}s reached at step {step}/{total}")
                total = step
                break
    head.eval().requires_grad_(False)
    return head, {"steps": step, "planned_steps": per_epoch * epochs, "final_loss": round(losses[-1], 5),
                  "train_seconds": round(time.perf_counter() - t0, 1)}


# ------------------------------------------------------------------------------------------- evaluation
def soft_auc(score: torch.Tensor, a: torch.Tensor) -> float:
    """AUC with soft labels: each row counts as a positive with weight a and a negative with weight 1 - a; the
    chance a random positive scores above a random negative (ties 1/2)."""
    order = torch.argsort(score.double())
    s, pos, neg = score.double()[order], a.double()[order], 1.0 - a.double()[order]
    uniq, inv = torch.unique_consecutive(s, return_inverse=True)
    pos_g = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, pos)   # [G] per distinct score
    neg_g = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, neg)
    neg_below = torch.cumsum(neg_g, 0) - neg_g
    num = (pos_g * (neg_below + 0.5 * neg_g)).sum()
    den = pos_g.sum() * neg_g.sum()
    return float(num / den) if den > 0 else float("nan")


def soft_bce(pred: torch.Tensor, a: torch.Tensor) -> float:
    """Mean of -[a ln pred + (1 - a) ln(1 - pred)] (pred clamped to [1e-6, 1 - 1e-6])."""
    p = pred.double().clamp(1e-6, 1 - 1e-6)
    return float(-(a * p.log() + (1 - a) * (1 - p).log()).mean())


def debias(pred: torch.Tensor, w: float = WEIGHT_MISMATCH) -> torch.Tensor:
    """The acceptance a a w-weighted head's a^ stands for: a^ = a / (a + w (1 - a))  <=>  a = w a^ / (1 - a^ + w a^)."""
    return w * pred / (1 - pred + w * pred)


def evaluate(head: AcceptanceHead, rows: dict, baseline: float, w: float = WEIGHT_MISMATCH) -> dict:
    """Held-out numbers: mean predicted vs mean actual acceptance (raw a^, and debiased for w), the calibration
    table, soft BCE against the constant baselines (the training mean of a; the evaluated rows' own mean, an
    oracle constant), the weighted loss, the soft AUC; and the same for the draft-confidence proxy q(Y_i)."""
    pred = head.p_accept(rows["states"].float())                                  # [N]
    a = rows["a"].float()                                                         # [N]
    const = torch.full_like(a, baseline)
    table = []
    bins = torch.clamp((pred * NUM_BINS).long(), max=NUM_BINS - 1)                # [N]
    for b in range(NUM_BINS):
        m = bins == b
        if m.any():
            table.append({"bin": f"{b / NUM_BINS:.1f}-{(b + 1) / NUM_BINS:.1f}", "n": int(m.sum()),
                          "mean_pred": round(float(pred[m].mean()), 4), "mean_a": round(float(a[m].mean()), 4),
                          "y_equals_x": round(float(rows["y_is_x"][m].float().mean()), 4)})
    corrected = debias(pred, w)
    proxy = {}
    if "q" in rows:                      # the draft's own probability of the token (adaptive=specdec without head)
        q = rows["q"].float()
        proxy = {"proxy_mean": round(float(q.mean()), 4), "proxy_bce": round(soft_bce(q, a), 5),
                 "proxy_auc": round(soft_auc(q, a), 4)}
    return {"positions": len(a), "mean_pred": round(float(pred.mean()), 4), "mean_a": round(float(a.mean()), 4),
            "mean_pred_debiased": round(float(corrected.mean()), 4),
            "bce": round(soft_bce(pred, a), 5), "bce_debiased": round(soft_bce(corrected, a), 5),
            "bce_constant": round(soft_bce(const, a), 5),
            "bce_constant_oracle": round(soft_bce(torch.full_like(a, float(a.mean())), a), 5), **proxy,
            "weighted_loss": round(float(weighted_loss(torch.stack([1 - pred, pred], -1).clamp_min(1e-9).log(), a, w)),
                                   5),
            "weighted_loss_constant": round(float(weighted_loss(
                torch.stack([1 - const, const], -1).log(), a, w)), 5),
            "auc": round(soft_auc(pred, a), 4), "calibration": table}


# ------------------------------------------------------------------------------------------- build
def default_out() -> Path:
    spec = load_registry().get(BASE_KEY)
    return heads_folder(spec) / f"{kind_for(DRAFT_KEY)}.safetensors"


def build_acceptance(answers: dict, states: dict, out: Path, time_limit_s: float = 480, log=print) -> dict:
    """Rows (cached in <declab cache>/heads-build), training (stopped at time_limit_s), held-out evaluation, and the
    weights file `out` (float16, with the recipe and the numbers as metadata). `answers` is stage_answers' dict (its
    counts go into the recipe), `states` stage_states'. Returns the info written."""
    work = cache_root() / "heads-build"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = stage_rows(work, {s: states[s] for s in ("train", "held_out")}, log=log)
    data_s = time.perf_counter() - t0
    train, held = rows["train"], rows["held_out"]
    log(f"  rows: train {len(train['a'])} held-out {len(held['a'])} ({data_s:.0f}s; "
        f"built in {train.get('seconds')}s + {held.get('seconds')}s)")
    head, run = train_head(train, time_limit_s=time_limit_s, log=log)
    baseline = float(train["a"].float().mean())
    numbers = {"held_out": evaluate(head, held, baseline), "train": {
        k: v for k, v in evaluate(head, train, baseline).items() if k != "calibration"}}
    info = {"kind": kind_for(DRAFT_KEY), "target": BASE_KEY, "draft": DRAFT_KEY,
            "paper": "Huang et al. 2024, SpecDec++ (arXiv 2405.19715)",
            "recipe": {"resnet_num_layers": RESNET_NUM_LAYERS, "hidden_size": head.hidden_size,
                       "mixing_ratio": MIXING_RATIO, "weight_mismatch": WEIGHT_MISMATCH, "temperature": TEMPERATURE,
                       "epochs": EPOCHS, "warmup_ratio": WARMUP_RATIO, "schedule": "cosine", "optimizer": "AdamW",
                       "lr": LR, "batch_positions": BATCH, "seed": SEED,
                       "answers": {k: len(v) for k, v in answers.items()},
                       "positions": {"train": len(train["a"]), "held_out": len(held["a"])}},
            "training": dict(run, data_seconds=round(data_s, 1),
                             rows_seconds={"train": train.get("seconds"), "held_out": held.get("seconds")}),
            "baseline_mean_a": round(baseline, 4), **numbers}
    save_heads(out, head_tensors(head), info, weights="float16")
    log(f"  wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time-limit", type=float, default=480.0, help="training time limit in seconds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = cache_root() / "heads-build"
    work.mkdir(parents=True, exist_ok=True)
    answers = stage_answers(work)
    states = stage_states(work, answers, 2)
    info = build_acceptance(answers, states, args.out or default_out(), args.time_limit)
    print(json.dumps({k: info[k] for k in ("training", "baseline_mean_a", "held_out")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
