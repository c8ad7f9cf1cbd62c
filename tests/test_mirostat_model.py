"""Mirostat on the embedded model: the control loop holds the observed surprise at tau (issue 6).

Per (version, tau): three seeds, each 32 warm-up + 256 measured tokens; the median of the three runs' mean observed
surprise (bits, under the full model distribution) must lie within 10% of tau, and every run within 25% (a run's
text can wander into a stretch where the model itself is sure of every token: mirostat only truncates, so it cannot
raise the surprise above what sampling everything gives there). Three seeds, not one, so the claim does not rest on
one lucky random stream.

Prompt: mirostat can only hold tau between the surprise of the model's top token and that of sampling everything.
On this forum-thread prompt pure sampling gives 5.7-7.0 bits per token (seeds 0-2, measured here) and no early EOS,
so tau = 3 and tau = 5 are both reachable; on a story or chat prompt this small instruct model's pure-sampling
surprise is ~3-4.5 bits and tau = 5 is not. Seen here (CPU, float32, seeds 0 / 1 / 2): v1 tau 3: 3.04 / 2.99 / 3.08,
tau 5: 5.14 / 5.11 / 5.10; v2 tau 3: 2.47 / 2.98 (EOS after 257 tokens) / 2.98, tau 5: 5.27 / 4.97 / 4.89.
bench/mirostat.py draws the control loop beside top-k / top-p on one prompt.
"""

import math
import statistics

import pytest

from declab.run import Run, RunRequest
from tests.conftest import EMBEDDED

pytestmark = pytest.mark.model

PROMPT = "Forum thread: What is the strangest thing you have ever found in a used book?\n\nReply #1:"
WARMUP, MEASURED, SEEDS = 32, 256, (0, 1, 2)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("tau", [3.0, 5.0])
def test_mean_surprise_on_the_model_is_within_10_percent_of_tau(real_lm, version, tau):
    means = []
    for seed in SEEDS:
        res = Run(real_lm, RunRequest(model=EMBEDDED, strategy="mirostat", prompt=PROMPT, prompt_format="raw",
                                      params={"version": version, "tau": tau}, max_new_tokens=WARMUP + MEASURED,
                                      seed=seed)).run_to_end()
        t = res.frame[res.frame.kind == "token"].reset_index(drop=True)
        assert res.status == "ok" and len(t) >= WARMUP + MEASURED // 2       # EOS, if any, late in the window
        full = -t.logprob / math.log(2)                                     # bits, under the full model distribution
        assert t.surprise.tolist() == pytest.approx(full.tolist(), abs=1e-4)   # surprise_from=full, temperature 1
        assert (t.k >= 1).all() and (t.k <= real_lm.vocab_size).all()
        assert len(set(t.token_id.iloc[WARMUP:])) > 40                      # not a loop
        means.append(float(full.iloc[WARMUP:].mean()))
        print(f"mirostat v{version} tau={tau} seed {seed}: mean surprise {means[-1]:.3f} bits over "
              f"{len(t) - WARMUP} tokens, mu {t.mu.iloc[WARMUP]:.2f} -> {t.mu_after.iloc[-1]:.2f}, "
              f"median k {t.k.median():.0f}")
    assert abs(statistics.median(means) - tau) <= 0.1 * tau, means
    assert all(abs(m - tau) <= 0.25 * tau for m in means), means
