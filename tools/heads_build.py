"""Build the trained drafting heads of the embedded model (issue 18; dossier section D), one command for all:

    python -m tools.heads_build build [--only medusa,hydra,eagle,kangaroo,acceptance] [--force] [--threads N]
    python -m tools.heads_build eval  [--only ...]          # the stored files' held-out numbers, recomputed

Stages, each cached in the work folder (<declab cache>/heads-build) so a stopped build resumes where it was:
1. answers  the target's greedy answers to the draft build's prompts (tools/heads_data.py; 360 training prompts,
            48 held-out prompts on disjoint topics, 128 new tokens);
2. states   one teacher-forced target forward per sequence: f (post-norm last state), h_E (E = 2, Kangaroo's
            exit), the target's top-64 next-token log-probs;
3. heads    each kind trained on the cached states (the target never runs again, except Kangaroo's and the
            acceptance head's own evaluation) and written to declab/models/heads/smollm2-135m/<kind>.safetensors
            with its recipe and held-out numbers in the metadata; a kind whose file exists is skipped unless
            --force (resumable); progress bars per kind.

Recipes (D.1-D.3; the paper's value where the CPU budget allows, else what converges in it, recorded in the file):
    medusa  K = 4 legacy heads (one ResBlock each, the target's frozen LM head), CE on the target's greedy answer
            token at offset k+1, summed over heads, AdamW lr 1e-3 (Medusa README), 8 epochs (README: 2, on far
            more data);
    hydra   K = 4 heads over [f_t, E(x_{t+1}) .. E(x_{t+i})], teacher soft-CE to the base distribution at the
            position that predicts the same token (Hydra++'s loss), lr 1e-3, 2 epochs;
    eagle   fc + one decoder layer, loss SmoothL1(f^, f) + 0.1 soft-CE(p-loss), input noise U(-0.5, 0.5) 0.2 512 / H,
            AdamW betas (0.9, 0.95), grad clip by value 0.5, lr 3e-4 (the paper's 3e-5 is for 20 epochs), up to 10
            epochs within the time limit;
    kangaroo tools/heads_kangaroo.py;  acceptance  tools/heads_acceptance.py (SpecDec++).
Soft-CE / CE use a sampled softmax (the batch's teacher top-64 plus 4,096 random tokens, tools.draft_build.kl_loss)
in training; every held-out number uses the whole vocabulary.

Held-out numbers stored: `top1_by_offset` (offset d = the token d places after the root, the d-th drafted token:
medusa head d; hydra head d and eagle step d given the d-1 tokens before it are right, i.e. the conditional
acceptance of a chain) and, for medusa, `rank_accuracy` (the probability that head d's rank-c token is right, the
tree builder's acc_d(c)).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from declab.core.paths import cache_root
from declab.core.tree import causal_mask
from declab.models.draft import DEFAULT_WEIGHTS, load_tensors
from declab.models.heads import (HERE, EagleLayer, HydraHeads, MedusaHeads, eagle_config, read_heads_info,
                                 save_heads)
from tools.draft_build import kl_loss, load_base
from tools.heads_acceptance import build_acceptance
from tools.heads_kangaroo import train_kangaroo
from tools.heads_data import MAX_NEW, NUM_HELD_OUT, NUM_TRAIN, TOP_K, stage_answers, stage_states

OUT = HERE / "heads" / "smollm2-135m"
KINDS = ("medusa", "hydra", "eagle", "kangaroo", "acceptance")
EXIT_LAYER = 2            # Kangaroo's E (D.4 default)
NUM_HEADS = 4
NUM_NEGATIVES = 4096
RANKS = 10                # Medusa's TOPK: ranks whose accuracy the tree builder reads
EPOCHS = {"medusa": 8.0, "hydra": 2.0, "eagle": 10.0, "kangaroo": 8.0}   # what fits the per-kind time limit on 2 cores


# ------------------------------------------------------------------------------------------------ positions
class Flat:
    """All records of a split laid end to end: F [N, H] (float16 states), ids [N], for every answer position t of
    every record (t = n_p-1 .. L-2, the ones predicting answer tokens) its global index g and how many tokens
    follow it in its record (r = L-1-t), and the teacher's top-K at every answer position."""

    def __init__(self, records: list[dict]):
        self.F = torch.cat([r["f"] for r in records])                                        # [N, H]
        self.ids = torch.cat([torch.as_tensor(r["ids"]) for r in records] + [torch.zeros(NUM_HEADS + 2,
                                                                                          dtype=torch.long)])
        K = records[0]["top_idx"].shape[1]
        self.top_idx = torch.zeros(len(self.F), K, dtype=torch.long)                         # [N, K]
        self.top_logp = torch.full((len(self.F), K), -1e4)                                   # [N, K]
        g, r, base = [], [], 0
        for rec in records:
            L, n_p = len(rec["ids"]), rec["n_prompt"]
            t = torch.arange(n_p - 1, L - 1)
            g.append(base + t)
            r.append(L - 1 - t)
            self.top_idx[base + t] = rec["top_idx"].long()
            self.top_logp[base + t] = rec["top_logp"].float()
            base += L
        self.g, self.r = torch.cat(g), torch.cat(r)                                          # [M], [M]

    def batches(self, size: int, gen: torch.Generator):
        perm = torch.randperm(len(self.g), generator=gen)
        for b in range(0, len(perm), size):
            yield perm[b:b + size]


def rank_hits(logits: torch.Tensor, label: torch.Tensor, ranks: int = RANKS) -> torch.Tensor:
    """[n, V], [n] -> counts [ranks]: how often the label is the rank-c token (c = 0..ranks-1)."""
    top = logits.topk(ranks, dim=-1).indices                                                 # [n, ranks]
    return (top == label[:, None]).sum(0)


def schedule(opt, total: int, warm_frac: float = 0.03):
    total = max(1, total)
    warm = max(1, int(total * warm_frac))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))


# ------------------------------------------------------------------------------------------------ Medusa / Hydra
def head_inputs(kind: str, module, flat: Flat, g: torch.Tensor, k: int, embed: torch.Tensor) -> torch.Tensor:
    """State of head k (1-based) at answer positions g: medusa ResBlock_k(f_t); hydra head_k(f_t, E(x_{t+1..t+k}))."""
    f = flat.F[g].float()                                                                    # [n, H]
    if kind == "medusa":
        return module.heads[k - 1](f)
    toks = flat.ids[g[:, None] + torch.arange(1, k + 1)]                                      # [n, k]
    return module.forward_head(k, f, embed[toks])                                            # [n, H]


def head_targets(kind: str, flat: Flat, g: torch.Tensor, k: int):
    """medusa: the answer token at t+k+1 (hard label); hydra: the teacher's top-K at t+k (same token predicted)."""
    if kind == "medusa":
        return flat.ids[g + k + 1][:, None], torch.zeros(len(g), 1)
    return flat.top_idx[g + k], flat.top_logp[g + k]


def eval_heads(kind: str, module, flat: Flat, head: torch.Tensor, embed: torch.Tensor) -> dict:
    module.eval()
    K = len(module.heads)
    hits = torch.zeros(K, RANKS)
    n = torch.zeros(K)
    with torch.inference_mode():
        for b in range(0, len(flat.g), 1024):
            g, r = flat.g[b:b + 1024], flat.r[b:b + 1024]
            for k in range(1, K + 1):
                keep = g[r >= k + 1]
                if len(keep):
                    logits = head_inputs(kind, module, flat, keep, k, embed) @ head.T        # [n, V]
                    hits[k - 1] += rank_hits(logits, flat.ids[keep + k + 1])
                    n[k - 1] += len(keep)
    module.train()
    acc = (hits / n.clamp_min(1)[:, None])
    return {"top1_by_offset": [round(float(a), 4) for a in acc[:, 0]],
            "top5_by_offset": [round(float(a), 4) for a in acc[:, :5].sum(1)],
            "rank_accuracy": [[round(float(x), 4) for x in row] for row in acc],
            "positions": int(n[0])}


def train_heads(kind: str, states: dict, base, epochs: float = 2.0, lr: float = 1e-3, batch: int = 256,
                time_limit_s: float = 900, seed: int = 0, log=print):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    H = base.config.hidden_size
    module = (MedusaHeads if kind == "medusa" else HydraHeads)(H, NUM_HEADS)
    head = base.lm_head.weight.detach()                                                      # [V, H] frozen
    embed = base.model.embed_tokens.weight.detach()                                          # [V, H] frozen
    train, held = Flat(states["train"]), Flat(states["held_out"])
    steps = int(math.ceil(len(train.g) / batch) * epochs)
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.0)
    sched = schedule(opt, steps)
    t0, step = time.perf_counter(), 0
    bar = tqdm(total=steps, desc=kind, unit="step")
    while step < steps and time.perf_counter() - t0 < time_limit_s:
        for g in train.batches(batch, gen):
            gp, r = train.g[g], train.r[g]
            loss = 0.0
            for k in range(1, NUM_HEADS + 1):
                keep = gp[r >= k + 1]
                tidx, tlogp = head_targets(kind, train, keep, k)
                lk, _ = kl_loss(head_inputs(kind, module, train, keep, k, embed), head, tidx, tlogp,
                                NUM_NEGATIVES, gen)
                loss = loss + lk
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
            if step >= steps or time.perf_counter() - t0 > time_limit_s:
                break
    bar.close()
    train_s = time.perf_counter() - t0
    held_out = eval_heads(kind, module, held, head, embed)
    log(f"  {kind}: {step} steps {train_s:.0f}s held-out top-1 by offset {held_out['top1_by_offset']}")
    info = {"kind": kind, "num_heads": NUM_HEADS, "layers": 1, "epochs": epochs, "steps": step, "lr": lr,
            "batch_positions": batch, "num_negatives": NUM_NEGATIVES, "train_positions": len(train.g),
            "train_s": round(train_s, 1), "held_out": held_out,
            "loss": "CE on the answer token (legacy Medusa trainer)" if kind == "medusa" else
                    "soft-CE to the base distribution predicting the same token (Hydra++)"}
    return module, info


# ------------------------------------------------------------------------------------------------ EAGLE
def eagle_batch(records: list[dict], idx: list[int], embed: torch.Tensor, noise: float, gen):
    """Right-padded EAGLE inputs: E(x_{j+1}) and f_j (+ noise) for j = 0..L-2, targets f_{j+1}, an additive causal
    mask with padding, and the (row, j) pairs whose target position j+1 is an answer position (p-loss)."""
    W = max(len(records[i]["ids"]) - 1 for i in idx)
    H = embed.shape[1]
    emb, feats, tgt = torch.zeros(len(idx), W, H), torch.zeros(len(idx), W, H), torch.zeros(len(idx), W, H)
    valid = torch.zeros(len(idx), W, dtype=torch.bool)
    pos, tidx, tlogp = [], [], []
    for b, i in enumerate(idx):
        rec = records[i]
        L, n_p = len(rec["ids"]), rec["n_prompt"]
        f = rec["f"].float()                                                                 # [L, H]
        emb[b, :L - 1] = embed[torch.as_tensor(rec["ids"][1:])]
        feats[b, :L - 1] = f[:L - 1]
        tgt[b, :L - 1] = f[1:]
        valid[b, :L - 1] = True
        j = torch.arange(max(n_p - 2, 0), L - 2)                                             # j+1 in answer positions
        pos.append(torch.stack([torch.full_like(j, b), j], 1))
        tidx.append(rec["top_idx"][j + 1 - (n_p - 1)].long())
        tlogp.append(rec["top_logp"][j + 1 - (n_p - 1)].float())
    if noise:
        feats = feats + (torch.rand(feats.shape, generator=gen) - 0.5) * noise
    allowed = torch.tril(torch.ones(W, W, dtype=torch.bool))[None] & valid[:, None, :]        # [B, W, W]
    allowed |= torch.eye(W, dtype=torch.bool)[None]                                          # padding rows: no NaN
    mask = torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)[:, None]   # [B,1,W,W]
    return emb, feats, tgt, valid, mask, torch.cat(pos), torch.cat(tidx), torch.cat(tlogp)


def eagle_forward(module, base, emb, feats, mask):
    positions = torch.arange(emb.shape[1])[None].expand(emb.shape[0], -1)                     # [B, W]
    rot = base.model.rotary_emb(feats, positions)
    return module(emb, feats, rot, attention_mask=mask)                                      # [B, W, H]


def eval_eagle(module, base, records: list[dict], offsets: int = NUM_HEADS) -> dict:
    """Top-1 by offset on held-out records. Stream 1 entry t is (E(x_{t+1}), true f_t) at position t; its output
    f^_{t+1} drafts x_{t+2} (offset 1). Stream s > 1 entry t is (E(x_{t+s}), stream s-1's output at t) at
    position t+s-1, attending to the true entries <= t and to streams 2..s at t (what the drafter's cache holds when
    it drafts s tokens after f_t); its output drafts x_{t+s+1}. The true tokens are fed, so offset s measures the
    conditional acceptance of a chain's s-th token."""
    module.eval()
    head = base.lm_head.weight.detach()
    embed = base.model.embed_tokens.weight.detach()
    hits, n = torch.zeros(offsets), torch.zeros(offsets)
    neg = torch.finfo(torch.float32).min
    with torch.inference_mode():
        for rec in records:
            ids = torch.as_tensor(rec["ids"])
            L, n_p = len(ids), rec["n_prompt"]
            W = L - 1
            xs_e, xs_f, xs_p = [embed[ids[1:]]], [rec["f"][:W].float()], [torch.arange(W)]
            tri, eye = torch.tril(torch.ones(W, W, dtype=torch.bool)), torch.eye(W, dtype=torch.bool)
            out = None
            for s in range(1, offsets + 1):
                if s > 1:
                    e = torch.zeros(W, embed.shape[1])
                    e[:L - s] = embed[ids[s:]]                                               # E(x_{t+s})
                    xs_e.append(e)
                    xs_f.append(out)
                    xs_p.append(torch.arange(W) + s - 1)
                allowed = torch.zeros(s * W, s * W, dtype=torch.bool)
                for a in range(s):
                    allowed[a * W:(a + 1) * W, :W] = tri
                    for c in range(1, a + 1):
                        allowed[a * W:(a + 1) * W, c * W:(c + 1) * W] = eye
                mask = torch.zeros(allowed.shape).masked_fill_(~allowed, neg)[None, None]    # [1, 1, sW, sW]
                x_f = torch.cat(xs_f)[None]                                                  # [1, sW, H]
                rot = base.model.rotary_emb(x_f, torch.cat(xs_p)[None])
                out = module(torch.cat(xs_e)[None], x_f, rot, attention_mask=mask)[0, -W:]   # [W, H] stream s
                t = torch.arange(max(n_p - 2, 0), L - 1 - s)                                 # label x_{t+s+1}
                hits[s - 1] += float(((out[t] @ head.T).argmax(-1) == ids[t + s + 1]).sum())
                n[s - 1] += len(t)
    module.train()
    return {"top1_by_offset": [round(float(h / max(c, 1)), 4) for h, c in zip(hits, n)], "positions": int(n[0])}


def train_eagle(states: dict, base, epochs: float = 6.0, lr: float = 3e-4, max_tokens: int = 2048,
                time_limit_s: float = 900, seed: int = 0, log=print):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    cfg = eagle_config(base.config)
    module = EagleLayer(cfg)
    # start as the identity, f^_{j+1} = f_j: fc = [0 | I], the layer's output projections (o_proj, down_proj) at 0
    # so both residual branches add nothing; its other weights from the target's last layer (EAGLE trains from
    # scratch for 20 epochs, out of this budget)
    last = base.model.layers[-1].state_dict()
    module.layer.load_state_dict({k: v for k, v in last.items() if not k.startswith("input_layernorm")}, strict=False)
    H = cfg.hidden_size
    with torch.no_grad():
        module.fc.weight.zero_()
        module.fc.weight[:, H:].copy_(torch.eye(H))
        module.fc.bias.zero_()
        module.layer.self_attn.o_proj.weight.zero_()
        module.layer.mlp.down_proj.weight.zero_()
    head = base.lm_head.weight.detach()
    embed = base.model.embed_tokens.weight.detach()
    noise = 0.2 * 512 / H
    train = states["train"]
    order = sorted(range(len(train)), key=lambda i: len(train[i]["ids"]))
    groups, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * len(train[i]["ids"]) > max_tokens:
            groups.append(cur)
            cur = []
        cur.append(i)
    groups.append(cur)
    steps = int(len(groups) * epochs)
    opt = torch.optim.AdamW(module.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = schedule(opt, steps)
    t0, step = time.perf_counter(), 0
    bar = tqdm(total=steps, desc="eagle", unit="step")
    while step < steps and time.perf_counter() - t0 < time_limit_s:
        for p in torch.randperm(len(groups), generator=gen).tolist():
            emb, feats, tgt, valid, mask, pos, tidx, tlogp = eagle_batch(train, groups[p], embed, noise, gen)
            fhat = eagle_forward(module, base, emb, feats, mask)                             # [B, W, H]
            vloss = torch.nn.functional.smooth_l1_loss(fhat[valid], tgt[valid])
            ploss, _ = kl_loss(fhat[pos[:, 0], pos[:, 1]], head, tidx, tlogp, NUM_NEGATIVES, gen)
            loss = vloss + 0.1 * ploss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_value_(module.parameters(), 0.5)
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            bar.set_postfix(v=f"{float(vloss.detach()):.3f}", p=f"{float(ploss.detach()):.3f}")
            if step >= steps or time.perf_counter() - t0 > time_limit_s:
                break
    bar.close()
    train_s = time.perf_counter() - t0
    held_out = eval_eagle(module, base, states["held_out"])
    log(f"  eagle: {step} steps {train_s:.0f}s held-out top-1 by offset {held_out['top1_by_offset']}")
    info = {"kind": "eagle", "epochs": epochs, "steps": step, "lr": lr, "betas": [0.9, 0.95], "grad_clip_value": 0.5,
            "input_noise": round(noise, 4), "loss": "SmoothL1(f^, f) + 0.1 soft-CE(p-loss)",
            "init": "identity (fc = [0 | I], o_proj = down_proj = 0), other weights from the target's last layer", "max_tokens": max_tokens,
            "train_positions": sum(len(r["ids"]) - 1 for r in train), "train_s": round(train_s, 1),
            "held_out": held_out}
    return module, info


# ------------------------------------------------------------------------------------------------ build
def recipe() -> dict:
    return {"base": "smollm2-135m-instruct", "train_prompts": NUM_TRAIN, "held_out_prompts": NUM_HELD_OUT,
            "max_new": MAX_NEW, "teacher_top_k": TOP_K, "answers": "greedy",
            "prompts": "tools/draft_data.py build_prompts (disjoint held-out topics)"}


def draft_vocab() -> torch.Tensor:
    """The embedded draft's FR-Spec vocabulary (16k most frequent tokens): the heads' drafting vocabulary."""
    return load_tensors(DEFAULT_WEIGHTS)["lm_head.vocab_ids"]


def build(kinds, force: bool = False, time_limit_s: float = 900, out_dir: Path = OUT, log=print) -> dict:
    work = cache_root() / "heads-build"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    answers = stage_answers(work, log=log)
    states = stage_states(work, answers, EXIT_LAYER, log=log)
    base, _tok = load_base()
    base.requires_grad_(False)
    done = {}
    for kind in kinds:
        out = out_dir / ("acceptance-smollm2-135m-draft.safetensors" if kind == "acceptance" else f"{kind}.safetensors")
        if out.exists() and not force:
            log(f"{kind}: {out} exists (--force rebuilds it)")
            done[kind] = read_heads_info(out)
            continue
        t1 = time.perf_counter()
        if kind in ("medusa", "hydra"):
            module, info = train_heads(kind, states, base, epochs=EPOCHS[kind], time_limit_s=time_limit_s, log=log)
        elif kind == "eagle":
            module, info = train_eagle(states, base, epochs=EPOCHS[kind], time_limit_s=time_limit_s, log=log)
        elif kind == "kangaroo":
            # epoch-bound (8 epochs), so a rebuild repeats the same steps whatever the machine's speed
            done[kind] = train_kangaroo(states, base, out, time_limit_s=None, max_epochs=EPOCHS[kind], log=log)
            continue
        else:
            done[kind] = build_acceptance(answers, states, out, time_limit_s=time_limit_s, log=log)
            continue
        tensors = {f"heads.{k}": v for k, v in module.state_dict().items()}
        tensors["draft_vocab_ids"] = draft_vocab()
        info = dict(recipe(), **info, build_s=round(time.perf_counter() - t1, 1), threads=torch.get_num_threads())
        save_heads(out, tensors, info, weights="int8" if kind == "hydra" else "float16")
        log(f"saved {out} ({out.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t1:.0f}s")
        done[kind] = info
    log(f"build {time.perf_counter() - t0:.0f}s")
    return done


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.heads_build", description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["build", "info"])
    ap.add_argument("--only", default=",".join(KINDS), help=f"comma-separated kinds (default: all of {KINDS})")
    ap.add_argument("--force", action="store_true", help="rebuild kinds whose file exists")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", default=str(OUT), help="where the files go (default: the shipped heads folder; "
                                                        "another folder to check a rebuild against them)")
    ap.add_argument("--time-limit", type=float, default=1080, help="training seconds per kind (issue: <= 20 min)")
    args = ap.parse_args(argv)
    kinds = [k.strip() for k in args.only.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        ap.error(f"unknown kind {bad[0]!r}; kinds: {', '.join(KINDS)}")
    torch.set_num_threads(args.threads)
    if args.command == "build":
        build(kinds, args.force, args.time_limit, Path(args.out_dir))
    else:
        for k in kinds:
            name = "acceptance-smollm2-135m-draft" if k == "acceptance" else k
            path = Path(args.out_dir) / f"{name}.safetensors"
            print(k, json.dumps(read_heads_info(path).get("held_out")) if path.exists() else "(not built)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
