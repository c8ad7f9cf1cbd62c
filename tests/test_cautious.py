"""Cautious next-token prediction (docs/strategies.md#cautious): the trial-count formula; every run equal to an
independent no-cache reference (same draws, trials sequential); interventions exactly at the scripted
high-entropy steps, the kept trial the most confident one, rejected trials as branches whose rows carry the
model's own log-probabilities in their context (the forked cache is right); H_high = inf and max_trials = 1 are
plain sampling with the same draws as `sample`; the greedy mode below the gate is greedy; bad settings refused;
a short run on the embedded model."""

from __future__ import annotations

import math

import pytest
import torch

from declab.core.errors import UserError
from declab.core.sampling import draw_from, make_generator
from declab.run import Run, RunRequest
from strategies.cautious import CautiousConfig, gate_entropy_nats
from tests.fake import DEFAULT_VOCAB, FakeLM

V = len(DEFAULT_VOCAB)
ID = {t: i for i, t in enumerate(DEFAULT_VOCAB)}
NEG = -math.inf


def dist(*tokens: str) -> torch.Tensor:
    """Logits: uniform over the named tokens, impossible elsewhere."""
    out = torch.full((V,), NEG)
    for t in tokens:
        out[ID[t]] = 0.0
    return out


# After each last token: the next-token distribution. " cat" is the only high-entropy decision (ln 3 nats); the
# trials then meet " dog" (2 ways) and " ran" (4 ways) before punctuation.
SCRIPT = {" the": dist(" cat"), " cat": dist(" sat", " dog", " ran"), " sat": dist("."),
          " dog": dist(" ran", " sat"), " ran": dist(" on", " mat", " a", " and"), " on": dist(","),
          " mat": dist("."), " a": dist("!"), " and": dist("\n")}


def script(context: list[int]) -> torch.Tensor:
    last = DEFAULT_VOCAB[context[-1]] if context else " the"
    return SCRIPT.get(last, dist(" the")).clone()


def run(lm, n=24, seed=0, strategy="cautious", prompt=" the", **params):
    return Run(lm, RunRequest(model=lm.key, strategy=strategy, prompt=prompt, params=params, max_new_tokens=n,
                              seed=seed)).run_to_end()


def tokens(res, branch=0):
    f = res.frame
    return f[(f.kind == "token") & (f.branch_id == branch)].reset_index(drop=True)


def reference(lm, prompt_ids, cfg: CautiousConfig, n, seed):
    """CNTP without a KV cache, every trial's context recomputed: (emitted ids, [(step, trials, kept)])."""
    g = make_generator(seed, "cpu")
    stops = {ID[t] for t in (".", ",", "\n", "!")} | {0}
    out, events = [], []
    while len(out) < n:
        logits = lm.logits_fn(prompt_ids + out)
        probs = torch.softmax(cfg.processed(logits), -1)
        k = cfg.trials(float(gate_entropy_nats(probs)))
        if k == 1:
            tok = int(logits.argmax()) if cfg.temperature == 0 else draw_from(probs, g)
            out.append(tok)
            if tok == 0:
                break
            continue
        cap = min(cfg.max_trial_tokens, n - len(out))
        trials = [[draw_from(probs, g)] for _ in range(k)]
        lps = [[math.log(float(probs[t[0]]))] for t in trials]
        done = [t[-1] in stops or len(t) >= cap for t in trials]
        while not all(done):
            for i in range(k):                       # one round: every unfinished trial draws once, in order
                if done[i]:
                    continue
                p = torch.softmax(cfg.processed(lm.logits_fn(prompt_ids + out + trials[i])), -1)
                tok = draw_from(p, g)
                trials[i].append(tok)
                lps[i].append(math.log(float(p[tok])))
                done[i] = tok in stops or len(trials[i]) >= cap
        ppl = [math.exp(-sum(x) / len(x)) for x in lps]
        kept = min(range(k), key=lambda i: (ppl[i], i))
        events.append((len(out), trials, kept))
        out += trials[kept]
        if 0 in trials[kept]:
            out = out[:out.index(0) + 1]
            break
    return out, events


def test_trial_count_formula():
    cfg = CautiousConfig()                                         # N_max 10, H_low 0.01, H_high 1.5
    assert cfg.trials(0.0) == 1 and cfg.trials(0.01) == 1 and cfg.trials(1.5) == 10 and cfg.trials(9.0) == 10
    assert cfg.trials(math.log(3)) == int(1 + 9 * (math.log(3) - 0.01) / 1.49) == 7
    assert cfg.trigger_nats() == pytest.approx(0.01 + 1.49 / 9)
    assert cfg.trials(cfg.trigger_nats() - 1e-9) == 1 and cfg.trials(cfg.trigger_nats() + 1e-9) == 2
    assert CautiousConfig(entropy_threshold_high=math.inf).trials(50.0) == 1
    assert CautiousConfig(max_trials=1).trigger_nats() == math.inf


@pytest.mark.parametrize("seed,params", [(0, {}), (1, {}), (2, {"temperature": 1.0, "top_p": 1.0}),
                                         (3, {"temperature": 0.0}), (4, {"max_trial_tokens": 2})])
def test_matches_no_cache_reference(fake_registry, seed, params):
    lm = FakeLM(script)
    res = run(lm, n=30, seed=seed, **params)
    cfg = CautiousConfig(**params)
    ids, events = reference(lm, lm.encode_prompt(" the", "raw"), cfg, 30, seed)
    assert tokens(res).token_id.tolist() == ids
    trial_rows = res.frame[res.frame.kind == "trial"]
    assert sorted(set(trial_rows.step)) == [e[0] for e in events]
    for step, trials, kept in events:
        rows = trial_rows[trial_rows.step == step].sort_values("trial")
        assert [lm.encode_prompt(t, "raw") for t in rows.token_text] == trials
        assert rows.chosen.tolist() == [i == kept for i in range(len(trials))]


def test_interventions_at_the_scripted_steps_and_the_kept_trial_is_the_most_confident(fake_registry):
    lm = FakeLM(script)
    res = run(lm, n=40, seed=5)
    tok, f = tokens(res), res.frame
    prompt = lm.encode_prompt(" the", "raw")
    context = prompt + tok.token_id.tolist()
    # the gate fires exactly where the script is uncertain: after " cat" (ln 3 nats -> N = 7)
    decisions = tok[tok.gate_entropy.notna()]
    after_cat = [context[len(prompt) + s - 1] == ID[" cat"] for s in decisions.step]
    assert decisions.intervened.astype(bool).tolist() == after_cat and sum(after_cat) >= 3
    fired = decisions[decisions.intervened.astype(bool)]
    assert (fired.num_trials == 7).all()
    assert fired.gate_entropy.tolist() == pytest.approx([math.log(3) / math.log(2)] * len(fired), abs=1e-6)
    assert (decisions[~decisions.intervened.astype(bool)].num_trials == 1).all()
    for step in fired.step:
        trials = f[(f.kind == "trial") & (f.step == step)]
        assert len(trials) == 7 and trials.chosen.sum() == 1
        best = trials.loc[trials.trial_ppl.idxmin()]
        assert bool(best.chosen) and best.branch_id == 0
        # the kept trial is appended whole: the emitted tokens from this step on are its tokens
        kept = lm.encode_prompt(best.token_text, "raw")
        assert tok[tok.step >= step].token_id.tolist()[:len(kept)] == kept
        # its ppl from the script's own probabilities
        lp = [math.log(float(torch.softmax(script(context[:len(prompt) + step + j]), -1)[t]))
              for j, t in enumerate(kept)]
        assert best.trial_ppl == pytest.approx(math.exp(-sum(lp) / len(lp)))
        # every rejected trial is a branch: accepted False, first row hangs from branch 0, and each row's logprob
        # is the script's in that trial's own context (the forked cache rows saw the right tokens)
        for _, t in trials[~trials.chosen.astype(bool)].iterrows():
            rows = f[(f.kind == "token") & (f.branch_id == t.branch_id)].sort_values("step")
            assert not rows.accepted.any() and rows.parent_id.tolist() == [0] + [t.branch_id] * (len(rows) - 1)
            assert rows.step.tolist() == list(range(int(step), int(step + t.trial_len)))
            ids = rows.token_id.tolist()
            for j, (tid, lp_row) in enumerate(zip(ids, rows.logprob)):
                ctx_ids = context[:len(prompt) + step] + ids[:j]
                assert lp_row == pytest.approx(float(torch.log_softmax(script(ctx_ids), -1)[tid]))
    # one finish row names branch 0 as the chosen sequence
    fin = f[f.kind == "finish"]
    assert len(fin) == 1 and fin.branch_id.iloc[0] == 0
    m = res.meta["metrics"]
    assert m["interventions"] == len(fired) and m["mean_trials"] == 7.0 and m["decisions"] == len(decisions)


@pytest.mark.parametrize("params", [{"entropy_threshold_high": math.inf}, {"max_trials": 1}])
def test_no_gate_is_plain_sampling_with_the_same_draws(fake_registry, params):
    lm = FakeLM()                                    # the default hashed script: high entropy everywhere
    for seed in (0, 1):
        c = run(lm, n=24, seed=seed, prompt=" the cat", **params)
        s = run(lm, n=24, seed=seed, prompt=" the cat", strategy="sample", temperature=0.8, top_k=50, top_p=0.95)
        assert c.sequences[0].token_ids == s.sequences[0].token_ids
        assert not (c.frame.kind == "trial").any() and c.meta["metrics"]["interventions"] == 0
    assert run(lm, n=24, seed=0, prompt=" the cat").meta["metrics"]["interventions"] > 0   # the gate matters here


def test_greedy_mode_below_the_gate_is_greedy(fake_registry):
    lm = FakeLM()
    c = run(lm, n=20, prompt=" the cat", temperature=0.0, entropy_threshold_low=50.0, entropy_threshold_high=60.0)
    g = run(lm, n=20, prompt=" the cat", strategy="greedy")
    assert c.sequences[0].token_ids == g.sequences[0].token_ids


def test_seeded_runs_repeat(fake_registry):
    lm = FakeLM()
    a, b = run(lm, n=30, seed=3, prompt=" the cat"), run(lm, n=30, seed=3, prompt=" the cat")
    cols = ["kind", "step", "branch_id", "parent_id", "token_id", "score"]
    assert a.frame[cols].equals(b.frame[cols])


def test_bad_parameters():
    from declab.core import get_strategy
    s = get_strategy("cautious")
    with pytest.raises(UserError, match="entropy_threshold_high must be greater than entropy_threshold_low"):
        s.make_config({"entropy_threshold_low": "2", "entropy_threshold_high": "1"})
    with pytest.raises(UserError, match=r"max_trials must be in \[1, 32\]"):
        s.make_config({"max_trials": "0"})


@pytest.mark.model
def test_embedded_model(real_lm):
    """A chat prompt on the real model: trials happen, the kept trial is the least perplexed, and the emitted tokens'
    logprobs are the model's own (one no-cache forward over prompt + output), so the forked-and-cut cache is right."""
    req = RunRequest(model=real_lm.key, strategy="cautious", prompt="Name three colours.", max_new_tokens=16,
                     prompt_format="chat", seed=0, params={"max_trials": 4, "max_trial_tokens": 8})
    res = Run(real_lm, req).run_to_end()
    f = res.frame
    trials = f[f.kind == "trial"]
    assert len(trials) and res.meta["metrics"]["interventions"] >= 1
    for _, g in trials.groupby("step"):
        assert bool(g.loc[g.trial_ppl.idxmin()].chosen)
    tok = f[(f.kind == "token") & (f.branch_id == 0)]
    prompt = real_lm.encode_prompt("Name three colours.", "chat")
    ids = tok.token_id.tolist()
    full = real_lm.prefill(prompt + ids, all_logits=True).logits[0, len(prompt) - 1: len(prompt) + len(ids) - 1]
    lp = torch.log_softmax(full, -1).gather(1, torch.as_tensor(ids)[:, None])[:, 0]
    assert tok.logprob.tolist() == pytest.approx(lp.tolist(), abs=2e-3)
