"""KL curves of the grammar strategies: KL(empirical || target) against the number of samples, and the target.

The target is the exact grammar-conditioned distribution Q when exact mode could enumerate the language
(strategies/grammar/exact.py). Otherwise it is the paper's explored-support approximation (docs/strategies.md#gcd:
the support is the distinct complete samples of this run, each weighted by its likelihood P(w), renormalised;
`explored_target`), and the run says so (`exact` = False on the kl rows). Differences from the paper's
evaluation, on purpose: outcomes are token sequences (two tokenisations of one string are two outcomes, as in Q's
definition over P); the explored support is this run's own samples (the paper pools ASAp's and GCD's, which needs
two runs: put them side by side on the Compare page, or see bench/grammar.py); the empirical distribution counts
complete samples only (a sample cut by the budget is outside L and is counted in `incomplete`).
"""

from __future__ import annotations

import math

import torch

KL_POINTS = 200                     # `kl` rows at most (sample counts on a log/linear grid)


def kl(p: dict, q: dict) -> float:
    """KL(p || q) in nats over p's support (scipy.stats.entropy's definition); inf where q = 0 < p."""
    total = 0.0
    for k, pk in p.items():
        if pk <= 0:
            continue
        qk = q.get(k, 0.0)
        if qk <= 0:
            return float("inf")
        total += pk * math.log(pk / qk)
    return total


def sample_grid(n: int, points: int = KL_POINTS) -> list[int]:
    """Sample counts 1..n at which the KL curve is evaluated: every count up to `points`, else a log+linear grid."""
    if n <= points:
        return list(range(1, n + 1))
    log = {int(round(x)) for x in torch.logspace(0, math.log10(n), points // 2).tolist()}
    lin = {int(round(x)) for x in torch.linspace(1, n, points // 2).tolist()}
    return sorted((log | lin) & set(range(1, n + 1)))


def kl_curve(keys: list, target: dict, grid: list[int] | None = None) -> list[dict]:
    """Per n in grid: KL(empirical of the complete samples among the first n || target); `kl_window` the same over
    the last ceil(n/4) samples (a window that grows with n); `kl_fixed` the reference plot's window
    (transformers-GAD scripts/plot/plot.py `count_appearance_all`): a FIXED width W = N // 4 of the run's N samples,
    the W samples ending at n (its curve's point i = n - W - 1; defined for n > W, NaN before); plus the
    incomplete count."""
    grid = grid or sample_grid(len(keys))
    width = len(keys) // 4
    rows = []
    for n in grid:
        first = keys[:n]
        window = keys[n - math.ceil(n / 4): n]
        fixed = _kl_of(keys[n - width: n], target) if width and n > width else float("nan")
        rows.append({"samples": n, "kl": _kl_of(first, target), "kl_window": _kl_of(window, target),
                     "kl_fixed": fixed, "incomplete": sum(k is None for k in first)})
    return rows


def _kl_of(keys: list, target: dict) -> float:
    counts: dict = {}
    for k in keys:
        if k is not None:
            counts[k] = counts.get(k, 0) + 1
    total = sum(counts.values())
    if not total:
        return float("nan")
    return kl({k: c / total for k, c in counts.items()}, target)


def explored_target(samples: list) -> tuple[dict, dict]:
    """The paper's approximation of Q when it cannot be enumerated: the distinct complete samples, each weighted
    by its likelihood P(w), renormalised. `samples`: the run's SampleResults (strategies.grammar.loop; their
    `key` and `loglik`). Returns (q, p)."""
    p = {s.key: math.exp(s.loglik) for s in samples if s.key is not None}
    z = sum(p.values())
    return ({k: v / z for k, v in p.items()} if z > 0 else {}), p
