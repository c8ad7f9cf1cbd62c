"""Mirostat on the embedded model: the control loop holds the observed surprise at tau (issue 6).

Per (version, tau): three seeds, each 32 warm-up + 256 measured tokens; the median of the three runs' mean observed
surprise (bits, under the full model distribution) must lie within 10% of tau, and every run within 25% (a run's
text can wander into a stretch where the model itself is sure of every token: mirostat only truncates, so it cannot
raise the surprise above what sampling everything gives there). Three seeds, not one, so the claim does not rest on
one lucky random stream.

Setup (issue 20: the suite's slowest file, 3.7 min, made ~10x cheaper without changing the claim): the 12 runs
(2 versions x 2 taus x 3 seeds) decode together as the rows of ONE batch, one B = 12 forward per token on a shared
prompt (all rows the same length, so no padding or mask), and each row is chosen by its own mirostat `Controller`,
the very selector `mirostat` hands the engine's per-token loop (strategies/mirostat.py; the Run/trace plumbing of
that loop is pinned by tests/test_mirostat.py on the fake model), with its own generator seeded like a run's
(`make_generator(seed)`). Same token counts, same tolerances, same per-run checks as before; only the forwards are
shared. A row's logits differ from a B = 1 forward's by float rounding only, so each row is a mirostat run on this
model as much as before (not the same random stream as a B = 1 run: seeds are just seeds). Why 256 measured tokens
stay: the mean of S over a window is exactly tau + (mu at its start - mu at its end) / (eta * length), so the test
bounds mu's drift over the window by 0.1 * tau * 256 = 77 bits (tau 3); fewer tokens would loosen that bound.
Measured under the heavy-job lock (2 cores, model load included): the file took 253 s as 12 separate runs and takes
59 s batched. Seen batched (seeds 0 / 1 / 2): v1 tau 3: 3.05 / 2.95 / 3.08, tau 5: 5.15 / 5.00 / 5.10; v2 tau 3:
2.47 / 2.98 / 2.98, tau 5: 5.25 / 4.48 (EOS after 257 tokens) / 4.94.

Prompt: mirostat can only hold tau between the surprise of the model's top token and that of sampling everything.
On this forum-thread prompt pure sampling gives 5.7-7.0 bits per token (seeds 0-2, measured here) and no early EOS,
so tau = 3 and tau = 5 are both reachable; on a story or chat prompt this small instruct model's pure-sampling
surprise is ~3-4.5 bits and tau = 5 is not. bench/mirostat.py draws the control loop beside top-k / top-p on one
prompt.
"""

import math
import statistics

import pytest
import torch

from declab.core.sampling import make_generator
from strategies.mirostat import Controller, MirostatConfig

pytestmark = pytest.mark.model

PROMPT = "Forum thread: What is the strangest thing you have ever found in a used book?\n\nReply #1:"
WARMUP, MEASURED, SEEDS = 32, 256, (0, 1, 2)
RUNS = [(version, tau, seed) for version in (1, 2) for tau in (3.0, 5.0) for seed in SEEDS]


@pytest.fixture(scope="module")
def batched_runs(real_lm):
    """Every run of RUNS decoded as one row of a batch: {(version, tau, seed): [(token, logprob, columns), ...]}."""
    lm = real_lm
    prompt = lm.encode_prompt(PROMPT, "raw")
    ctrls = [Controller(MirostatConfig(version=v, tau=tau), lm.vocab_size, make_generator(seed, lm.device))
             for v, tau, seed in RUNS]
    rows: list[list] = [[] for _ in RUNS]
    done = [False] * len(RUNS)
    eos = min(lm.eos_ids)
    out = lm.prefill([prompt] * len(RUNS))                                  # [B, T]
    for step in range(WARMUP + MEASURED):
        logp = out.logits.float().log_softmax(-1)                          # [B, V]
        nxt = []
        for b, ctrl in enumerate(ctrls):
            if done[b]:
                nxt.append(eos)                                             # a finished row idles
                continue
            choice = ctrl.apply(out.logits[b], step)
            ctrl.accept(choice.token)
            rows[b].append((choice.token, float(logp[b, choice.token]), choice.columns))
            done[b] = choice.token in lm.eos_ids
            nxt.append(choice.token)
        if all(done) or step + 1 == WARMUP + MEASURED:
            break
        out = lm.step(torch.tensor(nxt, dtype=torch.long)[:, None], out.cache)
    return dict(zip(RUNS, rows))


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("tau", [3.0, 5.0])
def test_mean_surprise_on_the_model_is_within_10_percent_of_tau(batched_runs, real_lm, version, tau):
    means = []
    for seed in SEEDS:
        rows = batched_runs[(version, tau, seed)]
        assert len(rows) >= WARMUP + MEASURED // 2                          # EOS, if any, late in the window
        full = [-lp / math.log(2) for _, lp, _ in rows]                    # bits, under the full model distribution
        assert [c["surprise"] for _, _, c in rows] == pytest.approx(full, abs=1e-4)   # surprise_from=full, temp 1
        assert all(1 <= c["k"] <= real_lm.vocab_size for _, _, c in rows)
        assert len({t for t, _, _ in rows[WARMUP:]}) > 40                  # not a loop
        means.append(statistics.fmean(full[WARMUP:]))
        print(f"mirostat v{version} tau={tau} seed {seed}: mean surprise {means[-1]:.3f} bits over "
              f"{len(rows) - WARMUP} tokens, mu {rows[WARMUP][2]['mu']:.2f} -> {rows[-1][2]['mu_after']:.2f}, "
              f"median k {statistics.median(c['k'] for _, _, c in rows):.0f}")
    assert abs(statistics.median(means) - tau) <= 0.1 * tau, means
    assert all(abs(m - tau) <= 0.25 * tau for m in means), means
