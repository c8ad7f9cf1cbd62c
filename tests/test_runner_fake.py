"""Runner, greedy and sample on the scripted fake model: exact and fast."""

import threading

import pytest
import torch

from declab.core.errors import UserError
from tests.fake import FakeLM
from declab.run import Run, RunRequest, validate


def run(lm, strategy="greedy", prompt=" the cat", n=20, seed=0, **params):
    return Run(lm, RunRequest(model=lm.key, strategy=strategy, prompt=prompt, params=params, max_new_tokens=n,
                              seed=seed)).run_to_end()


def reference_greedy(lm, prompt_ids, n):
    """No cache, no tricks: recompute the full context each step and take the argmax."""
    ctx, out = list(prompt_ids), []
    for _ in range(n):
        token = int(lm.logits_fn(ctx).argmax())
        if token in lm.eos_ids:
            break
        out.append(token)
        ctx.append(token)
    return out


@pytest.fixture(autouse=True)
def _fake_registry(fake_registry):
    yield


def test_greedy_equals_the_no_cache_reference(fake_lm):
    for prompt in (" the cat", " a dog ran", " it was very"):
        ids = fake_lm.encode_prompt(prompt, "raw")
        res = run(fake_lm, prompt=prompt, n=30)
        assert res.status == "ok"
        assert res.sequences[0].token_ids == reference_greedy(fake_lm, ids, 30)


def test_greedy_trace_has_one_token_row_and_alternatives_per_step(fake_lm):
    res = run(fake_lm, n=8)
    df = res.frame
    tokens = df[df.kind == "token"]
    cands = df[df.kind == "candidate"]
    assert len(tokens) == len(cands) / 5
    assert tokens["step"].tolist() == list(range(len(tokens)))
    # the chosen token is the rank-0 candidate, and its logprob is the model's log-softmax
    for _, row in tokens.iterrows():
        alt = cands[(cands.step == row.step) & (cands["rank"] == 0)].iloc[0]
        assert alt.token_id == row.token_id and alt.accepted
    ids = fake_lm.encode_prompt(" the cat", "raw")
    logp = torch.log_softmax(fake_lm.logits_fn(ids), -1)
    first = tokens.iloc[0]
    assert first.logprob == pytest.approx(float(logp.max()), abs=1e-6)
    assert first.position == len(ids)
    assert first.entropy == pytest.approx(float(-(logp.exp() * logp).sum() / torch.log(torch.tensor(2.0))), rel=1e-5)
    assert (tokens.dt_ms >= 0).all() and tokens.t_ms.is_monotonic_increasing


def test_eos_ends_the_run_and_is_excluded():
    script = {3: 5, 5: 0}          # after " sat" comes " mat", then EOS

    def fn(ctx):
        logits = torch.zeros(32)
        logits[script.get(ctx[-1], 3)] = 5.0
        return logits
    lm = FakeLM(fn)
    res = run(lm, prompt=" the cat", n=50)
    assert res.sequences[0].token_ids == [3, 5]
    assert res.sequences[0].text == " sat mat"
    df = res.frame
    assert df[df.kind == "token"].token_id.tolist() == [3, 5, 0]   # the EOS step is traced


def test_max_new_tokens_is_honoured(fake_lm):
    lm = FakeLM(lambda ctx: torch.arange(32.0))          # always the last token, never EOS
    res = run(lm, n=7)
    assert len(res.sequences[0].token_ids) == 7
    assert lm.forwards == 7                               # prefill + 6 steps: no wasted forward


def test_sample_is_reproducible_by_seed_and_varies_across_seeds(fake_lm):
    a = run(fake_lm, "sample", n=25, seed=11, temperature=1.5).sequences[0].token_ids
    b = run(fake_lm, "sample", n=25, seed=11, temperature=1.5).sequences[0].token_ids
    others = {tuple(run(fake_lm, "sample", n=25, seed=s, temperature=1.5).sequences[0].token_ids) for s in range(5)}
    assert a == b
    assert len(others) > 1


def test_sample_with_top_k_1_is_greedy(fake_lm):
    greedy = run(fake_lm, n=20).sequences[0].token_ids
    assert run(fake_lm, "sample", n=20, seed=3, top_k=1).sequences[0].token_ids == greedy


def test_sample_trace_records_kept_set_size(fake_lm):
    res = run(fake_lm, "sample", n=10, top_k=4, seed=1)
    tokens = res.frame[res.frame.kind == "token"]
    assert (tokens["k"] == 4).all()
    assert (tokens["score"] >= tokens["logprob"] - 1e-6).all()     # truncation only raises the sampled prob


def test_stop_ends_a_run_after_the_current_step_and_keeps_what_it_made(fake_lm):
    lm = FakeLM(lambda ctx: torch.arange(32.0))
    r = Run(lm, RunRequest(model="fake", strategy="greedy", prompt=" the", max_new_tokens=100))
    seen = 0
    for ev in r.events():
        seen += 1
        if seen == 5:
            r.stop.set()
    assert r.result.status == "stopped"
    assert len(r.result.sequences[0].token_ids) == 5
    assert r.result.meta["status"] == "stopped"


def test_failure_inside_a_strategy_is_recorded_not_raised(fake_lm):
    calls = {"n": 0}

    def fn(ctx):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("CUDA out of memory (simulated)")
        return torch.arange(32.0)
    res = run(FakeLM(fn), n=10)
    assert res.status == "failed" and "out of memory" in res.error
    assert res.sequences[0].token_ids == [31, 31]


def test_two_runs_on_one_model_in_threads_do_not_interfere(fake_lm):
    expected = {s: run(fake_lm, "sample", n=30, seed=s).sequences[0].token_ids for s in (1, 2)}
    got = {}

    def work(s):
        got[s] = run(fake_lm, "sample", n=30, seed=s).sequences[0].token_ids
    threads = [threading.Thread(target=work, args=(s,)) for s in (1, 2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert got == expected


@pytest.mark.parametrize("kwargs, message", [
    (dict(strategy="nope"), "unknown strategy 'nope'; known strategies: greedy, sample"),
    (dict(model="ghost"), "unknown model 'ghost'"),
    (dict(prompt="   "), "prompt is empty"),
    (dict(max_new_tokens=0), r"max new tokens must be an integer in \[1, 4096\], got 0"),
    (dict(max_new_tokens=5000), r"\[1, 4096\]"),
    (dict(strategy="sample", params={"temperature": 0}), r"sample: temperature must be in \(0.0, 100.0\], got 0"),
    (dict(strategy="sample", params={"top_p": "1.5"}), r"sample: top_p must be in \(0.0, 1.0\], got 1.5"),
    (dict(strategy="sample", params={"top_k": "many"}), r"sample: top_k must be int"),
    (dict(strategy="sample", params={"beam": 3}), "sample: unknown parameter 'beam'; parameters: temperature"),
    (dict(prompt_format="xml"), "prompt format must be raw or chat"),
])
def test_bad_requests_get_one_line_messages(kwargs, message):
    req = dict(model="fake", strategy="greedy", prompt="hi", max_new_tokens=5)
    req.update(kwargs)
    with pytest.raises(UserError, match=message) as e:
        validate(RunRequest(**req))
    assert "\n" not in str(e.value)


def test_prompt_longer_than_the_context_is_refused(fake_lm):
    with pytest.raises(UserError, match="exceeds the context length 512"):
        Run(fake_lm, RunRequest(model="fake", strategy="greedy", prompt=" the" * 500, max_new_tokens=20))


def test_metadata_records_what_reproduces_the_run(fake_lm):
    res = run(fake_lm, "sample", n=5, seed=4, top_p=0.9)
    m = res.meta
    assert m["strategy"] == "sample" and m["seed"] == 4 and m["params"]["top_p"] == 0.9
    assert m["prompt"] == " the cat" and m["prompt_ids"] == fake_lm.encode_prompt(" the cat", "raw")
    assert set(m["versions"]) >= {"torch", "transformers", "declab"}
    assert m["columns"]["token_text"] == "string"
    assert m["metrics"]["new_tokens"] == len(res.sequences[0].token_ids)
