"""`sample`'s transformers processors (typical, epsilon, eta, top-h, repetition penalty, no-repeat n-grams) against
transformers 5.23's own LogitsProcessor classes, on many random rows and on the embedded model's rows; the `kept`
trace column; the parameters' ranges in the CLI.

Random rows come in several shapes (peaked, flat, many ties, Zipf-like, rows already truncated to -inf) and are
fed to our warper one [V] row at a time (the selector's path) and to transformers as a batch. "Same kept set" is
asserted exactly (the same tokens are finite and they keep the same values), the distributions to float tolerance.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (EpsilonLogitsWarper, EtaLogitsWarper, LogitsProcessorList,
                                                    MinPLogitsWarper, NoRepeatNGramLogitsProcessor,
                                                    RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopHLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper, TypicalLogitsWarper)

from declab.cli import main
from declab.core.sampling import (NgramBlocker, ban_tokens, context_mask, epsilon_filter, eta_filter,
                                  repetition_penalty, top_h_filter, typical_filter)
from declab.run import Run, RunRequest
from tests.conftest import EMBEDDED
from tests.fake import FakeLM, hashed_logits, no_eos

@pytest.fixture(autouse=True)
def _registry(request):
    """Fake-model tests see the fake registry; the embedded-model tests (mark `model`) the real one."""
    if "model" not in request.keywords:
        request.getfixturevalue("fake_registry")


WARPERS = {   # ours, transformers' class, the values tried
    "typical_p": (typical_filter, lambda v: TypicalLogitsWarper(mass=v), (0.2, 0.5, 0.9, 0.99)),
    "epsilon_cutoff": (epsilon_filter, lambda v: EpsilonLogitsWarper(epsilon=v), (1e-4, 3e-3, 0.02, 0.2)),
    "eta_cutoff": (eta_filter, lambda v: EtaLogitsWarper(epsilon=v), (1e-4, 1e-3, 0.01, 0.3)),
    "top_h": (top_h_filter, lambda v: TopHLogitsWarper(top_h=v), (0.1, 0.4, 0.8, 1.0)),
}
PENALTIES = (0.5, 1.2, 3.0)
NGRAM_SIZES = (1, 2, 3, 4)
N_ROWS_PER_SHAPE = 80           # x 5 shapes = 400 random rows of V = 300, plus 4 rows of V = 49152


def random_rows(seed: int = 0) -> torch.Tensor:
    """[404, 300 or 49152]: peaked, flat, tied, Zipf-like and partly -inf rows (returned as a list of [V])."""
    g = torch.Generator().manual_seed(seed)
    n, V = N_ROWS_PER_SHAPE, 300
    peaked = torch.randn(n, V, generator=g) * 8
    flat = torch.randn(n, V, generator=g) * 0.3
    ties = torch.randint(-4, 4, (n, V), generator=g).float() * 1.5                  # many equal logits
    ranks = torch.arange(1, V + 1).float().log()                                     # Zipf: l = -a ln(rank)
    zipf = torch.stack([-(0.5 + 2 * float(torch.rand(1, generator=g))) * ranks[torch.randperm(V, generator=g)]
                        for _ in range(n)])
    cut = torch.randn(n, V, generator=g) * 3
    cut = cut.masked_fill(torch.rand(n, V, generator=g) < 0.6, float("-inf"))
    cut[:, 0] = 5.0                                                                  # at least one finite
    big = torch.randn(4, 49152, generator=g) * torch.tensor([[1.0], [3.0], [6.0], [12.0]])
    return [r for block in (peaked, flat, ties, zipf, cut) for r in block] + list(big)


def random_contexts(seed: int = 1, n: int = 400) -> list[list[int]]:
    """Token id sequences over a small alphabet (so n-grams repeat), lengths 0..40."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(0, 41, (1,), generator=g))
        alphabet = 3 + i % 8
        out.append(torch.randint(0, alphabet, (length,), generator=g).tolist())
    return out


def assert_same(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """The same kept set with the same values; and the same distribution to float tolerance."""
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))
    assert torch.equal(ours, ref)
    assert torch.allclose(ours.softmax(-1), ref.softmax(-1), atol=1e-7, rtol=0)


def check_warper(name: str, rows: list[torch.Tensor]) -> int:
    ours_fn, make_ref, values = WARPERS[name]
    compared = 0
    for V in sorted({r.shape[-1] for r in rows}):
        batch = torch.stack([r for r in rows if r.shape[-1] == V])                    # [N, V]
        ids = torch.zeros(batch.shape[0], 1, dtype=torch.long)
        for v in values:
            ref = make_ref(v)(ids, batch.clone())                                     # [N, V]
            for i, row in enumerate(batch):
                assert_same(ours_fn(row, v), ref[i])
                compared += 1
    return compared


# ------------------------------------------------------------------------------------------------ random rows
@pytest.mark.parametrize("name", sorted(WARPERS))
def test_warper_keeps_what_transformers_keeps_on_random_rows(name):
    rows = random_rows()
    assert check_warper(name, rows) == len(rows) * len(WARPERS[name][2])
    kept = [int(torch.isfinite(WARPERS[name][0](r, WARPERS[name][2][1])).sum()) for r in rows]
    assert min(kept) >= 1 and len(set(kept)) > 10                     # the cut varies: not all-or-nothing


def test_typical_drops_an_atypically_likely_top_token_and_keeps_ties_at_the_boundary():
    # p = (0.4, 0.1 x 6): H = 1.75 nats; s(top) = |0.92 - 1.75| = 0.83 > s(rest) = |2.30 - 1.75| = 0.55, so the
    # rest come first; at mass 0.05 the boundary is the first of six tied tokens: all six stay, the top goes
    logits = torch.tensor([0.4] + [0.1] * 6).log()
    out = typical_filter(logits, 0.05)
    assert not torch.isfinite(out[0]) and torch.isfinite(out[1:]).all()
    assert_same(out, TypicalLogitsWarper(mass=0.05)(torch.zeros(1, 1, dtype=torch.long), logits[None].clone())[0])


def test_repetition_penalty_matches_transformers_on_random_contexts():
    rows, contexts = random_rows()[:400], random_contexts()
    compared = 0
    for penalty in PENALTIES:
        proc = RepetitionPenaltyLogitsProcessor(penalty=penalty)
        for row, ids in zip(rows, contexts):
            ref = proc(torch.tensor([ids], dtype=torch.long), row[None].clone())[0] if ids else row
            ours = repetition_penalty(row, context_mask(ids, row.shape[-1], "cpu"), penalty)
            assert_same(ours, ref)
            compared += 1
    assert compared == 1200


def test_no_repeat_ngram_matches_transformers_on_random_contexts():
    rows, contexts = random_rows()[:400], random_contexts()
    compared = banned_any = 0
    for n in NGRAM_SIZES:
        proc = NoRepeatNGramLogitsProcessor(n)
        for row, ids in zip(rows, contexts):
            ref = proc(torch.tensor([ids], dtype=torch.long).reshape(1, -1), row[None].clone())[0]
            blocker = NgramBlocker(n)
            for t in ids:                                              # fed the way the selector is: one by one
                blocker.add(t)
            ours = ban_tokens(row, blocker.banned())
            assert_same(ours, ref)
            assert blocker.banned() == NgramBlocker(n, ids).banned()
            compared += 1
            banned_any += bool(blocker.banned())
    assert compared == 1600 and banned_any > 600


def hf_chain(cfg: dict) -> LogitsProcessorList:
    """transformers' processors in `generate`'s order for the given sample parameters (no model needed)."""
    procs = LogitsProcessorList()
    if cfg.get("repetition_penalty", 1.0) != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(cfg["repetition_penalty"]))
    if cfg.get("no_repeat_ngram_size", 0):
        procs.append(NoRepeatNGramLogitsProcessor(cfg["no_repeat_ngram_size"]))
    if cfg.get("temperature", 1.0) != 1.0:
        procs.append(TemperatureLogitsWarper(cfg["temperature"]))
    if cfg.get("top_h", 0.0):
        procs.append(TopHLogitsWarper(cfg["top_h"]))
    if cfg.get("top_k", 0):
        procs.append(TopKLogitsWarper(cfg["top_k"]))
    if cfg.get("top_p", 1.0) < 1.0:
        procs.append(TopPLogitsWarper(cfg["top_p"]))
    procs.append(MinPLogitsWarper(cfg.get("min_p", 0.0)))
    if cfg.get("typical_p", 1.0) < 1.0:
        procs.append(TypicalLogitsWarper(cfg["typical_p"]))
    if cfg.get("epsilon_cutoff", 0.0):
        procs.append(EpsilonLogitsWarper(cfg["epsilon_cutoff"]))
    if cfg.get("eta_cutoff", 0.0):
        procs.append(EtaLogitsWarper(cfg["eta_cutoff"]))
    return procs


CHAIN_CASES = [
    {"typical_p": 0.6}, {"epsilon_cutoff": 0.02}, {"eta_cutoff": 0.01}, {"top_h": 0.5},
    {"repetition_penalty": 1.8}, {"no_repeat_ngram_size": 2},
    {"temperature": 0.8, "top_k": 12, "top_p": 0.95, "min_p": 0.02, "typical_p": 0.9, "epsilon_cutoff": 0.005,
     "eta_cutoff": 0.002, "top_h": 0.9, "repetition_penalty": 1.3, "no_repeat_ngram_size": 3},
]


def run(lm, strategy="sample", prompt=" the cat", n=20, seed=0, fmt=None, **params):
    return Run(lm, RunRequest(model=lm.key, strategy=strategy, prompt=prompt, params=params, max_new_tokens=n,
                              seed=seed, **({"prompt_format": fmt} if fmt else {}))).run_to_end()


@pytest.mark.parametrize("cfg", CHAIN_CASES, ids=lambda c: "+".join(c))
def test_sample_draws_from_transformers_processed_distribution_each_step(cfg):
    """Through the strategy on the scripted fake model (logits a pure function of the context): at every step the
    trace's k, kept and score equal those of transformers' processor chain applied to the same logits and ids, and
    the token is one that chain keeps."""
    lm = FakeLM(no_eos(hashed_logits(32)))
    res = run(lm, n=30, seed=3, **cfg)
    tokens = res.frame[res.frame.kind == "token"]
    ids = lm.encode_prompt(" the cat", "raw")
    chain = hf_chain(cfg)
    for row in tokens.itertuples():
        ref = chain(torch.tensor([ids]), lm.logits_fn(ids)[None].clone())[0]        # [V]
        probs = ref.softmax(-1)
        assert row.k == int(torch.isfinite(ref).sum()) and row.kept == int((probs > 0).sum())
        assert probs[row.token_id] > 0
        assert row.score == pytest.approx(float(ref.log_softmax(-1)[row.token_id]), abs=1e-6)
        ids = ids + [int(row.token_id)]
    assert len(tokens) == 30


def test_defaults_keep_the_old_selector_exactly():
    """The default configuration draws the same tokens with the same scores as the selector before these
    processors existed (sample_or_argmax on the raw logits)."""
    from declab.core.loop import Choice, Selector, token_loop
    from declab.core.sampling import sample_or_argmax
    from strategies.sample import SampleConfig

    class Old(Selector):
        def __init__(self, cfg, g):
            self.cfg, self.g = cfg, g

        def apply(self, logits, step):
            c = self.cfg
            token, warped = sample_or_argmax(logits, self.g, c.temperature, c.top_k, c.top_p, c.min_p)
            return Choice(token, float(warped.log_softmax(-1)[token]), {"k": int(torch.isfinite(warped).sum())})

    lm = FakeLM()
    for params in ({}, {"temperature": 0.7, "top_p": 0.9}, {"top_k": 6, "min_p": 0.1}):
        new = run(lm, n=25, seed=5, **params)
        from declab.core import RunContext
        from declab.core.sampling import make_generator
        from declab.core.trace import Trace
        ctx = RunContext(lm=lm, prompt_ids=lm.encode_prompt(" the cat", "raw"), max_new_tokens=25, seed=5,
                         generator=make_generator(5, "cpu"), trace=Trace("t", "sample", lm.key))
        gen = token_loop(ctx, Old(SampleConfig(**params), ctx.generator))
        try:
            while True:
                next(gen)
        except StopIteration as done:
            old_ids = done.value[0].token_ids
        old = ctx.trace.frame()
        old, now = old[old.kind == "token"], new.frame[new.frame.kind == "token"]
        assert new.sequences[0].token_ids == old_ids
        assert now.score.tolist() == old.score.tolist() and now.k.tolist() == old.k.tolist()


# ------------------------------------------------------------------------------------------------ kept
def test_kept_counts_the_tokens_with_nonzero_probability():
    lm = FakeLM()
    greedy = run(lm, "greedy", n=10).frame
    assert (greedy[greedy.kind == "token"].kept == 1).all()
    top4 = run(lm, n=10, top_k=4).frame
    top4 = top4[top4.kind == "token"]
    assert (top4.kept == 4).all() and (top4.k == 4).all()
    # a tiny temperature leaves every logit finite (k = V) but underflows most probabilities to exactly 0
    cold = run(lm, n=10, temperature=0.02).frame
    cold = cold[cold.kind == "token"]
    ids = lm.encode_prompt(" the cat", "raw")
    for row in cold.itertuples():
        expected = int(((lm.logits_fn(ids) / 0.02).softmax(-1) > 0).sum())
        assert row.k == lm.vocab_size and row.kept == expected
        ids = ids + [int(row.token_id)]
    assert (cold.kept < cold.k).any()
    miro = run(lm, "mirostat", n=10).frame
    miro = miro[miro.kind == "token"]
    assert (miro.kept == miro.k).all() and (miro.kept > 1).any()


def test_ead_records_kept_for_argmax_and_sampling(fake_registry):
    from tests.fake import drafted_logits
    V = 32
    large, small = FakeLM(no_eos(hashed_logits(V))), FakeLM(no_eos(drafted_logits(V, 1.5)), key="fake-draft")
    for params, expected in (({"temperature": 0.0}, 1), ({"temperature": 1.0, "top_k": 3}, 3)):
        res = Run(large, RunRequest(model=large.key, strategy="ead", prompt=" the cat", params=params,
                                    max_new_tokens=12, seed=0), models={"small": small}).run_to_end()
        tokens = res.frame[res.frame.kind == "token"]
        assert len(tokens) == 12 and (tokens.kept == expected).all()


def test_contrastive_and_uscd_record_kept(fake_registry):
    from tests.fake import drafted_logits
    V = 32
    expert, amateur = (FakeLM(no_eos(hashed_logits(V), -30.0)),
                       FakeLM(no_eos(drafted_logits(V, 1.5), -30.0), key="fake-draft"))
    for params in ({"temperature": 0.0}, {"temperature": 1.0}, {"temperature": 1.0, "warp": "expert"}):
        res = Run(expert, RunRequest(model=expert.key, strategy="contrastive", prompt=" the cat", params=params,
                                     max_new_tokens=12, seed=0), models={"amateur": amateur}).run_to_end()
        tokens = res.frame[res.frame.kind == "token"]
        # sampling draws from the plausible head V_head (every head token has p > 0 here); the argmax from one
        expected = 1 if params["temperature"] == 0 else tokens.head_size
        assert len(tokens) == 12 and (tokens.kept == expected).all()
    lm = FakeLM(no_eos(hashed_logits(V)))
    for temperature in (0.0, 1.0):
        res = Run(lm, RunRequest(model=lm.key, strategy="uscd", prompt=" the cat sat on the mat", max_new_tokens=12,
                                 seed=0, params={"temperature": temperature, "top_p": 1.0})).run_to_end()
        tokens = res.frame[res.frame.kind == "token"]
        if temperature == 0:
            assert (tokens.kept == 1).all()
        else:                       # the contrast keeps at most the plausible set; otherwise the whole row
            contrast = tokens.contrast.astype(bool)
            assert (tokens.kept[contrast] <= tokens.keep_size[contrast]).all()
            assert (tokens.kept[~contrast] == V).all() and (tokens.kept > 1).all()


def test_record_token_folds_device_values_into_its_one_host_copy(fake_lm):
    from declab.core import RunContext
    from declab.core.loop import record_token
    from declab.core.sampling import make_generator
    from declab.core.trace import Trace
    ctx = RunContext(lm=fake_lm, prompt_ids=[1], max_new_tokens=1, seed=0, generator=make_generator(0, "cpu"),
                     trace=Trace("t", "x", fake_lm.key))
    logp = torch.randn(fake_lm.vocab_size).log_softmax(-1)
    row = record_token(ctx, 0, 3, logp, logp[3], {"kept": torch.tensor(7), "flag": torch.tensor(True),
                                                  "h": torch.tensor(0.25), "plain": 2})
    assert row["score"] == float(logp[3]) and row["kept"] == 7 and isinstance(row["kept"], int)
    assert row["flag"] == 1 and row["h"] == 0.25 and row["plain"] == 2
    assert [r["rank"] for r in ctx.trace.rows if r["kind"] == "candidate"] == [0, 1, 2, 3, 4]


# ------------------------------------------------------------------------------------------------ parameters
@pytest.mark.parametrize("setting, message", [
    ("typical_p=0", r"typical_p must be in \(0.0, 1.0\], got 0.0"),
    ("typical_p=1.5", r"typical_p must be in \(0.0, 1.0\], got 1.5"),
    ("epsilon_cutoff=1", r"epsilon_cutoff must be in \[0.0, 1.0\), got 1.0"),
    ("eta_cutoff=-0.1", r"eta_cutoff must be in \[0.0, 1.0\), got -0.1"),
    ("top_h=1.5", r"top_h must be in \[0.0, 1.0\], got 1.5"),
    ("repetition_penalty=0", r"repetition_penalty must be in \(0.0, inf\), got 0.0"),
    ("no_repeat_ngram_size=-1", r"no_repeat_ngram_size must be in \[0, inf\), got -1"),
    ("no_repeat_ngram_size=1.5", r"no_repeat_ngram_size must be int in \[0, inf\), got '1.5'"),
])
def test_bad_values_exit_2_with_one_line_naming_the_range(fake_registry, capsys, setting, message):
    assert main(["run", "--strategy", "sample", "--set", setting, "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and __import__("re").search(message, err), err


def test_list_shows_every_new_parameter_with_its_range(fake_registry, capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for text in ("top_h (float, default 0.0, range [0.0, 1.0])", "typical_p (float, default 1.0, range (0.0, 1.0])",
                 "epsilon_cutoff (float, default 0.0, range [0.0, 1.0))",
                 "eta_cutoff (float, default 0.0, range [0.0, 1.0))",
                 "repetition_penalty (float, default 1.0, range (0.0, inf))",
                 "no_repeat_ngram_size (int, default 0, range [0, inf))"):
        assert text in out


def test_a_context_that_bans_every_token_is_a_clear_error():
    from declab.core.errors import UserError
    from declab.core.sampling import make_generator
    from strategies.sample import SampleConfig, Warped
    sel = Warped(SampleConfig(no_repeat_ngram_size=1), make_generator(0, "cpu"), list(range(31)), 32)
    assert sel.apply(torch.zeros(32), 0).token == 31                   # the only id not in the context
    sel.accept(31)
    with pytest.raises(UserError, match="no_repeat_ngram_size=1 bans every token at step 1"):
        sel.apply(torch.zeros(32), 1)


# ------------------------------------------------------------------------------------------------ real model
MODEL_TEXTS = [("The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is", "raw"),
               ("def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\ndef", "raw"),
               ("Write a haiku about the sea.", "chat")]


@pytest.fixture(scope="module")
def model_rows(real_lm):
    """Every position's next-token logits of three texts in one forward each: [(ids up to here, logits [V])]."""
    out = []
    for text, fmt in MODEL_TEXTS:
        ids = real_lm.encode_prompt(text, fmt)
        logits = real_lm.prefill(ids, all_logits=True).logits[0]                     # [T, V]
        out += [(ids[: t + 1], logits[t]) for t in range(len(ids))]
    return out


@pytest.mark.model
def test_processors_keep_what_transformers_keeps_on_the_models_rows(model_rows):
    rows = [r for _, r in model_rows]
    for name in WARPERS:
        assert check_warper(name, rows) == len(rows) * len(WARPERS[name][2])
    for penalty in PENALTIES:
        proc = RepetitionPenaltyLogitsProcessor(penalty=penalty)
        for ids, row in model_rows:
            ref = proc(torch.tensor([ids]), row[None].clone())[0]
            assert_same(repetition_penalty(row, context_mask(ids, row.shape[-1], "cpu"), penalty), ref)
    banned = 0
    for n in NGRAM_SIZES:
        proc = NoRepeatNGramLogitsProcessor(n)
        for ids, row in model_rows:
            ref = proc(torch.tensor([ids]), row[None].clone())[0]
            blocked = NgramBlocker(n, ids).banned()
            assert_same(ban_tokens(row, blocked), ref)
            banned += bool(blocked)
    assert len(rows) > 60 and banned > 20
    print(f"\nembedded-model rows compared per processor and value: {len(rows)}")


class ForceAndRecord:
    """Wraps the processor list inside `generate` (transformers applies the user's processors before its sampling
    warpers, so a processor of ours would see unwarped scores): records the fully processed scores of each step and
    the classes that made them, then forces the token our run drew, so generate follows the same context."""

    def __init__(self, tokens: list[int], monkeypatch):
        self.tokens, self.seen, self.classes = tokens, [], None
        original = LogitsProcessorList.__call__

        def call(procs, input_ids, scores, **kwargs):
            out = original(procs, input_ids, scores, **kwargs)                        # [1, V]
            self.classes = [type(p).__name__ for p in procs]
            self.seen.append(out[0].clone())
            forced = torch.full_like(out, float("-inf"))
            forced[:, self.tokens[len(self.seen) - 1]] = 0.0
            return forced
        monkeypatch.setattr(LogitsProcessorList, "__call__", call)


E2E_CASES = [{"typical_p": 0.9}, {"epsilon_cutoff": 3e-4}, {"eta_cutoff": 2e-3}, {"top_h": 0.6},
             {"repetition_penalty": 1.3}, {"no_repeat_ngram_size": 2},
             {"temperature": 0.8, "top_k": 50, "top_p": 0.95, "min_p": 0.02, "typical_p": 0.95, "eta_cutoff": 1e-3,
              "repetition_penalty": 1.2, "no_repeat_ngram_size": 3}]
HF_ORDER = ("repetition_penalty", "no_repeat_ngram_size", "temperature", "top_h", "top_k", "top_p", "min_p",
            "typical_p", "epsilon_cutoff", "eta_cutoff")     # sample's order, which generate must also apply
HF_CLASSES = {"repetition_penalty": "RepetitionPenaltyLogitsProcessor",
              "no_repeat_ngram_size": "NoRepeatNGramLogitsProcessor", "temperature": "TemperatureLogitsWarper",
              "top_h": "TopHLogitsWarper", "top_k": "TopKLogitsWarper", "top_p": "TopPLogitsWarper",
              "min_p": "MinPLogitsWarper", "typical_p": "TypicalLogitsWarper", "epsilon_cutoff": "EpsilonLogitsWarper",
              "eta_cutoff": "EtaLogitsWarper"}
HF_DEFAULTS = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0, "epsilon_cutoff": 0.0,
               "eta_cutoff": 0.0, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "top_h": None}


@pytest.mark.model
@pytest.mark.parametrize("cfg", E2E_CASES, ids=lambda c: "+".join(c))
def test_sample_matches_transformers_generate_step_by_step(real_lm, cfg, monkeypatch):
    """transformers' generate(do_sample=True, ...) builds its own processor list; at every step of our run its
    processed distribution keeps as many tokens (k finite, kept nonzero) and gives our token the same ln p.
    The random streams differ (inverse CDF vs torch.multinomial), so generate is forced onto our tokens."""
    prompt = "Once upon a time, in a small village,"
    res = run(real_lm, prompt=prompt, fmt="raw", n=10, seed=7, **cfg)
    tokens = res.frame[res.frame.kind == "token"]
    drawn = tokens.token_id.astype(int).tolist()
    ids = real_lm.encode_prompt(prompt, "raw")
    rec = ForceAndRecord(drawn, monkeypatch)
    with torch.inference_mode():
        real_lm.model.generate(torch.tensor([ids]), do_sample=True, max_new_tokens=len(drawn),
                               pad_token_id=real_lm.tokenizer.eos_token_id, **{**HF_DEFAULTS, **cfg})
    assert len(rec.seen) == len(drawn)
    # generate's own list, in sample's order (min_p = 0.0 is passed, so its warper is always there)
    assert rec.classes == [HF_CLASSES[k] for k in HF_ORDER if k in cfg or k == "min_p"]
    for row, ref in zip(tokens.itertuples(), rec.seen):
        probs = ref.softmax(-1)
        assert row.k == int(torch.isfinite(ref).sum()) and row.kept == int((probs > 0).sum())
        assert row.score == pytest.approx(float(ref.log_softmax(-1)[row.token_id]), abs=1e-4)
    assert math.isfinite(res.sequences[0].score)
