"""Training of Kangaroo's adapter (Liu et al., "Kangaroo: Lossless Self-Speculative Decoding via Double Early
Exiting", arXiv 2404.18911; reference Equationliu/Kangaroo train.py) on the cached target states of
tools/heads_data.py; the drafter is strategies/kangaroo.py (docs/strategies.md#spec_tree, dossier D.4).

Training view: the adapter A (declab.models.split.KangarooAdapter) runs over a whole sequence of h_E (the state
entering target layer E, HF `hidden_states[E]`) with a causal mask, exactly as the drafter's cached forward sees it
one position at a time; the target's frozen LM head reads its output. Loss at the answer positions n_p-1 .. L-2:
forward KL from the target's next-token distribution at the same position (its top-64 log-probs, renormalised) to
the adapter's (the paper's soft cross-entropy, up to the teacher's constant entropy), with a sampled softmax over the
batch's teacher tokens plus 4,096 random ones (tools/draft_build.distill_loss) for speed; evaluation uses the whole
vocabulary. AdamW betas (0.9, 0.95) and gradient clipping by value 0.5 as in the reference; the reference's lr 3e-5
(20 epochs on ShareGPT) does not converge in a CPU budget of minutes, so the lr here is larger, with a linear warm-up
and a cosine decay to the time budget; the adapter starts from the target's layer-E attention and final norm
(`KangarooAdapter.init_from`; the reference starts from scratch). The best held-out checkpoint is kept.

Held-out numbers (stored in the file's info, `held_out`):
* `chain_accepted_by_offset[k-1]`: the fraction of held-out answer positions t (with t + k - 1 still in the answer)
  from which k autoregressive drafts all equal the target's greedy tokens, i.e. a greedy chain of k drafts is fully
  accepted; `top1_by_offset[k-1]` = chain_accepted[k-1] / chain_accepted[k-2], the k-th draft right given the k - 1
  before it were (the conditional acceptance, as Hydra's and EAGLE's numbers are stated; tools/heads_build.py).
  Kangaroo's drafts after a correct prefix read the target's own shallow states of that prefix, so drafting
  autoregressively from t is exactly the teacher-forced adapter at t, t+1, ...: offset 1 is the teacher-forced
  top-1 agreement and offset k is the product of the agreements along the answer (no drift, unlike EAGLE).
* `tau_by_eta`: the mean accepted length per round (bonus token included) that greedy spec_tree would get with the
  confidence stop rule eta and at most 6 drafts, simulated from the same teacher-forced predictions.

    python -m tools.heads_kangaroo [--time-limit 480] [--lr 1e-2] [--out PATH] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from declab.core.paths import cache_root
from declab.models.heads import HERE, save_heads
from declab.models.split import KangarooAdapter
from tools.draft_build import _batches, distill_loss, load_base
from tools.heads_data import stage_answers, stage_states

EXIT_LAYER = 2                    # E (the paper's default)
LR = 1e-2                         # pilots (90 s each, held-out top-1): 1e-3 0.076, 5e-3 0.124, 1.5e-2 0.243, 3e-2 0.215
BETAS = (0.9, 0.95)               # the reference's b1, b2
GRAD_CLIP_VALUE = 0.5             # the reference's grad_clip (by value)
MAX_TOKENS = 2048                 # positions per batch (padded width x rows)
NUM_NEGATIVES = 4096              # sampled-softmax extra tokens
MAX_DRAFTS = 6                    # the reference's SPECULATIVE_DECODING_STEPS (for the tau simulation)
ETAS = (0.0, 0.2, 0.4, 0.6, 0.8, 0.9)
DEFAULT_OUT = HERE / "heads" / "smollm2-135m" / "kangaroo.safetensors"


# ------------------------------------------------------------------------------------------------ batches
def _collate(seqs: list[dict], idx: list[int]):
    """Right-padded h_E [B, W, H] (positions 0..L-2: the last one predicts nothing scored), the (row, position)
    of every answer position [N, 2], the teacher's top-K ids [N, K] and log-probs [N, K] there."""
    width = max(len(seqs[i]["ids"]) - 1 for i in idx)
    H = seqs[idx[0]]["h_E"].shape[-1]
    h = torch.zeros(len(idx), width, H)                                          # [B, W, H]
    pos, tidx, tlogp = [], [], []
    for j, i in enumerate(idx):
        s = seqs[i]
        L, n_p = len(s["ids"]), s["n_prompt"]
        h[j, :L - 1] = s["h_E"][:L - 1].float()
        pos.append(torch.stack([torch.full((L - n_p,), j), torch.arange(n_p - 1, L - 1)], 1))   # [n_a, 2]
        tidx.append(s["top_idx"].long())
        tlogp.append(s["top_logp"].float())
    return h, torch.cat(pos), torch.cat(tidx), torch.cat(tlogp)


# ------------------------------------------------------------------------------------------------ evaluation
def predictions(adapter: KangarooAdapter, head: torch.Tensor, seqs: list[dict]) -> list[tuple[torch.Tensor, ...]]:
    """Per sequence, at its answer positions: (adapter top-1 == target top-1 [n_a] bool, adapter top-1 prob [n_a]),
    whole vocabulary, teacher-forced."""
    was = adapter.training
    adapter.eval()
    out = []
    with torch.inference_mode():
        for s in seqs:
            L, n_p = len(s["ids"]), s["n_prompt"]
            z = adapter(s["h_E"][None, :L - 1].float())[0, n_p - 1:]              # [n_a, H]
            p = (z @ head.T).softmax(-1)                                          # [n_a, V]
            conf, top = p.max(-1)                                                 # [n_a]
            out.append((top == s["top_idx"][:, 0].long(), conf))
    adapter.train(was)
    return out


def held_out_numbers(preds, max_offset: int = MAX_DRAFTS, etas=ETAS, max_drafts: int = MAX_DRAFTS) -> dict:
    """top1_by_offset (offset k right given the k - 1 before it were: the conditional acceptance, as the other
    heads report it), chain_accepted_by_offset (a chain of k drafts fully accepted), positions, tau_by_eta."""
    hits = [0] * max_offset
    counts = [0] * max_offset
    tau = {eta: [0, 0] for eta in etas}
    for ok, conf in preds:
        ok, conf = ok.tolist(), conf.tolist()
        n = len(ok)
        for t in range(n):
            run = 0
            while t + run < n and ok[t + run] and run < max_offset:
                run += 1
            for k in range(1, max_offset + 1):
                if t + k - 1 < n:
                    counts[k - 1] += 1
                    hits[k - 1] += run >= k
            for eta in etas:                                  # drafts until one below eta (kept), at most max_drafts
                d = 0
                while d < max_drafts and t + d < n:
                    d += 1
                    if conf[t + d - 1] < eta:
                        break
                tau[eta][0] += min(run, d) + 1
                tau[eta][1] += 1
    joint = [h / max(c, 1) for h, c in zip(hits, counts)]
    cond = [joint[0]] + [j / p if p > 0 else 0.0 for p, j in zip(joint, joint[1:])]
    return {"top1_by_offset": [round(c, 4) for c in cond], "chain_accepted_by_offset": [round(j, 4) for j in joint],
            "positions": counts[0],
            "tau_by_eta": {str(eta): round(s / max(c, 1), 4) for eta, (s, c) in tau.items()},
            "max_drafts": max_drafts}


# ------------------------------------------------------------------------------------------------ training
def train_kangaroo(states: dict, base_model, out: Path = DEFAULT_OUT, time_limit_s: float | None = 480, log=print,
                   lr: float = LR, exit_layer: int = EXIT_LAYER, max_epochs: float = 20.0,
                   max_tokens: int = MAX_TOKENS, num_negatives: int = NUM_NEGATIVES, eval_every_s: float = 60.0,
                   seed: int = 0) -> dict:
    """Train the adapter on states {'train': [...], 'held_out': [...]} (tools/heads_data.stage_states with this
    exit layer) for at most time_limit_s seconds of training (evaluations excluded; None: no limit) or max_epochs
    (the reference trains 20 epochs), keep the best held-out checkpoint, write it to `out` (float16, tensors named
    `heads.*` as declab.models.heads.load_trained reads them) and return its info (recipe + held-out numbers)."""
    torch.manual_seed(seed)
    rng = torch.Generator().manual_seed(seed)
    train, held = states["train"], states["held_out"]
    head = base_model.lm_head.weight.detach().float()                            # [V, H] frozen (tied)
    adapter = KangarooAdapter(base_model.config, exit_layer).init_from(base_model).float().train()
    params = [p for p in adapter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=BETAS, weight_decay=0.0)
    per_epoch = len(_batches(train, max_tokens, torch.Generator().manual_seed(seed)))

    def lr_at(step: int, elapsed: float) -> float:    # linear warm-up 30 steps, cosine to the time or epoch budget
        frac_time = elapsed / time_limit_s if time_limit_s else 0.0
        frac_steps = step / (per_epoch * max_epochs)
        frac = min(1.0, max(frac_time, frac_steps))
        return lr * min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * frac))

    def evaluate(step: int) -> dict:
        preds = predictions(adapter, head, held)
        n = sum(len(ok) for ok, _ in preds)
        agree = sum(int(ok.sum()) for ok, _ in preds) / max(n, 1)
        return {"step": step, "top1": round(agree, 4)}

    history = [evaluate(0)]
    log(f"  kangaroo step 0 held-out top-1 {history[-1]['top1']:.4f} ({per_epoch} batches/epoch)")
    best = ({k: v.detach().clone() for k, v in adapter.state_dict().items()}, 0, history[-1]["top1"])
    step, seen, train_s, last_eval = 0, 0, 0.0, 0.0
    done = False
    while not done:
        for idx in _batches(train, max_tokens, rng):
            t0 = time.perf_counter()
            h, pos, tidx, tlogp = _collate(train, idx)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, train_s)
            kl, agree = distill_loss(adapter(h), head, pos, tidx, tlogp, num_negatives, rng)
            opt.zero_grad(set_to_none=True)
            kl.backward()
            torch.nn.utils.clip_grad_value_(params, GRAD_CLIP_VALUE)
            opt.step()
            step += 1
            seen += len(pos)
            train_s += time.perf_counter() - t0
            if step % 20 == 0:
                log(f"  kangaroo step {step} kl {float(kl.detach()):.3f} train top-1 {int(agree) / len(pos):.3f} "
                    f"lr {opt.param_groups[0]['lr']:.2e} {seen / train_s:.0f} pos/s {train_s:.0f}s")
            done = (time_limit_s is not None and train_s >= time_limit_s) or step >= per_epoch * max_epochs
            if done or train_s - last_eval >= eval_every_s:
                last_eval = train_s
                history.append(evaluate(step))
                log(f"  kangaroo step {step} held-out top-1 {history[-1]['top1']:.4f}")
                if history[-1]["top1"] >= best[2]:
                    best = ({k: v.detach().clone() for k, v in adapter.state_dict().items()}, step,
                            history[-1]["top1"])
            if done:
                break
    adapter.load_state_dict(best[0])
    held_out = held_out_numbers(predictions(adapter, head, held))
    info = {"kind": "kangaroo", "paper": "arXiv 2404.18911", "exit_layer": exit_layer,
            "adapter": "RMSNorm -> self-attention (+ residual, no MLP) -> RMSNorm; the target's frozen LM head",
            "init": "target layer E attention + input norm, target final norm",
            "loss": "forward KL to the target's top-64 (sampled softmax)", "lr": lr, "betas": list(BETAS),
            "schedule": "30-step linear warm-up, cosine to the time budget", "grad_clip_value": GRAD_CLIP_VALUE,
            "max_tokens": max_tokens, "num_negatives": num_negatives, "epochs": round(step / per_epoch, 3),
            "steps": step, "best_step": best[1], "positions": seen, "train_positions_per_epoch": sum(
                len(s["ids"]) - s["n_prompt"] for s in train), "train_sequences": len(train),
            "held_out_sequences": len(held), "train_s": round(train_s, 1),
            "steps_per_s": round(step / max(train_s, 1e-9), 3), "history": history,
            "held_out": held_out}
    tensors = {f"heads.{k}": v for k, v in adapter.state_dict().items()}      # declab.models.heads.load_trained
    save_heads(Path(out), tensors, info, weights="float16")
    log(f"  kangaroo: wrote {out} ({Path(out).stat().st_size / 1e6:.2f} MB) held-out {held_out}")
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Train Kangaroo's adapter on the cached target states")
    ap.add_argument("--work", type=Path, default=None, help="heads build folder (default <declab cache>/heads-build)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--time-limit", type=float, default=480.0)
    ap.add_argument("--lr", type=float, default=LR)
    ap.add_argument("--exit-layer", type=int, default=EXIT_LAYER)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = args.work or cache_root() / "heads-build"
    work.mkdir(parents=True, exist_ok=True)
    states = stage_states(work, stage_answers(work), args.exit_layer)
    base, _tok = load_base()
    train_kangaroo(states, base, args.out, args.time_limit, lr=args.lr, exit_layer=args.exit_layer)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
