"""Superposed decoding (docs/strategies.md#superposed): property tests 4.3 (a)-(d) on the scripted fake model (its
inputs_embeds path mixes the logits of the mixed tokens), an unvectorised brute-force reference of the whole step
(with and without n-grams), the n-gram store against brute-force counts, config checks, the mechanism figure, and
short runs on the embedded model (k=1 equals greedy through inputs_embeds; one cache position per step)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from declab.core.errors import UserError
from tests.fake import FakeLM, hashed_logits
from declab.run import Run, RunRequest
from strategies import superposed_ngrams
from declab.core import get_strategy
from strategies.superposed_ngrams import NGramModel, load_ngrams

CORPUS = (" the cat sat on the mat. the dog ran on the mat, and the cat ran.\n\n"
          " a big red dog sat on a blue mat. it was very big and it was red!\n\n"
          " the cat is big. the dog is very big, and the mat is red. x y z x y z the cat sat.\n")


@pytest.fixture(autouse=True)
def ngram_cache(monkeypatch, tmp_path, fake_registry):
    """Every test builds its n-grams under its own DECLAB_CACHE, with an empty process memo (fake registry)."""
    monkeypatch.setenv("DECLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(superposed_ngrams, "_MEMO", {})
    return tmp_path / "cache"


def no_eos_fn(vocab_size=len(FakeLM().vocab)):
    base = hashed_logits(vocab_size)

    def fn(context):
        out = base(context).clone()
        out[0] = -1e4                                    # EOS never wins: runs go to the limit
        return out
    return fn


def run(lm, strategy="superposed", prompt=" the cat", n=12, seed=0, **params):
    return Run(lm, RunRequest(model=lm.key, strategy=strategy, prompt=prompt, params=params, max_new_tokens=n,
                              seed=seed)).run_to_end()


def corpus_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS, encoding="utf-8")
    return str(path)


def tokens_of(res):
    return res.frame[res.frame.kind == "token"]


# ------------------------------------------------------------------------------------------------ reference
def brute_counts(docs: list[list[int]], n: int):
    grams, ctx = Counter(), Counter()
    for d in docs:
        for i in range(len(d) - n + 1):
            grams[tuple(d[i:i + n])] += 1
            ctx[tuple(d[i:i + n - 1])] += 1
    return grams, ctx


def brute_q(docs, history, v, weights):
    """q(v) = sum_n w_n count(ctx, v)/count(ctx), unseen contexts (and too-short histories) skipped."""
    q = 0.0
    for n, w in weights.items():
        if len(history) < n - 1:
            continue
        grams, ctx = brute_counts(docs, n)
        key = tuple(history[len(history) - (n - 1):])
        if ctx[key]:
            q += w * grams[key + (v,)] / ctx[key]
    return q


def reference_decode(lm: FakeLM, prompt, steps, k, n_tok, tau, alpha=0.0, weights=None, penalty=200.0, docs=None):
    """The whole algorithm, unvectorised: the fake's logits of a mixture computed from its script, every draft x
    token pair scored in Python, sorted by (-score, draft, token rank). Returns per step the alive drafts
    [(tokens, LP)] and the mixture m (dict token -> weight) fed next."""
    fn = lm.logits_fn
    context = list(prompt)                               # the fake cache's ids (a mixture stores its heaviest id)
    logits = fn(context)
    drafts = [([], 0.0)]
    out = []
    for step in range(steps):
        top = torch.topk(logits.double(), n_tok)
        toks = top.indices.tolist()
        lnp = torch.log_softmax(top.values / tau, -1).tolist()
        pairs = []
        for d, (seq, lp) in enumerate(drafts):
            scores = []
            for r, v in enumerate(toks):
                if alpha > 0:
                    q = brute_q(docs, list(prompt) + seq, v, weights)
                    scores.append((1 - alpha) * lnp[r] + alpha * math.log(q) if q > 0 else -math.inf)
                else:
                    scores.append(lnp[r])
            if alpha > 0 and all(s == -math.inf for s in scores):
                scores = [(1 - alpha) * lnp[r] - penalty for r in range(n_tok)]
            pairs += [(-(lp + scores[r]), d, r) for r in range(n_tok)]
        pairs.sort()
        alive = []
        for neg, d, r in pairs[:2 * k]:
            if toks[r] not in lm.eos_ids and len(alive) < k:
                alive.append((drafts[d][0] + [toks[r]], -neg))
        drafts = alive
        lps = torch.tensor([lp for _, lp in drafts], dtype=torch.float64)
        omega = torch.softmax(lps, -1).tolist()
        mix: dict[int, float] = {}
        for (seq, _), w in zip(drafts, omega):
            mix[seq[-1]] = mix.get(seq[-1], 0.0) + w
        out.append((drafts, mix))
        logits = sum(w * fn(context + [t]).double() for t, w in mix.items())
        context = context + [max(sorted(mix), key=lambda t: mix[t])]
    return out


def check_against_reference(lm, res, ref, k):
    tokens = tokens_of(res)
    assert tokens.step.max() + 1 == len(ref)
    # rebuild the alive drafts from the trace rows (branch = slot, parent = previous slot)
    drafts = {0: []}
    for step, (alive, mix) in enumerate(ref):
        rows = tokens[tokens.step == step].sort_values("branch_id")
        drafts = {int(r.branch_id): drafts[int(r.parent_id)] + [int(r.token_id)] for r in rows.itertuples()}
        assert [drafts[j] for j in range(len(rows))] == [seq for seq, _ in alive]
        np.testing.assert_allclose(rows.score.to_numpy(), [lp for _, lp in alive], rtol=1e-6, atol=1e-5)
        fed = lm.mixtures[step] if step < len(lm.mixtures) else None
        if fed is not None:
            expect = torch.zeros(lm.vocab_size)
            for t, w in mix.items():
                expect[t] = w
            torch.testing.assert_close(fed, expect, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ property tests
def test_k1_without_ngrams_equals_greedy_exactly():
    """4.3 (a): a one-hot mixture is embed(token), so k=1 with alpha=0 is greedy token for token."""
    lm = FakeLM(no_eos_fn())
    greedy = run(lm, "greedy", n=25)
    sup = run(lm, n=25, num_drafts=1, alpha=0.0, num_token_sample=2)
    assert sup.sequences[0].token_ids == greedy.sequences[0].token_ids
    assert len(sup.sequences) == 1
    assert all(int((m != 0).sum()) == 1 and float(m.max()) == 1.0 for m in lm.mixtures)
    g, s = tokens_of(greedy), tokens_of(sup)
    np.testing.assert_allclose(s.logprob.to_numpy(), g.logprob.to_numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_weights_sum_to_one_and_mixture_has_at_most_k_tokens(k):
    """4.3 (b), also with the n-gram scores: omega >= 0 sums to 1 per step; m has <= k non-zeros, sums to 1, and
    is exactly the trace's weights summed per token (what the fake received through inputs_embeds)."""
    lm = FakeLM(no_eos_fn())
    res = run(lm, n=14, num_drafts=k, num_token_sample=k + 4, alpha=0.0 if k != 3 else 0.5,
              ngram_corpus=corpus_file_for(lm, k))
    tokens = tokens_of(res)
    assert len(lm.mixtures) == 13
    for step, rows in tokens.groupby("step"):
        w = rows.weight.to_numpy()
        assert len(rows) == k and (w >= 0).all() and abs(w.sum() - 1) < 1e-9
        if step < 13:
            m = lm.mixtures[step]
            assert (m >= 0).all() and int((m > 0).sum()) <= k and abs(float(m.sum()) - 1) < 1e-5
            expect = torch.zeros(lm.vocab_size)
            for t, x in zip(rows.token_id, w):
                expect[int(t)] += float(x)
            torch.testing.assert_close(m, expect, rtol=1e-5, atol=1e-6)
            assert int((expect > 0).sum()) == int(rows.mixture_nnz.iloc[0])


def corpus_file_for(lm, k, _cache={}):                   # noqa: B006 - one corpus file per session is enough
    import tempfile
    from pathlib import Path
    if "path" not in _cache:
        d = Path(tempfile.mkdtemp())
        (d / "c.txt").write_text(CORPUS, encoding="utf-8")
        _cache["path"] = str(d / "c.txt")
    return _cache["path"]


@pytest.mark.parametrize("k", [1, 3, 6])
def test_cache_grows_by_one_per_step_whatever_k(k):
    """4.3 (c): one forward and one cache position per step, the same for every k."""
    lm = FakeLM(no_eos_fn())
    res = run(lm, n=10, num_drafts=k, num_token_sample=k + 3, alpha=0.0)
    prompt_len = len(lm.encode_prompt(" the cat", "raw"))
    cache_len = tokens_of(res).groupby("step").cache_len.first().to_numpy()
    assert cache_len.tolist() == list(range(prompt_len, prompt_len + 10))
    assert lm.forwards == 10                              # prefill + 9 superposed steps
    assert res.meta["metrics"]["forwards"] == 10


def test_alpha0_alive_sets_match_brute_force_over_all_pairs():
    """4.3 (d): with alpha=0 the ranking is LP_d + ln p~(v); every step's alive set and LPs, and the mixture fed,
    equal an unvectorised brute force over the k x n_tok pairs."""
    lm = FakeLM(no_eos_fn())
    prompt = lm.encode_prompt(" the cat", "raw")
    res = run(lm, n=8, num_drafts=3, num_token_sample=5, temperature=0.7, alpha=0.0)
    ref = reference_decode(FakeLM(no_eos_fn()), prompt, 8, k=3, n_tok=5, tau=0.7)
    check_against_reference(lm, res, ref, 3)


def test_ngram_interpolation_matches_brute_force(tmp_path):
    """alpha > 0 with a small corpus: scores (1-a) ln p~ + a ln q, exclusion of q=0, the fallback penalty, the alive
    sets and mixtures all equal the brute-force reference (n-gram counts recounted with Counter)."""
    path = corpus_file(tmp_path)
    lm = FakeLM(no_eos_fn())
    prompt = lm.encode_prompt(" the cat", "raw")
    weights = (0.1, 0.2, 0.3)
    res = run(lm, n=7, num_drafts=3, num_token_sample=6, temperature=0.5, alpha=0.6, ngram_weights=weights,
              penalty=50.0, ngram_corpus=path)
    docs = superposed_ngrams.encode_documents(lm, superposed_ngrams.corpus_documents(path))
    ref = reference_decode(FakeLM(no_eos_fn()), prompt, 7, k=3, n_tok=6, tau=0.5, alpha=0.6,
                           weights={2: 0.1, 3: 0.2, 4: 0.3}, penalty=50.0, docs=docs)
    check_against_reference(lm, res, ref, 3)
    tokens = tokens_of(res)
    assert {"ngram_q", "ngram_orders", "ngram_hits", "fallback"} <= set(tokens.columns)
    # the trace's q and hit orders are the brute-force ones
    drafts = {0: []}
    for step in range(7):
        rows = tokens[tokens.step == step].sort_values("branch_id")
        for r in rows.itertuples():
            hist = list(prompt) + drafts[int(r.parent_id)]
            q = brute_q(docs, hist, int(r.token_id), {2: 0.1, 3: 0.2, 4: 0.3})
            assert r.ngram_q == pytest.approx(q, abs=1e-12)
            got = [n for n in (2, 3, 4)
                   if brute_counts(docs, n)[0][tuple(hist[len(hist) - n + 1:]) + (int(r.token_id),)]]
            assert r.ngram_orders == " ".join(map(str, got))
            assert r.ngram_hits == len(got)
            if not r.fallback:
                assert q > 0
        drafts = {int(r.branch_id): drafts[int(r.parent_id)] + [int(r.token_id)] for r in rows.itertuples()}


def test_fallback_path_when_nothing_matches(tmp_path):
    """A corpus that shares no n-gram with the fake's candidates: every step takes the penalty path, and the
    scores are (1-a) ln p~ - penalty (so the LLM ranking survives)."""
    path = tmp_path / "other.txt"
    path.write_text(" 🙂 🙂 🙂 🙂 🙂 🙂\n", encoding="utf-8")
    lm = FakeLM(no_eos_fn())
    res = run(lm, n=5, num_drafts=2, num_token_sample=4, alpha=0.5, penalty=10.0, ngram_corpus=str(path))
    tokens = tokens_of(res)
    emoji = lm.vocab.index(" 🙂")
    fell = tokens[tokens.token_id != emoji]
    assert fell.fallback.all() and (fell.ngram_hits == 0).all()
    np.testing.assert_allclose(fell.step_score.to_numpy(), 0.5 * fell.ln_ptilde.to_numpy() - 10.0, atol=1e-9)
    assert res.meta["metrics"]["fallback_steps"] >= 1


def test_returns_k_drafts_ranked_by_pseudo_perplexity():
    lm = FakeLM(no_eos_fn())
    res = run(lm, n=10, num_drafts=4, num_token_sample=6, alpha=0.0)
    seqs = res.sequences
    assert len(seqs) == 4
    ppl = [s.extra["ppl"] for s in seqs]
    assert ppl == sorted(ppl)
    for s in seqs:
        assert s.extra["ppl"] == pytest.approx(math.exp(-s.extra["cum_score"] / s.extra["gen_len"]))
        assert s.score == pytest.approx(-math.log(s.extra["ppl"]))
    assert len({tuple(s.token_ids) for s in seqs}) == 4          # distinct drafts
    finish = res.frame[res.frame.kind == "finish"]
    assert sorted(finish.final_rank.dropna().astype(int)) == [0, 1, 2, 3]
    from viz.common import chosen_path
    assert chosen_path(res.frame).token_id.astype(int).tolist() == seqs[0].token_ids


def test_eos_candidates_go_to_the_finished_pool():
    """A script whose EOS becomes likely after a few tokens: EOS candidates are pooled as finished drafts (their
    tokens without EOS, gen_len counting the EOS) and can be returned; early stop ends the run."""
    base = hashed_logits(len(FakeLM().vocab))

    def fn(context):
        out = base(context).clone()
        out[0] = 6.0 if len(context) >= 6 else -1e4
        return out
    lm = FakeLM(fn)
    res = run(lm, n=30, num_drafts=2, num_token_sample=5, alpha=0.0)
    finish = res.frame[res.frame.kind == "finish"]
    assert finish.eos.any()
    assert res.meta["metrics"]["finished_drafts"] >= 1
    assert tokens_of(res).step.max() < 29                        # stopped early
    for s in res.sequences:
        assert 0 not in s.token_ids
        assert s.extra["gen_len"] == len(s.token_ids) + int(s.extra["eos"])


def test_config_checks():
    strat = get_strategy("superposed")
    with pytest.raises(UserError, match="num_token_sample must be at least"):
        strat.make_config({"num_drafts": 5, "num_token_sample": 5})
    with pytest.raises(UserError, match="ngram_weights"):
        strat.make_config({"ngram_weights": "0.1, -0.2"})
    with pytest.raises(UserError, match="ngram_weights"):
        strat.make_config({"ngram_weights": "0.1 0.1 0.1 0.1 0.1 0.1 0.1"})
    with pytest.raises(UserError, match="temperature"):
        strat.make_config({"temperature": "0"})
    cfg = strat.make_config({"ngram_weights": "0.2, 0.3"})
    assert cfg.orders == {2: 0.2, 3: 0.3}
    defaults = strat.make_config({})
    assert (defaults.num_drafts, defaults.num_token_sample, defaults.temperature, defaults.alpha, defaults.penalty) \
        == (3, 9, 0.06, 0.54, 200.0)
    assert defaults.ngram_weights == (0.01, 0.04, 0.15, 0.18, 0.12)


def test_bad_corpus_path_is_a_user_error(tmp_path):
    lm = FakeLM(no_eos_fn())
    with pytest.raises(UserError, match="ngram_corpus"):
        run(lm, n=3, ngram_corpus=str(tmp_path / "missing.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .txt"):
        run(lm, n=3, ngram_corpus=str(tmp_path / "empty"))
    assert run(lm, n=3, alpha=0.0, ngram_corpus=str(tmp_path / "missing.txt")).status == "ok"   # unused


# ------------------------------------------------------------------------------------------------ n-gram store
def test_ngram_store_matches_brute_force_counts():
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 6, size=rng.integers(1, 40)).tolist() for _ in range(30)]
    tokens = np.array([t for d in docs for t in d], dtype=np.uint32)
    starts = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    model = NGramModel(tokens, starts, orders=(2, 3, 4, 5, 6))
    weights = {2: 0.01, 3: 0.04, 4: 0.15, 5: 0.18, 6: 0.12}
    cand = np.arange(7)
    for _ in range(25):
        hist = rng.integers(0, 6, size=rng.integers(0, 8)).tolist()
        q, seen, matched = model.lookup([hist], cand, weights)
        for c in cand:
            assert q[0, c] == pytest.approx(brute_q(docs, hist, int(c), weights), abs=1e-12)
        for j, n in enumerate(weights):
            grams, ctx = brute_counts(docs, n)
            key = tuple(hist[len(hist) - (n - 1):]) if len(hist) >= n - 1 else None
            assert seen[0, j] == bool(key is not None and ctx[key])
            assert matched[0, j].tolist() == [bool(key is not None and grams[key + (int(c),)]) for c in cand]


def test_ngram_cache_is_built_once_and_reused(tmp_path, ngram_cache):
    lm = FakeLM()
    path = corpus_file(tmp_path)
    first = load_ngrams(lm, path)
    assert not first.info["cached"] and first.info["tokens"] > 20
    files = list((ngram_cache / "ngrams").glob("*.npz"))
    assert len(files) == 1
    assert load_ngrams(lm, path) is first                          # process memo
    superposed_ngrams._MEMO.clear()
    again = load_ngrams(lm, path)
    assert again.info["cached"] and again.info["tokens"] == first.info["tokens"]
    (tmp_path / "corpus.txt").write_text(CORPUS + " more text", encoding="utf-8")   # a changed corpus: new key
    superposed_ngrams._MEMO.clear()
    assert not load_ngrams(lm, path).info["cached"]


def test_default_corpus_on_the_fake_is_a_quick_slice():
    lm = FakeLM()
    model = load_ngrams(lm, "")
    assert model.info["corpus"] == "python-docs" and model.info["tokens"] > 1000


def test_mechanism_figure(tmp_path):
    from viz.mechanism import mechanism_figures
    lm = FakeLM(no_eos_fn())
    res = run(lm, n=8, num_drafts=3, num_token_sample=5, alpha=0.5, ngram_corpus=corpus_file(tmp_path))
    figs = mechanism_figures(res.frame, res.meta)
    assert "superposed" in figs
    fig = figs["superposed"]
    lattice = [t for t in fig.data if t.name == "draft token"][0]
    assert len(lattice.x) == 8 * 3
    weights = np.asarray(lattice.marker.color, dtype=float)
    assert np.allclose(weights, tokens_of(res).weight.to_numpy())


def test_cli_json_has_all_drafts(tmp_path, fake_registry, capsys):
    from declab.cli import main
    out = tmp_path / "o.json"
    rc = main(["run", "--strategy", "superposed", "--prompt", " the cat", "--max-new-tokens", "6",
               "--set", "alpha=0", "--set", "num_drafts=3", "--json", str(out), "--no-store"])
    assert rc == 0
    import json
    data = json.loads(out.read_text())
    assert len(data["sequences"]) == 3


# ------------------------------------------------------------------------------------------------ real model
@pytest.mark.model
def test_real_k1_without_ngrams_equals_greedy(real_lm):
    """One-hot superposition through inputs_embeds = embed(token): greedy token for token on SmolLM2."""
    greedy = Run(real_lm, RunRequest(model=real_lm.key, strategy="greedy", prompt="The capital of France is",
                                     prompt_format="raw", max_new_tokens=12)).run_to_end()
    sup = Run(real_lm, RunRequest(model=real_lm.key, strategy="superposed", prompt="The capital of France is",
                                  prompt_format="raw", params={"num_drafts": 1, "alpha": 0.0},
                                  max_new_tokens=12)).run_to_end()
    assert sup.sequences[0].token_ids == greedy.sequences[0].token_ids
    g, s = tokens_of(greedy), tokens_of(sup)
    np.testing.assert_allclose(s.logprob.to_numpy(), g.logprob.to_numpy(), atol=1e-4)


@pytest.mark.model
def test_real_three_drafts_one_cache(real_lm, tmp_path):
    """k=3 with n-grams from a small corpus in the model's tokenization: one cache position per step, three
    ranked drafts, weights summing to one."""
    path = tmp_path / "c.txt"
    path.write_text("The capital of France is Paris. The capital of Italy is Rome. Paris is a city in France.\n"
                    "The city of Paris is the capital and the largest city of France.\n", encoding="utf-8")
    res = Run(real_lm, RunRequest(model=real_lm.key, strategy="superposed", prompt="The capital of France is",
                                  prompt_format="raw", params={"ngram_corpus": str(path)},
                                  max_new_tokens=10)).run_to_end()
    assert res.status == "ok" and len(res.sequences) == 3
    tokens = tokens_of(res)
    cache_len = tokens.groupby("step").cache_len.first().to_numpy()
    assert (np.diff(cache_len) == 1).all()
    assert np.allclose(tokens.groupby("step").weight.sum().to_numpy(), 1.0)
    assert tokens.ngram_hits.max() > 0
    ppl = [s.extra["ppl"] for s in res.sequences]
    assert ppl == sorted(ppl)
