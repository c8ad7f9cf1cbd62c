"""gcd and asap on toy models whose vocabulary matches the binary grammars ({"</s>", "0", "1"}): exact property
tests from docs/strategies.md#asap, exact mode against an independent brute-force enumeration, the trace, grammar input
and errors, the CLI."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from declab.core.errors import UserError
from tests.fake import FakeLM, hashed_logits
from declab.run import Run, RunRequest
from strategies import grammar as G

EOS, ZERO, ONE = 0, 1, 2
BINARY_VOCAB = ("</s>", "0", "1")
PROMPT = "1"                      # one prompt token; the scripts below look at the generated part only


@pytest.fixture(autouse=True)
def _fake_registry(fake_registry):
    yield


def skewed(context: list[int]) -> torch.Tensor:
    """The paper's situation: the model likes to start with "0" but then dislikes "0" after "0", so GCD (which
    must go 0 -> 00 -> 000) over-samples the all-zero string. EOS is likely only at lengths 3 and 5."""
    g = context[1:]
    n = len(g)
    eos = 0.9 if n in (3, 5) else 0.05
    p0 = 0.7 if n == 0 else (0.1 if g[-1] == ZERO else 0.5)
    rest = 1.0 - eos
    return torch.tensor([eos, rest * p0, rest * (1.0 - p0)]).log()


def toy(logits_fn=skewed, vocab=BINARY_VOCAB) -> FakeLM:
    return FakeLM(logits_fn=logits_fn, vocab=vocab)


def run(lm, strategy, grammar="binary_len_3", n=8, seed=0, text=None, **params):
    params.setdefault("grammar", grammar)
    return Run(lm, RunRequest(model=lm.key, strategy=strategy, prompt=PROMPT, params=params, max_new_tokens=n,
                              seed=seed, grammar=text)).run_to_end()


def brute_force(lm, text: str, max_len: int) -> tuple[dict, float]:
    """Independent of strategies.grammar's enumeration: every token string up to max_len over the vocabulary,
    kept when a fresh xgrammar matcher accepts it as a complete sentence, weighted by the product of the model's
    softmax probabilities (EOS included). Returns (Q, Z)."""
    prompt = lm.encode_prompt(PROMPT, "raw")
    tokens = [t for t in range(lm.vocab_size) if t not in lm.eos_ids]
    p = {}
    for length in range(max_len + 1):
        for w in itertools.product(tokens, repeat=length):
            if not G.parses(lm, text, w):
                continue
            ctx, prob = list(prompt), 1.0
            for t in list(w) + [EOS]:
                prob *= float(torch.softmax(lm.logits_fn(ctx).double(), -1)[t])
                ctx.append(t)
            p[w] = prob
    z = sum(p.values())
    return {w: v / z for w, v in p.items()}, z


def exact(lm, text, n=8, **kw):
    compiled = G.compiled_grammar(lm, text)
    return G.exact_distribution(lm, compiled, lm.encode_prompt(PROMPT, "raw"), n, **kw)


def counts_of(result) -> dict:
    out: dict = {}
    for s in result.sequences:
        if s.extra["complete"]:
            out[tuple(s.token_ids)] = out.get(tuple(s.token_ids), 0) + 1
    return out


def chi_square_p(counts: dict, q: dict) -> float:
    """Pearson's chi-square goodness of fit of counts to q; p-value from the regularised upper gamma function."""
    n = sum(counts.values())
    assert set(counts) <= set(q)
    stat = sum((counts.get(w, 0) - n * qw) ** 2 / (n * qw) for w, qw in q.items())
    df = len(q) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


B3, B5 = G.BUILTIN_GRAMMARS["binary_len_3"], G.BUILTIN_GRAMMARS["binary_len_5"]


# ------------------------------------------------------------------------------------------------ grammars
def test_builtin_grammars_are_the_files_and_compile():
    assert tuple(G.BUILTIN_GRAMMARS) == G.BUILTIN_NAMES
    assert set(G.BUILTIN_NAMES) == {p.stem for p in G.GRAMMAR_DIR.glob("*.ebnf")}
    lm = FakeLM()
    for name, text in G.BUILTIN_GRAMMARS.items():
        G.check_grammar_text(text)
        assert G.compiled_grammar(lm, text) is not None, name


def test_binary_languages_are_the_papers():
    lm = toy()
    q3, _ = brute_force(lm, B3, 4)
    assert {"".join("01"[t - 1] for t in w) for w in q3} == {"000", "100", "101", "110", "111"}
    q5, _ = brute_force(lm, B5, 6)
    strings = {"".join("01"[t - 1] for t in w) for w in q5}
    assert len(strings) == 17 and "00000" in strings and all(s[0] == "1" for s in strings - {"00000"})


def test_exact_mode_equals_brute_force_and_gcd_formula():
    lm = toy()
    q, z = brute_force(lm, B3, 4)
    ex = exact(lm, B3)
    assert set(ex.q) == set(q) and ex.z == pytest.approx(z, rel=1e-12)
    for w in q:
        assert ex.q[w] == pytest.approx(q[w], rel=1e-12)
    # GCD by hand: P(t|u) renormalised over the allowed tokens, multiplied along the path
    p = lambda ctx: torch.softmax(skewed([0] + ctx).double(), -1)          # noqa: E731
    p0 = p([])
    first0 = p0[ZERO] / (p0[ZERO] + p0[ONE])
    assert ex.q_gcd[(ZERO, ZERO, ZERO)] == pytest.approx(float(first0), rel=1e-9)    # 0 -> 00 -> 000 -> EOS forced
    assert ex.efg[()] == pytest.approx(z, rel=1e-12)
    assert ex.q_gcd[(ZERO, ZERO, ZERO)] > 10 * ex.q[(ZERO, ZERO, ZERO)]            # the distortion is large


def test_exact_mode_with_multi_character_tokens_counts_every_tokenisation():
    vocab = ("</s>", "0", "1", "00", "10")
    lm = toy(hashed_logits(len(vocab), scale=1.0), vocab)
    q, z = brute_force(lm, B3, 4)
    ex = exact(lm, B3)
    assert len(q) > 5                                  # "000" as 0|0|0, 00|0, 0|00; "100" as 1|0|0, 10|0, 1|00 ...
    assert set(ex.q) == set(q) and ex.z == pytest.approx(z, rel=1e-12)
    assert max(abs(ex.q[w] - q[w]) for w in q) < 1e-12


def test_too_large_or_infinite_language_is_not_enumerated():
    lm = toy()
    assert exact(lm, B5, n=8, max_nodes=10) is None          # 37 prefixes
    assert exact(lm, B5, n=8, max_nodes=37) is not None
    assert exact(lm, 'root ::= [01]+', n=30, max_nodes=500) is None


# ------------------------------------------------------------------------------------------------ 7.5 (a)
@pytest.mark.parametrize("text,n_samples", [(B3, 2000), (B5, 2500)])
def test_asap_matches_the_exact_distribution_and_gcd_does_not(text, n_samples):
    """docs/strategies.md#asap (a): chi-square of ASAp's samples against exact Q passes; GCD's fails (and GCD's samples do
    follow GCD's own exact distribution, so the failure is the distortion, not a bug)."""
    lm = toy()
    n = 8
    ex = exact(lm, text, n=n)
    asap = run(lm, "asap", text=text, n=n, seed=1, num_samples=n_samples)
    gcd = run(lm, "gcd", text=text, n=n, seed=1, num_samples=600)
    assert len(asap.sequences) == n_samples and len(gcd.sequences) == 600
    assert all(s.extra["complete"] for s in asap.sequences + gcd.sequences)
    assert chi_square_p(counts_of(asap), ex.q) > 1e-3
    assert chi_square_p(counts_of(gcd), ex.q) < 1e-9
    q_gcd = {w: v for w, v in ex.q_gcd.items()}
    assert sum(q_gcd.values()) == pytest.approx(1.0, abs=1e-9)
    assert chi_square_p(counts_of(gcd), q_gcd) > 1e-3
    kls = asap.frame[asap.frame.kind == "kl"]
    assert kls["exact"].all() and kls["samples"].iloc[-1] == n_samples
    assert kls["kl"].iloc[-1] < 0.01 < G.kl(q_gcd, ex.q)
    gkl = gcd.frame[gcd.frame.kind == "kl"]
    assert gkl["kl"].iloc[-1] == pytest.approx(G.kl(q_gcd, ex.q), rel=0.3)   # GCD stays at its biased limit
    assert gcd.meta["metrics"]["kl_gcd_limit"] == pytest.approx(G.kl(q_gcd, ex.q), rel=1e-9)


# ------------------------------------------------------------------------------------------------ 7.5 (b), (d)
def test_efg_is_monotone_per_node_and_never_below_the_exact_efg():
    lm = toy()
    ex = exact(lm, B5)
    res = run(lm, "asap", text=B5, seed=2, num_samples=150)
    tok = res.frame[res.frame.kind == "token"].sort_values(["sample", "step"])
    history: dict = {}
    for _, rows in tok.groupby("sample", sort=True):
        prefix = ()
        for r in rows.itertuples():
            history.setdefault(prefix, []).append((r.efg_before, r.efg_after))
            if r.token_id != EOS:
                prefix = prefix + (int(r.token_id),)
    assert 30 <= len(history) <= len(ex.efg) == 37             # most prefixes of the language got visited
    for prefix, seen in history.items():
        values = [v for pair in seen for v in pair]
        assert all(b <= a for a, b in zip(values, values[1:])), prefix      # non-increasing across samples
        assert min(values) >= ex.efg[prefix] - 1e-12, prefix                # an over-approximation
        assert values[0] == 1.0                                             # optimistic start
    roots = res.frame[res.frame.kind == "finish"]["efg_root"].tolist()
    assert all(b <= a for a, b in zip(roots, roots[1:]))
    nodes = res.frame[res.frame.kind == "node"]
    assert len(nodes) == res.meta["metrics"]["trie_nodes"] - 1
    assert (nodes["efg"] >= 0).all() and (nodes["efg"] <= 1).all()


def test_fully_explored_tree_gives_efg_root_equal_to_z():
    """docs/strategies.md#asap (d)."""
    lm = toy(lambda context: torch.zeros(3))                          # every grammatical string equally likely
    for text in (B3, B5):
        ex = exact(lm, text)
        res = run(lm, "asap", text=text, seed=3, num_samples=300)
        tok = res.frame[res.frame.kind == "token"]
        visited = {()}
        for _, rows in tok.sort_values(["sample", "step"]).groupby("sample"):
            ids = [int(t) for t in rows["token_id"] if t != EOS]
            visited |= {tuple(ids[:k]) for k in range(len(ids) + 1)}
        assert set(ex.efg) <= visited                        # fully explored
        roots = res.frame[res.frame.kind == "finish"]["efg_root"]
        assert roots.iloc[0] > 2 * ex.z                                  # after one sample: still optimistic
        assert roots.iloc[-1] == pytest.approx(ex.z, rel=1e-12, abs=0)
        assert res.meta["metrics"]["efg_root"] == pytest.approx(res.meta["metrics"]["z"], rel=1e-12)


# ------------------------------------------------------------------------------------------------ 7.5 (c)
def test_first_asap_sample_is_distributed_as_gcd():
    lm = toy()
    res = run(lm, "asap", text=B5, seed=4, num_samples=5)
    tok = res.frame[res.frame.kind == "token"]
    first = tok[tok["sample"] == 0]
    assert (first["p_asap"] - first["p_gcd"]).abs().max() < 1e-12
    later = tok[tok["sample"] > 0]
    assert (later["p_asap"] - later["p_gcd"]).abs().max() > 1e-3      # EFG~ already reweights later samples
    for seed in range(10):                                            # same draws from the same generator
        a = run(lm, "asap", text=B5, seed=seed, exact_max_nodes=0).sequences[0].token_ids
        g = run(lm, "gcd", text=B5, seed=seed, exact_max_nodes=0).sequences[0].token_ids
        assert a == g, seed
    # and statistically: first samples of independent runs follow GCD's exact distribution, not Q
    ex = exact(lm, B3)
    firsts: dict = {}
    for seed in range(120):
        w = tuple(run(lm, "asap", text=B3, seed=1000 + seed, exact_max_nodes=0).sequences[0].token_ids)
        firsts[w] = firsts.get(w, 0) + 1
    assert chi_square_p(firsts, ex.q_gcd) > 1e-3 and chi_square_p(firsts, ex.q) < 1e-6


# ------------------------------------------------------------------------------------------------ trace
def test_trace_columns_follow_the_model_and_the_mask():
    lm = toy()
    res = run(lm, "asap", text=B3, seed=5, num_samples=3)
    f = res.frame
    tok = f[f.kind == "token"]
    first = tok.iloc[0]
    p = torch.softmax(skewed([0]), -1)
    assert first["allowed"] == 2 and first["masked_mass"] == pytest.approx(float(p[EOS]), rel=1e-5)
    assert first["logprob"] == pytest.approx(float(p[int(first["token_id"])].log()), abs=1e-6)
    assert not first["cached"] and first["efg_before"] == 1.0
    assert first["efg_after"] == pytest.approx(1 - float(p[EOS]), rel=1e-6)
    assert tok["branch_id"].tolist() == tok["sample"].tolist() == tok["parent_id"].tolist()
    assert tok[tok["sample"] > 0]["cached"].any()                      # revisits read the trie
    assert {"fwd_ms", "mask_ms", "sel_ms", "p_gcd", "p_asap", "efg_child"} <= set(f.columns)
    fin = f[f.kind == "finish"]
    assert fin["final_rank"].tolist() == [0, 1, 2] and fin["complete"].all()
    for s, row in zip(res.sequences, fin.itertuples()):
        assert s.score == pytest.approx(row.score) and row.length == len(s.token_ids) == 3
    cands = f[f.kind == "candidate"]
    assert set(cands["token_id"]) <= {ZERO, ONE, EOS} and cands.groupby(["branch_id", "step"]).size().max() <= 2
    assert cands["accepted"].sum() == len(tok)
    g = run(lm, "gcd", text=B3, seed=5)
    assert "p_asap" not in g.frame.columns and "efg_before" not in g.frame.columns
    assert not g.frame[g.frame.kind == "token"]["cached"].any()


def test_every_sample_is_returned_in_the_order_drawn_and_parses():
    lm = toy(hashed_logits(3, scale=1.0))
    for strategy in ("gcd", "asap"):
        res = run(lm, strategy, text=B5, seed=6, num_samples=40)
        fin = res.frame[res.frame.kind == "finish"]
        assert len(res.sequences) == 40 == len(fin)
        assert [s.extra["sample"] for s in res.sequences] == list(range(40))
        for s, (_, rows) in zip(res.sequences, res.frame[res.frame.kind == "token"].groupby("sample", sort=True)):
            assert s.token_ids == [int(t) for t in rows["token_id"] if t != EOS]
            assert G.parses(lm, B5, s.token_ids)


def test_budget_too_small_for_any_sentence_marks_samples_incomplete():
    lm = toy()
    gcd = run(lm, "gcd", text=B3, n=3, seed=0, num_samples=5)           # "000" + EOS needs 4 tokens
    assert [s.extra["complete"] for s in gcd.sequences] == [False] * 5
    assert all(len(s.token_ids) == 3 for s in gcd.sequences)
    asap = run(lm, "asap", text=B3, n=3, seed=0, num_samples=50)        # learns that nothing fits, then stops
    assert not any(s.extra["complete"] for s in asap.sequences) and len(asap.sequences) < 50
    assert asap.frame[asap.frame.kind == "finish"]["efg_root"].iloc[-1] == 0.0
    ok = run(lm, "asap", text=B3, n=4, seed=0, num_samples=20)
    assert all(s.extra["complete"] for s in ok.sequences)


def test_eviction_of_cached_distributions_keeps_asap_exact(monkeypatch):
    monkeypatch.setattr(G.trie, "TRIE_CACHE_ENTRIES", 3)
    lm = toy()
    ex = exact(lm, B3)
    res = run(lm, "asap", text=B3, seed=7, num_samples=1500)
    assert chi_square_p(counts_of(res), ex.q) > 1e-3
    assert res.meta["metrics"]["efg_root"] == pytest.approx(ex.z, rel=1e-12)
    tok = res.frame[res.frame.kind == "token"]
    assert (~tok["cached"]).sum() > 1000                               # evicted nodes were recomputed
    assert lm.forwards > 1000


def test_explored_support_approximation_for_an_infinite_grammar():
    vocab = ("</s>", "0", "1", "+")
    lm = toy(hashed_logits(len(vocab), scale=1.0), vocab)
    text = 'root ::= [01]+ ("+" [01]+)*'
    res = run(lm, "asap", text=text, n=12, seed=8, num_samples=60, exact_max_nodes=64)
    f = res.frame
    kls, target = f[f.kind == "kl"], f[f.kind == "target"]
    assert not kls["exact"].any() and not target["exact"].any()
    complete = [s for s in res.sequences if s.extra["complete"]]
    assert len(target) == len({tuple(s.token_ids) for s in complete}) > 1
    weights = {tuple(s.token_ids): math.exp(s.score) for s in complete}
    z = sum(weights.values())
    for row in target.itertuples():
        w = tuple(int(t) for t in row.seq.split()) if row.seq else ()
        assert row.q == pytest.approx(weights[w] / z, rel=1e-9)
    assert res.meta["metrics"]["kl_exact"] is False


# ------------------------------------------------------------------------------------------------ input, errors
def test_grammar_text_wins_over_the_builtin_name():
    lm = toy()
    res = run(lm, "gcd", grammar="json", text='root ::= "1" "0"', seed=0)
    assert res.sequences[0].token_ids == [ONE, ZERO]
    assert res.meta["metrics"]["grammar"] == "custom"
    res = run(lm, "gcd", grammar="json", text=B3, seed=0)
    assert res.meta["metrics"]["grammar"] == "binary_len_3"           # the editor holding a built-in's text
    res = run(lm, "asap", grammar="binary_len_5", seed=0)
    assert len(res.sequences[0].token_ids) == 5


@pytest.mark.parametrize("text,where", [('root ::= "a" |', "line 1, column"),
                                        ('root ::= foo', 'Rule "foo" is not defined'),
                                        ('start ::= "a"', 'root rule'),
                                        ("root ::= [a-", "line 1, column"),
                                        ("   ", "grammar is empty")])
def test_bad_grammar_is_a_one_line_user_error_before_decoding(text, where):
    lm = toy()
    for strategy in ("gcd", "asap"):
        with pytest.raises(UserError) as e:
            Run(lm, RunRequest(model="fake", strategy=strategy, prompt=PROMPT, grammar=text))
        assert where in str(e.value) and "\n" not in str(e.value)
        assert lm.forwards == 0


def test_vocabulary_that_cannot_start_the_grammar_is_a_user_error():
    lm = FakeLM()
    with pytest.raises(UserError, match="allows no token of model 'fake'"):
        Run(lm, RunRequest(model="fake", strategy="gcd", prompt=" the cat", params={"grammar": "binary_len_3"})
            ).run_to_end()


def test_num_samples_limit_is_enforced_with_its_range():
    lm = toy()
    for strategy in ("gcd", "asap"):
        with pytest.raises(UserError, match=r"num_samples must be in \[1, 5000\]"):
            run(lm, strategy, num_samples=G.MAX_SAMPLES + 1)
        with pytest.raises(UserError, match="grammar must be one of"):
            run(lm, strategy, grammar="binary")


def test_compiled_grammar_cache_is_keyed_by_tokenizer_and_the_lm_keeps_no_run_state():
    a, b = toy(), toy()
    before = set(vars(a))
    ga = G.compiled_grammar(a, B3)
    assert G.compiled_grammar(a, B3) is ga
    assert G.compiled_grammar(b, B3) is not ga                        # another tokenizer object
    assert G.compiled_grammar(a, B5) is not ga
    run(a, "asap", text=B3, num_samples=3)
    assert set(vars(a)) == before


def test_cli_run_writes_every_sample_and_bad_grammar_exits_2(tmp_path, capsys, monkeypatch):
    from declab import cli
    lm = toy()
    monkeypatch.setattr("declab.cli.get_lm", lambda key, registry=None: lm)
    gfile = tmp_path / "g.ebnf"
    gfile.write_text(B3)
    out = tmp_path / "o.json"
    assert cli.main(["run", "--strategy", "asap", "--prompt", PROMPT, "--grammar-file", str(gfile), "--set",
                     "num_samples=7", "--max-new-tokens", "6", "--json", str(out), "--csv", str(tmp_path / "t.csv"),
                     "--quiet"]) == 0
    data = json.loads(out.read_text())
    assert len(data["sequences"]) == 7
    assert all(s["text"] in {"000", "100", "101", "110", "111"} for s in data["sequences"])
    assert cli.main(["run", "--strategy", "gcd", "--prompt", PROMPT, "--set", "grammar=binary_len_5", "--json",
                     str(out), "--quiet"]) == 0
    assert len(json.loads(out.read_text())["sequences"][0]["text"]) == 5
    bad = tmp_path / "bad.ebnf"
    bad.write_text('root ::= "0" | \n')
    capsys.readouterr()
    assert cli.main(["run", "--strategy", "gcd", "--prompt", PROMPT, "--grammar-file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "grammar does not compile" in err and "line" in err and "column" in err


# ------------------------------------------------------------------------------------------------ figures
def test_mechanism_figures_kl_distribution_and_trie():
    import viz
    from viz.grammar import gcd_limit, kl_compare_figure, trie_nodes
    from viz.mechanism import applicable
    lm = toy()
    asap = run(lm, "asap", text=B3, seed=9, num_samples=60)
    gcd = run(lm, "gcd", text=B3, seed=9, num_samples=60)
    assert [n for n, _ in applicable(asap.frame)] == ["gcd", "asap"]        # columns; the gcd view steps aside
    figs_a, figs_g = viz.figures_for(asap.frame, asap.meta), viz.figures_for(gcd.frame, gcd.meta)
    assert "Asap" in figs_a and "Gcd" not in figs_a and "Gcd" in figs_g and "Asap" not in figs_g
    assert "Acceptance" in figs_a                                            # masked mass per step
    fig = figs_a["Asap"]
    names = [t.name for t in fig.data]
    assert "GCD's limit" in names and "exact Q" in names and "EFG~(root)" in names
    limit = next(t for t in fig.data if t.name == "GCD's limit")
    assert limit.y[0] == pytest.approx(asap.meta["metrics"]["kl_gcd_limit"], rel=1e-9)
    assert gcd_limit(asap.frame[asap.frame.kind == "target"]) == pytest.approx(limit.y[0])
    bars = {t.name: t for t in fig.data if t.type == "bar"}
    assert set(bars["exact Q"].x) == {"000", "100", "101", "110", "111"}
    # the trie from the node rows equals the one rebuilt from the token rows (visits included)
    nodes = asap.frame[asap.frame.kind == "node"]
    rebuilt = trie_nodes(asap.frame[asap.frame.kind != "node"])
    assert len(rebuilt) == len(nodes)
    assert sorted(rebuilt["visits"].tolist()) == sorted(nodes["visits"].astype(int).tolist())
    both = kl_compare_figure({"gcd": gcd.frame, "asap": asap.frame})
    assert {"gcd", "asap", "GCD's limit"} <= {t.name for t in both.data}
    assert "exact Q" in both.layout.title.text


def test_temperature_defines_p_for_asap_and_top_k_acts_on_the_allowed_set_for_gcd():
    lm = toy()
    ex = exact(lm, B3, temperature=0.5)
    assert ex.q != pytest.approx(exact(lm, B3).q)
    res = run(lm, "asap", text=B3, seed=10, num_samples=1200, temperature=0.5)
    assert chi_square_p(counts_of(res), ex.q) > 1e-3
    assert res.meta["metrics"]["efg_root"] == pytest.approx(ex.z, rel=1e-12)
    greedy_like = run(lm, "gcd", text=B3, seed=10, num_samples=20, top_k=1)
    # top-1 among the allowed tokens: "0" first (p 0.665 vs 0.285), then the mask forces 0, 0, EOS
    assert {tuple(s.token_ids) for s in greedy_like.sequences} == {(ZERO, ZERO, ZERO)}
    tok = greedy_like.frame[greedy_like.frame.kind == "token"]
    assert (tok["p_gcd"] == 1.0).all() and (tok["score"] == 0.0).all()
