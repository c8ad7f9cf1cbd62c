"""Issue 20: the reference implementations' settings, pinned exactly (fake model or the reference's own code
re-stated). One test (or two) per item:
1. USCD `lame_padding=eos`: the lame row reads the lame prompt, then EOS tokens up to the standard prompt's length,
   all attended (the reference's padding="max_length", pad = EOS, no mask); every step re-derived unbatched.
2. USCD lame prompts: the derivation agrees exactly with the reference's own HumanEval lame prompts
   (tests/data/uscd/human_eval_neg.jsonl, alphadl/CodeGen-USCD@bcad9d40) on at least 103 of the 164 problems.
3. Contrastive decoding `amateur_context=last_token` (--ignore_prefix yes): the amateur sees the prompt's last token
   and the generation only, as a fresh sequence; `warp=expert`: the reference's sampling scores, against
   transformers' own TopP / Temperature warpers.
4. Superposed decoding: a top-n token ~104 nats below the best (logits / temperature) has p~ = 0 in the reference's
   float32 full-vocabulary softmax and is excluded (-inf); `float32_exclusion=False` keeps it finite.
5. Mirostat `v1_rule=figure`: k, mu's start and its clamp as the paper's figure notebook computes them.
6. Speculative prompt lookup: the drafter equals transformers' PromptLookupCandidateGenerator (n-gram size 2, cut
   before EOS) on random sequences; the defaults are transformers'.
7. bench/momentum.py rep-n counts n-grams as SimCTG's `eval_text`; the grammar KL curve's `kl_fixed` is the
   reference plot's fixed window (transformers-GAD scripts/plot/plot.py); the USCD gate's (V-1) is pinned in
   tests/test_uscd.py::test_threshold_mapping_to_reference_std.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from declab.run import Run, RunRequest
from tests.fake import FakeLM, drafted_logits, hashed_logits, no_eos
from tests.test_uscd import Recorder, context_logits

DATA = Path(__file__).parent / "data" / "uscd" / "human_eval_neg.jsonl"


def tokens(res):
    return res.frame[res.frame.kind == "token"].reset_index(drop=True)




# ------------------------------------------------------------------------------------------------ 1. USCD lame row
@pytest.mark.parametrize("lame", [" a dog", " the cat sat\n on the mat and the dog and a bird"])
def test_uscd_eos_padding_is_the_references_lame_row(fake_registry, lame):
    V = len(FakeLM().vocab)
    lm = FakeLM(context_logits(V))
    prompt = " the cat sat\n on the mat and the dog"
    res = Run(lm, RunRequest(model=lm.key, strategy="uscd", prompt=prompt, lame_prompt=lame, max_new_tokens=12,
                             params={"temperature": 0.0, "threshold": 0.5, "lame_padding": "eos"})).run_to_end()
    std, lame_ids = lm.encode_prompt(prompt, "raw"), lm.encode_prompt(lame, "raw")
    a = len(std)
    row = lame_ids[:a] + [0] * (a - len(lame_ids))          # cut / right-padded with EOS (id 0) to the std length
    gen, ref = [], []
    for _ in range(12):                                     # unbatched, no cache: the reference's two contexts
        ps = lm.logits_fn(std + gen).double().softmax(-1)
        pl = lm.logits_fn(row + gen).double().softmax(-1)
        mix = ps - 0.7 * pl
        keep = (ps >= 0.6667 / V) & (mix > 0)
        if float((ps * ps).sum()) <= 0.5 and keep.any():
            scores = torch.where(keep, mix.clamp_min(1e-300).log(), torch.tensor(-math.inf, dtype=torch.float64))
        else:
            scores = ps.log()
        ref.append((int(scores.argmax()), float(pl[int(scores.argmax())])))
        gen.append(ref[-1][0])
    t = tokens(res)
    assert t.token_id.tolist() == [r[0] for r in ref]
    assert t.p_lame.tolist() == pytest.approx([r[1] for r in ref], abs=1e-6)
    masked = Run(lm, RunRequest(model=lm.key, strategy="uscd", prompt=prompt, lame_prompt=lame, max_new_tokens=12,
                                params={"temperature": 0.0, "threshold": 0.5})).run_to_end()
    assert tokens(masked).p_lame.tolist() != pytest.approx(t.p_lame.tolist(), abs=1e-6)   # the rows differ


# ------------------------------------------------------------------------------------------------ 2. lame prompts
def test_lame_prompt_agreement_with_the_references_humaneval_lame_prompts():
    from declab.sweep.code import problems
    from strategies.uscd import lame_prompt
    ref = {r["task_id"]: r["prompt"] for r in map(json.loads, DATA.read_text(encoding="utf-8").splitlines())}
    probs = problems()
    assert len(ref) == len(probs) == 164
    agree = sum(lame_prompt(p["prompt"]).strip() == ref[t].strip() for t, p in probs.items())
    assert agree >= 103, agree                   # 77 before issue 20; the rest are hand-deleted explanatory lines


# ------------------------------------------------------------------------------------------------ 3. CD


def test_cd_last_token_amateur_sees_only_the_last_prompt_token_and_the_generation(fake_registry):
    V = len(FakeLM().vocab)
    expert = FakeLM(no_eos(hashed_logits(V), -30.0))
    rec = Recorder(no_eos(drafted_logits(V, 1.5), -30.0))
    amateur = FakeLM(rec, key="fake-draft")
    prompt = " the cat sat on the mat"
    res = Run(expert, RunRequest(model=expert.key, strategy="contrastive", prompt=prompt, max_new_tokens=10,
                                 params={"amateur_context": "last_token"}), models={"amateur": amateur}).run_to_end()
    ids = expert.encode_prompt(prompt, "raw")
    gen = tokens(res).token_id.tolist()
    # the amateur's contexts, step by step: [last prompt token] + what was generated so far
    assert rec.contexts == [ids[-1:] + gen[:i] for i in range(len(gen))]
    # and the CD scores follow from those contexts (no-cache re-derivation)
    for i, row in tokens(res).iterrows():
        lpe = expert.logits_fn(ids + gen[:i]).double().log_softmax(-1)
        lpa = (rec.fn(ids[-1:] + gen[:i]).double() / 0.5).log_softmax(-1)
        head = lpe >= lpe.max() + math.log(0.1)
        s = torch.where(head, lpe - lpa, torch.tensor(-math.inf, dtype=torch.float64))
        assert row.token_id == int(s.argmax()) and row.score == pytest.approx(float(s.max()), abs=1e-4)


def test_cd_expert_warp_equals_the_references_warpers():
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper
    from strategies.contrastive import reference_warp
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        le, la = torch.randn(64, generator=g) * 3, torch.randn(64, generator=g) * 3
        lpe = le.log_softmax(-1)
        head = lpe >= lpe.max() + math.log(0.1)
        T, p = 0.7, 0.8
        # the reference: EntrPLogitsWarper (log_softmax, -inf below max + ln 0.1), TopP, Temperature on the expert;
        # then minus st_coef * the amateur's logits / student temperature
        x = lpe.masked_fill(~head, -math.inf)[None]
        x = TemperatureLogitsWarper(T)(None, TopPLogitsWarper(p)(None, x))[0]
        expected = (x - la / 0.5).softmax(-1)
        got = reference_warp(lpe, -(la / 0.5).log_softmax(-1), head, T, p).softmax(-1)
        assert torch.allclose(got, expected, atol=1e-6)


# ------------------------------------------------------------------------------------------------ 4. superposed
def test_superposed_excludes_a_top_token_that_underflows_in_float32(fake_registry):
    V = len(FakeLM().vocab)

    def peaked(context):
        out = torch.full((V,), -50.0)
        out[5], out[6], out[7] = 10.0, 10.0 - 5.0, 10.0 - 8.0   # / 0.06: 83 nats (p > 0) and 133 nats (p = 0) down
        out[8 + len(context) % 5] = 1.0
        out[0] = -1e4
        return out

    lm = FakeLM(peaked)
    logits = peaked([1, 2])
    p32 = torch.softmax(logits.float() / 0.06, -1)
    assert p32[6] > 0 and p32[7] == 0                                # what the reference's softmax gives
    frames = {}
    for excl in (True, False):
        res = Run(lm, RunRequest(model=lm.key, strategy="superposed", prompt=" the cat", max_new_tokens=2,
                                 params={"alpha": 0.0, "float32_exclusion": excl})).run_to_end()
        frames[excl] = tokens(res)
    first = {e: f[f.step == 0].set_index("token_id") for e, f in frames.items()}
    assert math.isfinite(first[True].loc[6, "ln_ptilde"])
    assert first[True].loc[7, "ln_ptilde"] is None or first[True].loc[7, "ln_ptilde"] == -math.inf \
        or math.isnan(first[True].loc[7, "ln_ptilde"])
    assert first[False].loc[7, "ln_ptilde"] == pytest.approx(-8.0 / 0.06 - math.log1p(math.exp(-5 / 0.06)), abs=1e-3)


# ------------------------------------------------------------------------------------------------ 5. mirostat
def _notebook_estimate_s(prob):                       # Mirostat_sampling_experiments.ipynb, cell 4, verbatim logic
    num = den = 0.0
    for i in range(min(len(prob) - 1, 3000)):
        b = prob[i] / prob[i + 1]
        t = (i + 2) / (i + 1)
        num += math.log(b) * math.log(t)
        den += math.log(t) ** 2
    return num / den


def _notebook_compute_k(n, s, tau):
    eps = s - 1
    return round(((eps * (2 ** tau)) / (1 - n ** (-eps))) ** (1 / s))


def test_mirostat_figure_rule_is_the_notebooks():
    from strategies.mirostat import Controller, MirostatConfig
    V = 2000
    g = torch.Generator().manual_seed(0)
    cfg = MirostatConfig(version=1, tau=3.0, eta=1.0, v1_rule="figure")
    ctrl = Controller(cfg, V, g)
    assert ctrl.mu == pytest.approx(1.7 * 3.0)                        # max_surprise = 1.7 * target_surprise
    for step in range(30):
        logits = torch.randn(V, generator=torch.Generator().manual_seed(step), dtype=torch.float64) * 2.5
        prob = torch.sort(logits.softmax(-1), descending=True).values.tolist()
        mu = ctrl.mu
        k_expected = max(_notebook_compute_k(V, _notebook_estimate_s(prob[0:100]), mu), 1)
        choice = ctrl.apply(logits.float(), step)
        ctrl.accept(choice.token)
        assert choice.columns["k"] == min(k_expected, V)
        assert choice.columns["s_hat"] == pytest.approx(_notebook_estimate_s(prob[0:100]), rel=1e-5)
        assert ctrl.mu == pytest.approx(max(mu - (choice.columns["surprise"] - 3.0), 0.0))
    # the clamp: a surprise far above tau drives mu below 0 without it
    hot = Controller(MirostatConfig(version=1, tau=0.01, eta=10.0, v1_rule="figure"), V, g)
    hot.accept(hot.apply(torch.zeros(V), 0).token)
    assert hot.mu == 0.0
    script = Controller(MirostatConfig(version=1, tau=0.01, eta=10.0), V, g)
    script.accept(script.apply(torch.zeros(V), 0).token)
    assert script.mu < 0


# ------------------------------------------------------------------------------------------------ 6. prompt lookup
def test_prompt_lookup_equals_transformers_prompt_lookup():
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator
    from strategies.speculative import PromptLookupDrafter, SpeculativeConfig
    cfg = SpeculativeConfig()
    assert cfg.ngram_size == 2 and cfg.prompt_lookup_eos == "cut"  # transformers' max_matching_ngram_size, EOS cut
    rng = random.Random(0)
    for gamma in (1, 3, 5):
        ours = PromptLookupDrafter(cfg.ngram_size, {0}, cut_at_eos=True)
        hf = PromptLookupCandidateGenerator(eos_token_id=torch.tensor([0]), num_output_tokens=gamma,
                                            max_matching_ngram_size=cfg.ngram_size, max_length=10_000)
        for _ in range(300):
            seq = [rng.randrange(6) for _ in range(rng.randrange(2, 24))]
            cand, _ = hf.get_candidates(torch.tensor([seq]))
            expected = cand[0, len(seq):].tolist()
            got = [p.token for p in ours.propose(seq, gamma, lambda c: True)[0]]
            assert got == expected, seq


# ------------------------------------------------------------------------------------------------ 7. metrics
def _simctg_eval_text(text, ngram):                 # yxuansu/SimCTG simctg/evaluation.py, verbatim logic
    token_list = text.strip().split()
    start_idx, end_idx = 0, ngram
    total_num = 0
    ngram_set = set()
    while end_idx < len(token_list):
        ngram_set.add(" ".join(token_list[start_idx:end_idx]))
        total_num += 1
        start_idx += 1
        end_idx += 1
    return len(ngram_set), total_num


def test_momentum_bench_rep_n_counts_as_simctg():
    from bench.momentum import rep_n
    rng = random.Random(1)
    for _ in range(50):
        texts = [" ".join(rng.choice("a b c d e".split()) for _ in range(rng.randrange(3, 30))) for _ in range(4)]
        for n in (2, 3, 4):
            uniq = tot = 0
            for t in texts:
                u, c = _simctg_eval_text(t, n)
                uniq, tot = uniq + u, tot + c
            assert rep_n(texts, n) == pytest.approx(100 * (1 - uniq / tot) if tot else 0.0)


def test_grammar_kl_fixed_window_is_the_reference_plot():
    from strategies.grammar.kl_curves import kl_curve
    rng = random.Random(2)
    keys = [rng.choice("abcd") for _ in range(41)]
    target = {"a": 0.4, "b": 0.3, "c": 0.2, "d": 0.1}
    rows = {r["samples"]: r for r in kl_curve(keys, target, list(range(1, 42)))}
    # transformers-GAD scripts/plot/plot.py count_appearance_all: interval = N // 4; point i = KL of the counts in
    # tokens_history[i + interval] - tokens_history[i] (answers i+1 .. i+interval) against the target
    interval = len(keys) // 4
    history, counts = [], {k: 0 for k in target}
    for k in keys:
        counts[k] += 1
        history.append(dict(counts))
    for i in range(len(keys) - interval):
        c = {k: history[i + interval][k] - history[i][k] for k in target}
        tot = sum(c.values())
        ref = sum(v / tot * math.log(v / tot / target[k]) for k, v in c.items() if v)
        assert rows[i + interval + 1]["kl_fixed"] == pytest.approx(ref, abs=1e-12)
    assert all(math.isnan(rows[n]["kl_fixed"]) for n in range(1, interval + 1))


# ------------------------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize("strategy,setting,bad", [
    ("uscd", "lame_padding=eos", "lame_padding=left"),
    ("contrastive", "amateur_context=last_token", "amateur_context=prefix"),
    ("superposed", "float32_exclusion=false", "float32_exclusion=maybe"),
    ("mirostat", "v1_rule=figure", "v1_rule=paper"),
    ("speculative", "prompt_lookup_eos=keep", "prompt_lookup_eos=drop"),
])
def test_cli_takes_the_reference_settings_and_names_the_legal_values(fake_registry, tmp_path, capsys, strategy,
                                                                     setting, bad):
    from declab.cli import main as cli_main
    extra = ["--set", "draft=prompt_lookup", "--set", "measure_speedup=false"] if strategy == "speculative" else []
    extra += ["--set", "alpha=0"] if strategy == "superposed" else []
    args = ["run", "--model", "fake", "--strategy", strategy, "--prompt", " the cat sat on the mat", "--max-new-tokens",
            "4", "--quiet", *extra]
    assert cli_main(args + ["--set", setting, "--csv", str(tmp_path / "r.csv")]) == 0
    meta = json.loads((tmp_path / "r.meta.json").read_text())
    key, value = setting.split("=")
    assert str(meta["params"][key]).lower() == value
    capsys.readouterr()
    assert cli_main(args + ["--set", bad]) == 2
    err = capsys.readouterr().err
    assert key in err and len(err.strip().splitlines()) == 1
