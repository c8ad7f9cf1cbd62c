"""The sampler_chain strategy end to end (docs/strategies.md#sampler_chain): on the scripted fake model (stage
rows against an independent plain-Python chain, seeds, greedy at temperature 0, penalty / DRY windows with the
prompt, logit bias, one host copy per step, bad input, `declab list`, the Teach page) and a short run on the
embedded model (marked `model`)."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from declab.cli import main as cli_main
from declab.core import UserError
from declab.run import Run, RunRequest
from strategies.llama_samplers import DEFAULT_ORDER
from tests.fake import DEFAULT_VOCAB, FakeLM, hashed_logits, no_eos

WIDE_VOCAB = DEFAULT_VOCAB + tuple(f" w{i}" for i in range(68))          # 100 tokens: top_k 40 cuts


@pytest.fixture(autouse=True)
def _fake_registry(fake_registry):
    yield


def run(lm, n=12, seed=0, prompt=" the cat sat", **params):
    res = Run(lm, RunRequest(model=lm.key, strategy="sampler_chain", prompt=prompt, params=params,
                             max_new_tokens=n, seed=seed)).run_to_end()
    assert res.status == "ok", res.error
    return res


def rows(res, kind):
    f = res.frame
    return f[f.kind == kind].reset_index(drop=True)


def wide_lm():
    return FakeLM(logits_fn=no_eos(hashed_logits(len(WIDE_VOCAB))), vocab=WIDE_VOCAB)


def context_logits(lm, res, step):
    """The fake model's logits at `step`, recomputed from scratch from prompt + the tokens before it."""
    prompt = lm.tokenizer.encode(" the cat sat")
    toks = rows(res, "token")["token_id"].astype(int).tolist()
    return lm.logits_fn(prompt + toks[:step]).double(), prompt + toks[:step]


def reference_default_chain(logits: torch.Tensor) -> list[set[int]]:
    """llama.cpp's default chain with default parameters (penalties, DRY, top_n_sigma, typical, XTC off), in plain
    Python on float64: kept ids after top_k 40, top_p 0.95 (min_keep 0), min_p 0.05, temperature 0.8."""
    l = logits.tolist()
    ids = sorted(range(len(l)), key=lambda i: -l[i])
    after = [{i for i in range(len(l)) if l[i] > float("-inf")}] * 3
    k = ids[:40]
    after.append(set(k))                                          # top_k
    after.append(set(k))                                          # typ_p (off)
    z = sum(math.exp(l[i] - l[k[0]]) for i in k)
    cum, top_p = 0.0, []
    for i in k:
        cum += math.exp(l[i] - l[k[0]]) / z
        top_p.append(i)
        if cum >= 0.95:
            break
    after.append(set(top_p))                                      # top_p
    thr = l[top_p[0]] + math.log(0.05)
    after.append({i for i in top_p if l[i] >= thr})               # min_p
    after += [after[-1], after[-1]]                               # xtc (off), temperature
    return after


# ------------------------------------------------------------------------------------------------ the chain
def test_stage_rows_follow_an_independent_default_chain_and_agree_with_kept():
    lm = wide_lm()
    res = run(lm, n=10)
    st, tok, cand = rows(res, "stage"), rows(res, "token"), rows(res, "candidate")
    assert st.groupby("step")["stage"].apply(tuple).tolist() == [DEFAULT_ORDER] * len(tok)
    for step in range(len(tok)):
        logits, _ = context_logits(lm, res, step)
        p0 = logits.softmax(-1)
        want = reference_default_chain(logits)
        s = st[st.step == step].sort_values("stage_pos")
        assert s["n_kept"].tolist() == [len(w) for w in want]
        assert s["mass_kept"].tolist() == pytest.approx([float(p0[list(w)].sum()) for w in want], abs=1e-5)
        t = tok.iloc[step]
        assert int(t["token_id"]) in want[-1]                               # drawn from what the chain left
        assert t["kept"] == s["n_kept"].iloc[-1] and t["kept_mass"] == pytest.approx(s["mass_kept"].iloc[-1])
        final = torch.tensor(sorted(want[-1]))
        q = torch.softmax(logits[final] / 0.8, -1)
        assert t["score"] == pytest.approx(float(q[(final == int(t["token_id"])).nonzero()[0, 0]].log()), abs=1e-4)
        c = cand[cand.step == step]
        assert len(c) == 10 and c["rank"].tolist() == list(range(10))
        for _, r in c.iterrows():                                           # each top token's fate
            gone = next((i for i, w in enumerate(want) if int(r["token_id"]) not in w), None)
            assert (pd.isna(r["removed_at"]) if gone is None else r["removed_at"] == gone)
            assert (pd.isna(r["removed_by"]) if gone is None else r["removed_by"] == DEFAULT_ORDER[gone])
            assert (r["p_final"] > 0) == (gone is None)


def test_counts_never_grow_and_reweighting_stages_keep_the_count():
    res = run(wide_lm(), n=10, samplers="penalties;temperature;top_k;dry;min_p;top_p", repeat_penalty=1.3,
              dry_multiplier=0.8, top_k=20)
    st = rows(res, "stage")
    for _, s in st.groupby("step"):
        s = s.sort_values("stage_pos")
        n, m = s["n_kept"].tolist(), s["mass_kept"].tolist()
        assert all(a >= b for a, b in zip(n, n[1:])) and all(a >= b - 1e-9 for a, b in zip(m, m[1:]))
        for prev, (name, k) in zip([99] + n, zip(s["stage"], n)):          # 99: EOS is at -inf
            if name in ("penalties", "dry", "temperature"):
                assert k == prev
    assert (rows(res, "token")["kept"].tolist() ==
            st.sort_values("stage_pos").groupby("step")["n_kept"].last().tolist())


def test_seeded_runs_reproduce_and_seeds_differ_xtc_included():
    lm = wide_lm()
    params = dict(xtc_probability=0.5, xtc_threshold=0.05, top_k=0, top_p=1.0, min_p=0.0, temperature=1.0)
    a, b, c = run(lm, n=16, seed=3, **params), run(lm, n=16, seed=3, **params), run(lm, n=16, seed=4, **params)
    ids = lambda r: rows(r, "token")["token_id"].tolist()
    assert ids(a) == ids(b) and ids(a) != ids(c)
    fired = rows(a, "stage").query("stage == 'xtc'")["xtc_fired"].astype(bool)
    assert 0 < fired.sum() < len(fired)
    assert fired.tolist() == rows(b, "stage").query("stage == 'xtc'")["xtc_fired"].astype(bool).tolist()


def test_temperature_zero_is_greedy():
    lm = wide_lm()
    res = run(lm, n=10, temperature=0.0)
    greedy = Run(lm, RunRequest(model=lm.key, strategy="greedy", prompt=" the cat sat", max_new_tokens=10)
                 ).run_to_end()
    assert rows(res, "token")["token_id"].tolist() == rows(greedy, "token")["token_id"].tolist()
    assert (rows(res, "token")["kept"] == 1).all()


def test_penalty_window_includes_the_prompt_and_follows_llama_cpp_order():
    """temperature 0 after penalties: each token is the argmax of the penalised logits, recomputed from the
    context (window = the last 4 tokens of prompt + generation)."""
    lm = FakeLM(logits_fn=no_eos(hashed_logits(len(DEFAULT_VOCAB))))
    res = run(lm, n=12, samplers="penalties;temperature", temperature=0.0, repeat_penalty=3.0,
              frequency_penalty=0.7, presence_penalty=0.4, penalty_last_n=4)
    for step, t in enumerate(rows(res, "token")["token_id"].astype(int)):
        logits, ctx = context_logits(lm, res, step)
        window = ctx[-4:]
        for v in set(window):
            c = window.count(v)
            logits[v] = (logits[v] * 3.0 if logits[v] <= 0 else logits[v] / 3.0) - c * 0.7 - 0.4
        assert t == int(logits.argmax())


def test_dry_in_the_chain_penalises_what_the_definition_says():
    """DRY before a greedy temperature: each token is the argmax of logits - multiplier * base^(L - allowed),
    L from the O(n^2) definition over prompt + generation, breakers from the fake vocabulary's text."""
    from tests.test_llama_samplers import brute_force_dry
    from strategies.sampler_chain import processed_breakers
    loop = lambda ctx: torch.nn.functional.one_hot(torch.tensor((ctx[-1] % 5) + 1), len(DEFAULT_VOCAB)).float() * 4
    lm = FakeLM(logits_fn=loop)
    res = run(lm, n=20, samplers="dry;temperature", temperature=0.0, dry_multiplier=3.0, dry_base=1.5,
              dry_allowed_length=2)
    breakers = processed_breakers(lm, ("\n", ":", "\"", "*"))
    assert breakers[12] == [()] and breakers[15] == [()]          # "\n" and ' "quoted"' are breakers
    prompt = lm.tokenizer.encode(" the cat sat")
    toks = rows(res, "token")["token_id"].astype(int).tolist()
    penalised = 0
    for step, t in enumerate(toks):
        ctx = prompt + toks[:step]
        logits = loop(ctx).double()
        for v, L in brute_force_dry(ctx, 2, breakers).items():
            if () not in breakers.get(v, ()):
                logits[v] -= 3.0 * 1.5 ** (L - 2)
                penalised += 1
        assert t == int(logits.argmax())
    assert penalised > 0


def test_logit_bias_bans_and_is_its_own_first_stage():
    lm = wide_lm()
    free = run(lm, n=6, temperature=0.0)
    first = int(rows(free, "token")["token_id"].iloc[0])
    res = run(lm, n=6, temperature=0.0, logit_bias=f"{first}-inf,3+0.5")
    assert int(rows(res, "token")["token_id"].iloc[0]) != first
    st = rows(res, "stage")
    assert st.query("step == 0")["stage"].tolist()[0] == "logit_bias"
    assert st.query("step == 0 and stage == 'logit_bias'")["n_kept"].item() == 98     # EOS and the ban
    with pytest.raises(UserError, match=r"token id 100 is outside the vocabulary \[0, 99\]"):
        Run(lm, RunRequest(model=lm.key, strategy="sampler_chain", prompt=" the cat", max_new_tokens=2,
                           params={"logit_bias": "100+1"})).run_to_end()


def test_one_host_copy_per_step(monkeypatch):
    """Chain.apply copies to the host once per step (one tolist), whatever the number of stages."""
    from strategies import sampler_chain
    calls = {"n": 0, "active": False}
    names = ("tolist", "item", "__bool__", "__int__", "__float__", "numpy", "cpu")
    originals = {n: getattr(torch.Tensor, n) for n in names}

    def counting(name):
        def f(self, *a, **k):
            if calls["active"]:
                calls["n"] += 1
            return originals[name](self, *a, **k)
        return f
    for n in names:
        monkeypatch.setattr(torch.Tensor, n, counting(n))
    real_apply = sampler_chain.Chain.apply

    def apply(self, logits, step):
        calls["active"] = True
        try:
            return real_apply(self, logits, step)
        finally:
            calls["active"] = False
    monkeypatch.setattr(sampler_chain.Chain, "apply", apply)
    res = run(wide_lm(), n=5, dry_multiplier=0.5, repeat_penalty=1.2, xtc_probability=0.5, xtc_threshold=0.05,
              typical_p=0.9, top_n_sigma=2.0, dynatemp_range=0.3)
    assert len(rows(res, "token")) == 5 and calls["n"] == 5


# ------------------------------------------------------------------------------------------------ input
@pytest.mark.parametrize("setting, message", [
    ("samplers=top_k;mirostat", "unknown sampler 'mirostat'; legal names (';'-separated, each at most once): "
                                "penalties, dry, top_n_sigma, top_k, typ_p, top_p, min_p, xtc, temperature"),
    ("samplers=top_k;temp;temperature", "'temperature' is listed twice"),
    ("repeat_penalty=-1", "repeat_penalty must be in (0.0, 100.0]"),
    ("dry_multiplier=-0.5", "dry_multiplier must be in [0.0, 100.0]"),
    ("xtc_threshold=0.7", "xtc_threshold must be in [0.0, 0.5]"),
    ("penalty_last_n=-2", "penalty_last_n must be in [-1, 1000000]"),
    ("top_p=1.5", "top_p must be in [0.0, 1.0]"),
    ("logit_bias=15043:1", "TOKEN_ID+BIAS or TOKEN_ID-BIAS"),
    ("dry_sequence_breakers=[1]", "JSON list of strings"),
])
def test_bad_input_is_one_line_naming_the_legal_values(capsys, setting, message):
    code = cli_main(["run", "--strategy", "sampler_chain", "--prompt", " the cat", "--max-new-tokens", "2",
                     "--set", setting])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


def test_cli_runs_with_a_custom_order_and_list_shows_every_range(capsys):
    assert cli_main(["run", "--strategy", "sampler_chain", "--prompt", " the cat", "--max-new-tokens", "3",
                     "--set", "samplers=min-p;top-k;temp", "--set", "top_k=5"]) == 0
    capsys.readouterr()
    assert cli_main(["list"]) == 0
    out = capsys.readouterr().out
    lines = out[out.index("  sampler_chain:"):].splitlines()
    end = next((i for i, ln in enumerate(lines[1:], 1) if not ln.startswith("    ")), len(lines))
    block = "\n".join(lines[:end])
    for name in ("samplers", "temperature", "top_k", "top_p", "min_p", "typical_p", "top_n_sigma", "min_keep",
                 "xtc_probability", "xtc_threshold", "dynatemp_range", "dynatemp_exponent", "repeat_penalty",
                 "frequency_penalty", "presence_penalty", "penalty_last_n", "dry_multiplier", "dry_base",
                 "dry_allowed_length", "dry_penalty_last_n", "dry_sequence_breakers", "logit_bias"):
        assert f"    {name} (" in block
    assert "range ';'-separated, each at most once, from: penalties, dry" in block
    assert "top_k (int, default 40, range [0, 1000000])" in block


# ------------------------------------------------------------------------------------------------ app
def test_teach_page_walks_a_step_through_the_chain(fake_registry):
    from streamlit.testing.v1 import AppTest
    from tests.test_app import HOME, TIMEOUT
    app = AppTest.from_file(str(HOME), default_timeout=TIMEOUT).run()
    app.switch_page("views/teach.py").run()
    app.selectbox(key="teach:strategy").set_value("sampler_chain").run()
    app.button(key="teach:go").click().run()
    assert not app.exception, [e.value for e in app.exception]
    tables = [d.value for d in app.dataframe]
    chain = next(t for t in tables if "stage" in t.columns and "removed (top tokens)" in t.columns)
    assert chain["stage"].tolist() == list(DEFAULT_ORDER)
    assert chain["after"].tolist() == sorted(chain["after"].tolist(), reverse=True)


# ------------------------------------------------------------------------------------------------ embedded model
@pytest.mark.model
def test_on_the_embedded_model_seeded_runs_reproduce_and_stages_agree(real_lm, monkeypatch):
    """Default chain on SmolLM2-135M (V = 49152): the same seed gives the same tokens, another seed other ones;
    per step top_k leaves exactly 40, the counts and masses never grow along the chain, `kept` is the last stage's
    count, step 0's cuts equal an independent float64 recomputation from the prompt's logits, and temperature 0
    is the greedy strategy's text."""
    monkeypatch.delenv("DECLAB_MODELS", raising=False)                   # the real registry
    lm = real_lm
    prompt = "The history of the printing press begins"

    def go(seed, strategy="sampler_chain", **params):
        res = Run(lm, RunRequest(model=lm.key, strategy=strategy, prompt=prompt, params=params, max_new_tokens=8,
                                 seed=seed, prompt_format="raw")).run_to_end()
        assert res.status == "ok", res.error
        return res
    a, b, c = go(0), go(0), go(1)
    ids = lambda r: rows(r, "token")["token_id"].tolist()
    assert ids(a) == ids(b) and ids(a) != ids(c)
    st, tok = rows(a, "stage"), rows(a, "token")
    assert (st[st.stage == "top_k"]["n_kept"] == 40).all()
    for step, s in st.groupby("step"):
        n, m = s.sort_values("stage_pos")["n_kept"].tolist(), s.sort_values("stage_pos")["mass_kept"].tolist()
        assert all(x >= y for x, y in zip(n, n[1:])) and all(x >= y - 1e-6 for x, y in zip(m, m[1:]))
        assert tok.loc[tok.step == step, "kept"].item() == n[-1]
    with torch.inference_mode():
        logits = lm.prefill(lm.encode_prompt(prompt, "raw")).logits[0].double()
    want = reference_default_chain(logits)
    s0 = st[st.step == 0].sort_values("stage_pos")
    assert s0["n_kept"].tolist() == [len(w) for w in want]
    assert s0["mass_kept"].tolist() == pytest.approx([float(logits.softmax(-1)[list(w)].sum()) for w in want],
                                                     abs=1e-4)
    assert ids(go(0, temperature=0.0)) == ids(go(0, strategy="greedy"))
