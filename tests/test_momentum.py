"""Momentum decoding (docs/strategies.md#momentum): property tests 3.5 (a)(b)(c) on the scripted fake model, the n-gram
index against a brute-force rescan, trace consistency, and a short run on the embedded model."""

import math
import random

import pytest
import torch

from declab.core.errors import UserError
from tests.fake import FakeLM
from declab.run import Run, RunRequest
from declab.core import get_strategy
from strategies.momentum import RESISTANCE_TABLES, NgramIndex, resistance_value


def run(lm, strategy="momentum", prompt=" the cat", n=30, seed=0, model=None, fmt=None, **params):
    return Run(lm, RunRequest(model=model or lm.key, strategy=strategy, prompt=prompt, params=params,
                              max_new_tokens=n, seed=seed, prompt_format=fmt)).run_to_end()


def brute_force_l(seq: list[int], v: int, max_ngram: int) -> int:
    """The reference's definition, by rescanning: 0 if v never occurred; else the largest n in 2..max_ngram such
    that the n-gram (seq[-(n-1):] + [v]) occurs in seq ending at an earlier occurrence of v; else 1."""
    if v not in seq:
        return 0
    for n in range(max_ngram, 1, -1):
        if len(seq) < n - 1:
            continue
        query = tuple(seq[len(seq) - (n - 1):]) + (v,)
        for end in range(len(seq)):
            if seq[end] == v and end - n + 1 >= 0 and tuple(seq[end - n + 1: end + 1]) == query:
                return n
    return 1


def ids(text, lm):
    return lm.encode_prompt(text, "raw")


# ------------------------------------------------------------------------------------------------ 3.5 (c): l
def test_repeat_length_of_handcrafted_sequences():
    a, b, c, d = 1, 2, 3, 4
    g = NgramIndex(5, [a, b, c, a, b])
    assert g.repeat_lengths([c]) == [3]            # "a b c a b" + c closes the trigram "a b c"
    assert g.repeat_lengths([d]) == [0]            # never seen
    assert g.repeat_lengths([a]) == [1]            # seen, but "b a" never occurred
    assert g.repeat_lengths([b]) == [1]            # seen, "b b" never occurred
    assert g.repeat_lengths([c, d, a]) == [3, 0, 1]
    g.add(c)                                       # a b c a b c
    assert g.repeat_lengths([a]) == [4]            # query "a b c" + a = "a b c a" occurred at positions 0..3


def test_repeat_length_is_capped_at_max_ngram_and_grows_along_a_loop():
    loop = [5, 6, 7] * 4
    g2, g3, g5 = NgramIndex(2, loop), NgramIndex(3, loop), NgramIndex(5, loop)
    assert g2.repeat_lengths([5]) == [2]
    assert g3.repeat_lengths([5]) == [3]
    assert g5.repeat_lengths([5]) == [5]
    g = NgramIndex(5, [5, 6, 7])
    lengths = []
    for t in [5, 6, 7, 5, 6]:
        lengths.append(g.repeat_lengths([t])[0])
        g.add(t)
    assert lengths == [1, 2, 3, 4, 5]


def test_the_query_must_end_with_the_candidate():
    # "x y" occurred, but followed by z; candidate w after "x y" again: w was seen elsewhere, so l = 1, not 3
    g = NgramIndex(5, [1, 2, 3, 9, 4, 1, 2])
    assert g.repeat_lengths([4, 3]) == [1, 3]


def test_index_matches_a_brute_force_rescan_on_random_sequences():
    rng = random.Random(0)
    for trial in range(120):
        alphabet = rng.choice([2, 3, 5, 12])
        max_ngram = rng.choice([2, 3, 5, 8])
        seq = [rng.randrange(alphabet) for _ in range(rng.randrange(1, 40))]
        g = NgramIndex(max_ngram)
        for t in seq:
            g.add(t)
            cands = list(range(alphabet + 1))
            assert g.repeat_lengths(cands) == [brute_force_l(g.ids, v, max_ngram) for v in cands], (seq, max_ngram)


def test_resistance_tables():
    assert [resistance_value("cac238b", n) for n in range(7)] == [0, 1, 3, 4, 5, 5, math.inf]
    assert [resistance_value("2b58b6f", n) for n in range(6)] == [0, 1, 3, 4, 5, 6]
    assert [resistance_value("ngram_blocking", n) for n in range(6)] == [0, 0, 0, 0, 5, math.inf]
    assert [resistance_value("linear", n) for n in range(6)] == [0, 1, 2, 3, 4, 5]
    assert [resistance_value("constant", n) for n in range(9)] == [0] + [2] * 8
    assert resistance_value("log", 0) == 0 and resistance_value("log", 5) == pytest.approx(5.0)
    assert resistance_value("exp", 0) == 0 and resistance_value("exp", 2) == pytest.approx(1.125)
    assert set(RESISTANCE_TABLES) == set(get_strategy("momentum").Config.__dataclass_fields__["resistance"]
                                         .metadata["choices"])


# ------------------------------------------------------------------------------------------------ runs
@pytest.fixture(autouse=True)
def _fake_registry(fake_registry):
    yield


@pytest.mark.parametrize("resistance", ["cac238b", "ngram_blocking"])
def test_alpha_zero_is_greedy(fake_lm, resistance):
    """3.5 (a): alpha = 0 reproduces greedy exactly (also with a table that has R = inf)."""
    for prompt in (" the cat", " a dog ran", " it was very"):
        greedy = run(fake_lm, "greedy", prompt, n=40).sequences[0].token_ids
        mom = run(fake_lm, prompt=prompt, n=40, alpha=0.0, resistance=resistance, top_k=8)
        assert mom.sequences[0].token_ids == greedy
        tokens = mom.frame[mom.frame.kind == "token"]
        assert not tokens.overridden.any() and (tokens["rank"] == 0).all()


def test_alpha_zero_is_greedy_with_tied_logits():
    lm = FakeLM(lambda ctx: torch.tensor([0.0, 1.0, 3.0, 3.0, 3.0] + [1.0] * 27))   # argmax tie: lowest id 2
    greedy = run(lm, "greedy", n=6).sequences[0].token_ids
    assert greedy == [2] * 6
    assert run(lm, n=6, alpha=0.0).sequences[0].token_ids == greedy


def cycle_lm(p_top: float, p_escape: float) -> FakeLM:
    """A -> B -> C -> A ... with p(next) = p_top; an unseen escape token E has p_escape after every cycle token;
    after E the model ends (EOS). A, B, C, E = ' the', ' cat', ' sat', ' on' (ids 1, 2, 3, 4)."""
    nxt = {1: 2, 2: 3, 3: 1}
    V = 32

    def fn(ctx):
        last = ctx[-1]
        p = torch.full((V,), (1.0 - p_top - p_escape) / (V - 2))
        if last in nxt:
            p[nxt[last]], p[4] = p_top, p_escape
        else:
            p = torch.full((V,), 1e-4)
            p[0] = 1.0
        return p.log()
    return FakeLM(fn)


def test_toy_cycle_is_left_once_the_top1_advantage_is_below_alpha_times_r():
    """3.5 (b): greedy loops A B C A B C ...; momentum (cac238b, alpha 0.2) leaves as soon as
    p(top-1) - alpha * R(l) < p(E). With p_top = 0.5, p_E = 0.4: at the first revisit of A, l = 1 (A is in the prompt,
    "C A" is new), 0.5 - 0.2 < 0.4, so E is taken at once. With p_top = 0.7, p_E = 0.2: A is kept (l = 1,
    0.7 - 0.2 > 0.2), then B would close the repeated bigram "A B" (l = 2, R = 3): 0.7 - 0.6 < 0.2, so E."""
    A, B, C, E = 1, 2, 3, 4
    lm = cycle_lm(0.5, 0.4)
    assert run(lm, "greedy", " the", n=9).sequences[0].token_ids == [B, C, A] * 3
    res = run(lm, prompt=" the", n=9)
    assert res.sequences[0].token_ids == [B, C, E]
    tok = res.frame[res.frame.kind == "token"].set_index("step")
    assert tok.loc[2, "overridden"] and tok.loc[2, "label"] == 2 and tok.loc[2, "rank"] == 1
    cand = res.frame[(res.frame.kind == "candidate") & (res.frame.step == 2)].set_index("token_id")
    assert cand.loc[A, "repeat_len"] == 1 and cand.loc[A, "resistance"] == 1.0
    assert cand.loc[A, "score"] == pytest.approx(0.5 - 0.2) and cand.loc[E, "score"] == pytest.approx(0.4)

    lm = cycle_lm(0.7, 0.2)
    res = run(lm, prompt=" the", n=9)
    assert res.sequences[0].token_ids == [B, C, A, E]
    tok = res.frame[res.frame.kind == "token"].set_index("step")
    assert tok.loc[2, "token_id"] == A and tok.loc[2, "label"] == 1 and tok.loc[2, "revisit"]
    assert tok.loc[2, "repeat_len"] == 1 and not tok.loc[2, "overridden"]
    assert tok.loc[3, "overridden"] and tok.loc[3, "p_top1"] == pytest.approx(0.7)
    cand = res.frame[(res.frame.kind == "candidate") & (res.frame.step == 3)].set_index("token_id")
    assert cand.loc[B, "repeat_len"] == 2 and cand.loc[B, "resistance"] == 3.0
    # alpha small enough: the loop is never left within the limit
    assert run(lm, prompt=" the", n=9, alpha=0.05).sequences[0].token_ids == [B, C, A] * 3
    # the n-gram blocking table lets short repeats through and blocks the 5-gram outright
    res = run(lm, prompt=" the", n=12, resistance="ngram_blocking")
    assert res.sequences[0].token_ids == [B, C, A, B, C, E]


def test_trace_matches_a_from_scratch_recomputation(fake_lm):
    """Every step: candidates are the top-k by p (prompt included in the graph), repeat_len equals the brute-force
    rescan, resistance = R(l), score = p - alpha R, and the chosen token is the first maximum."""
    alpha, k, L = 0.3, 6, 4
    prompt = " the cat sat on the mat and the cat"
    res = run(fake_lm, prompt=prompt, n=60, alpha=alpha, top_k=k, max_ngram=L, resistance="linear")
    df = res.frame
    context = ids(prompt, fake_lm)
    tokens = df[df.kind == "token"]
    overrides = 0
    for _, row in tokens.iterrows():
        cands = df[(df.kind == "candidate") & (df.step == row.step)].sort_values("rank")
        logp = torch.log_softmax(fake_lm.logits_fn(context), -1)
        assert cands.token_id.tolist() == torch.topk(logp, k).indices.tolist()
        assert cands.p.to_numpy() == pytest.approx(logp.exp()[cands.token_id.tolist()].numpy(), abs=1e-6)
        for _, c in cands.iterrows():
            assert c.repeat_len == brute_force_l(context, int(c.token_id), L)
            assert c.resistance == resistance_value("linear", int(c.repeat_len))
            assert c.score == pytest.approx(c.p - alpha * c.resistance, abs=1e-6)
        best = cands.score.to_numpy().argmax()
        assert row.token_id == cands.token_id.iloc[best] and row["rank"] == best
        assert cands.accepted.sum() == 1 and cands[cands.accepted].token_id.iloc[0] == row.token_id
        assert row.overridden == (best != 0) and row.revisit == (row.token_id in context)
        assert row.label == (0 if cands.token_id.iloc[0] not in context else (1 if best == 0 else 2))
        overrides += bool(row.overridden)
        context.append(int(row.token_id))
    assert overrides > 0        # the test would be vacuous if momentum never acted


def test_large_top_k_is_clamped_and_traced_rows_are_capped():
    lm = FakeLM()                                          # 32 tokens
    res = run(lm, n=5, top_k=5000)
    cands = res.frame[res.frame.kind == "candidate"]
    assert cands.groupby("step").size().max() <= 50 and len(res.sequences[0].token_ids) >= 1


def test_bad_parameters_fail_with_the_legal_range(fake_lm):
    for params, text in [({"top_k": 0}, "top_k must be in [1, 5000]"), ({"alpha": -1.0}, "alpha must be in"),
                         ({"max_ngram": 1}, "max_ngram must be in [2, 8]"),
                         ({"resistance": "nope"}, "resistance must be one of cac238b")]:
        with pytest.raises(UserError, match=text.replace("[", r"\[").replace("]", r"\]")):
            run(fake_lm, n=3, **params)


def test_momentum_is_listed_with_its_parameters():
    params = {p["name"]: p for p in get_strategy("momentum").params()}
    assert params["alpha"]["default"] == 0.2 and params["top_k"]["default"] == 5
    assert params["max_ngram"]["default"] == 5 and params["resistance"]["default"] == "cac238b"


# ------------------------------------------------------------------------------------------------ real model
@pytest.mark.model
def test_momentum_on_the_embedded_model(real_lm, monkeypatch):
    monkeypatch.delenv("DECLAB_MODELS", raising=False)
    prompt = "Once upon a time, in a small village,"
    res = run(real_lm, prompt=prompt, n=40, model="smollm2-135m-instruct", fmt="raw")
    greedy = run(real_lm, "greedy", prompt=prompt, n=40, model="smollm2-135m-instruct", fmt="raw")
    df = res.frame
    tokens = df[df.kind == "token"]
    assert res.status == "ok" and len(tokens) == 40
    context = real_lm.encode_prompt(prompt, "raw")
    for _, row in tokens.iterrows():          # l over prompt + generation, on real token ids
        cands = df[(df.kind == "candidate") & (df.step == row.step)]
        assert len(cands) == 5
        assert cands.repeat_len.tolist() == [brute_force_l(context, int(t), 5) for t in cands.token_id]
        context.append(int(row.token_id))
    # where momentum first departs from greedy it overrode greedy's top-1 because of resistance
    g, m = greedy.sequences[0].token_ids, res.sequences[0].token_ids
    first = next(i for i, (a, b) in enumerate(zip(g, m)) if a != b)
    row = tokens.set_index("step").loc[first]
    assert row.overridden and row["rank"] > 0
    top1 = df[(df.kind == "candidate") & (df.step == first) & (df["rank"] == 0)].iloc[0]
    assert top1.token_id == g[first] and top1.repeat_len >= 1


# ------------------------------------------------------------------------------------------------ mechanism view
def test_mechanism_figure_shows_loops_overrides_and_escapes_text():
    from viz.figures import figures_for
    from viz.mechanism import applicable
    from viz.momentum import momentum_figure

    lm = cycle_lm(0.7, 0.2)
    res = run(lm, prompt=" the", n=12, resistance="ngram_blocking")        # B C A B C E: loops, then an override
    assert [name for name, _ in applicable(res.frame)] == ["momentum"]
    fig = momentum_figure(res.frame, res.meta)
    names = [t.name or "" for t in fig.data]
    assert any("closes a loop" in n for n in names) and any("repeats an n-gram" in n for n in names)
    over = next(t for t in fig.data if (t.name or "").startswith("top-1 overridden"))
    assert list(over.x) == [5] and "(1 of 7 steps)" in over.name and "l = 4" in over.hovertext[0]
    nodes = next(t for t in fig.data if (t.name or "").startswith("token"))
    assert len(nodes.x) == 5                                   # B, C, A, E and the traced EOS: distinct nodes
    assert "Momentum" in figures_for(res.frame, res.meta)

    # hostile token text is escaped in labels and hovers
    script = FakeLM().vocab.index(" <script>alert(1)</script>")
    lm = FakeLM(lambda ctx: torch.nn.functional.one_hot(torch.tensor(script), 32).float() * 5)
    res = run(lm, n=4)
    fig = momentum_figure(res.frame, res.meta)
    blob = fig.to_json()
    assert "<script>" not in blob and "&lt;script&gt;" in blob


def test_mechanism_figure_needs_its_columns(fake_lm):
    from viz.momentum import momentum_figure
    greedy = run(fake_lm, "greedy", n=5)
    assert momentum_figure(greedy.frame, greedy.meta) is None
