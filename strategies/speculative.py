"""Speculative decoding / sampling: a cheap drafter proposes tokens, the target verifies them all in one forward.

Papers: Leviathan, Kalman, Matias, "Fast Inference from Transformers via Speculative Decoding" (ICML 2023,
arXiv 2211.17192); Chen et al., "Accelerating Large Language Model Decoding with Speculative Sampling"
(arXiv 2302.01318). Adaptive draft length: transformers' assisted generation (`num_assistant_tokens_schedule=
"heuristic"`, `assistant_confidence_threshold`, after DISCO arXiv 2405.04304) and SpecDec++ (Huang et al.,
arXiv 2405.19715). Model-free drafters: prompt lookup decoding (Saxena 2023; transformers'
`prompt_lookup_num_tokens`) and an ADED-style tri-gram table (Liu et al., "Adaptive Draft-Verification for
Efficient Large Language Model Decoding", arXiv 2407.12021). Spec: docs/strategies.md#speculative.

One round (docs/strategies.md#speculative):
    draft gamma tokens x~_i ~ q_i (q after the same temperature / top-k / top-p warpers as the target)
    one target forward over [last token, x~_1..x~_gamma] -> p_1..p_{gamma+1} (warped the same way)
    accept x~_i with probability min(1, p_i(x~_i) / q_i(x~_i)); at the first rejection emit t ~ norm(max(0, p_i - q_i))
    if all are accepted, emit the bonus token t ~ p_{gamma+1} (none when the accepted draft ends in EOS)
    both caches are cropped to the accepted prefix (lazily, at their next forward)
temperature = 0 is the greedy variant: accept while argmax p_i == x~_i, then emit argmax p_i; the output equals
target greedy decoding token for token (in float32). The output distribution of the sampling variant is exactly
the warped target distribution, whatever the drafter.

Paper / reference symbol -> config field:
    gamma (Leviathan; HF num_assistant_tokens)       -> num_draft_tokens (fixed length, or the heuristic's start)
    K_max (SpecDec++)                                 -> max_draft_tokens (cap of every adaptive rule)
    HF schedule "heuristic" (+2 all accepted, else -1) -> adaptive = heuristic
    assistant_confidence_threshold (HF 0.4, DISCO; Kangaroo eta) -> adaptive = confidence, confidence_threshold
    SpecDec++ stop rule 1 - prod_j a_j > h            -> adaptive = specdec, h (`stop_threshold` in the code)
    SpecDec++ bound [K_min, K_max]                    -> [SPECDEC_MIN_DRAFT = 2, max_draft_tokens]
    SpecDec++ a_j (acceptance-prediction head)        -> the trained head (declab/models/acceptance.py), else the
        draft's confidence
    warpers (temperature, top-k, top-p)              -> temperature, top_k, top_p (applied to p and q alike)
    drafter                                           -> draft: `model` (the second model: for the embedded default
        the distilled draft `smollm2-135m-draft`), a models.yaml key, `ngram` (ADED-style tri-gram table),
        `prompt_lookup`, or the target's trained drafters `medusa`, `hydra`, `eagle`, `kangaroo` (issue 18): those
        run as spec_tree's chain (branching 1, tree_budget = tree_depth = gamma; strategies/spec_tree.py), whose
        trace and metrics (TreeMetrics) they report

Deviations, each on purpose:
* SpecDec++ (adaptive = specdec; Huang et al., "SpecDec++: Boosting Speculative Decoding via Adaptive Candidate
  Lengths", arXiv 2405.19715, code Kaffaljidhmah2/SpecDec_pp). With a model drafter for which a trained acceptance
  head exists (the embedded pair: declab/models/heads/smollm2-135m/acceptance-smollm2-135m-draft.safetensors, built
  by tools/heads_acceptance.py; the target LM hands it out, `acceptance_head(draft)`), a_j is the head's P(accept)
  of drafted token j, read from the draft's post-norm state after it read that token (the draft forwards ask for
  hidden states). The paper's rule (hf_generation.py,
  schedule 'ada'): after draft forward j (which read token j-1 and drew token j), stop when
  1 - prod_{i<j} a_i > h, within the bound [K_min = 2, K_max = max_draft_tokens]; forward 1 read only verified
  tokens and adds no factor. Token j is still proposed, so the last drafted token of a round has no prediction
  (its `confidence` is empty). The head was trained on T = 1 labels min(1, p/q) with weight_mismatch 6, so its
  probabilities sit below the true acceptance (see tools/heads_acceptance.py); h is applied to them as they are,
  as in the paper. Without a head (model-free drafters, other drafts, the fake test models) a_j is the draft's
  own probability of the token it drafted (its confidence), a training-free proxy, and the round stops right
  after the token that pushes 1 - prod_{i<=j} a_i over h (no K_min). `metrics.acceptance_predictor` says which
  ran ("trained head" | "draft confidence").
* The confidence rule follows transformers' stop rule: a token whose draft probability is below the threshold is
  still proposed, and drafting stops after it. The threshold stays fixed: transformers (when scikit-learn is
  installed, which it is not in this lab's environment) also re-tunes it online after every round, to the ROC
  threshold that minimises fpr + 3 fnr over all drafted tokens so far (draft probability vs accepted), once more
  than 5 are seen with both outcomes (`AssistedCandidateGenerator.update_candidate_strategy`). Left out on
  purpose: a fixed threshold is the rule the mechanism view can show, and the re-tuned one is a moving target.
* ADED's table is built from the prompt and every emitted (target-verified) token, with bigram back-off; ADED's
  MCTS draft search and its corpus-level table are left out. Drafts follow the most frequent continuation (the most
  recent on ties). Prompt lookup follows transformers' PromptLookupCandidateGenerator: the longest trailing n-gram
  (n = ngram_size .. 1, default 2 as transformers' max_matching_ngram_size) found earlier in the context, first
  match, and the tokens that followed it, cut before the first EOS (`prompt_lookup_eos = cut`, transformers; `keep`
  drafts the EOS as well). transformers' check of the copied tokens against its logits processors is not needed
  here (no processors).
* Model-free drafters are deterministic, so q is a point mass on the drafted token: accept with probability
  p(x~), resample from p without x~ (renormalised) on rejection. This is exact speculative sampling for that q.

Trace, per round r (`round` column), with `draft_pos` i = 1..gamma:
* `propose` rows: the drafted token, `q` (its warped draft probability), the draft's unwarped `logprob` and
  `entropy`, `confidence` (the drafter's probability of the token; with adaptive = specdec and a trained head, the
  head's predicted acceptance a_j instead, empty for a round's last token), `draft_ms`, `gamma` (draft length
  allowed this round), model = the drafter;
* one `accept` / `reject` row per drafted token: `p` and `q` (warped), `accept_prob` = min(1, p/q), `u` (the
  uniform draw), `verdict` accepted | rejected (failed the test) | discarded (after an earlier rejection), the
  target's unwarped `logprob` / `entropy`; `verify_ms` on the round's first row. In greedy mode (temperature 0)
  `p` and `q` are the two models' unwarped probabilities of the drafted token, `accept_prob` is 1 (argmax match)
  or 0, and there is no `u`;
* one `token` row per emitted token with `origin` accepted | resampled (drawn from the residual at the first
  rejection; in greedy mode the target's argmax there) | bonus, the target's logprob and entropy.
`step` is the index of the generated token the row is about (drafted tokens: the position they would take).

Metrics (run `metrics`): acceptance_rate = accepted / drafted; alpha_hat = accepted / verified (discarded drafts
left out: the per-token acceptance of the i.i.d. model); mean_accepted_length = emitted tokens per round (bonus /
resampled included); acceptance_by_position; rounds; expected tokens per round from alpha_hat;
acceptance_predictor (adaptive = specdec: "trained head" or "draft confidence"); with
`measure_speedup`, target-only decoding of the same number of tokens is timed in the same run and
speedup = target-only time / speculative time (prefill included in both).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import torch

from declab.core.errors import UserError
from declab.core.sampling import draw_from, entropy_bits
from declab.core import (Config, ModelNeed, Needs, Progress, RunContext, RunGen, Sequence, Strategy, param,
                         register)
from declab.core.metrics import SpeculativeMetrics
from strategies.head_drafters import HEAD_DRAFTERS
from strategies.spec_tree import SpecTree, SpecTreeConfig
from strategies.two_model import (DRAFTER_ADVICE, ModelDrafter, ModelState, Proposal, expected_tokens_per_round,
                                  named_model, probs, record_speedup, speculative_step)

MODEL_FREE = ("ngram", "prompt_lookup")
TRAINED = HEAD_DRAFTERS + ("kangaroo",)   # the target's trained drafters: a chain of spec_tree (branching 1)
ADAPTIVE = ("off", "heuristic", "confidence", "specdec")
SPECDEC_MIN_DRAFT = 2          # K_min of SpecDec++'s bound (README: --bound 2 20); K_max = max_draft_tokens
PREDICTORS = ("trained head", "draft confidence")


@dataclass(frozen=True)
class SpeculativeConfig(Config):
    draft: str = param("model", help="Drafter: 'model' (the second model beside the model, e.g. the embedded "
                                     "default's distilled draft), a models.yaml key, 'ngram' (ADED-style tri-gram "
                                     "table), 'prompt_lookup', or the target's trained drafters 'medusa', 'hydra', "
                                     "'eagle', 'kangaroo' (run as spec_tree's chain, branching 1).")
    num_draft_tokens: int = param(4, lo=1, hi=64, help="gamma: tokens drafted per round (the start value of the "
                                                       "heuristic schedule).")
    adaptive: str = param("off", choices=ADAPTIVE,
                          help="Draft length rule: off (fixed gamma), heuristic (HF: +2 when all accepted, else -1), "
                               "confidence (stop after a draft token with probability < confidence_threshold), "
                               "specdec (SpecDec++: stop when 1 - prod of draft confidences > h).")
    max_draft_tokens: int = param(12, lo=1, hi=64, help="K_max: the most tokens any adaptive rule drafts per round.")
    confidence_threshold: float = param(0.4, lo=0.0, hi=1.0, help="adaptive=confidence: stop drafting after a token "
                                                                  "the drafter gave less than this (HF default 0.4).")
    h: float = param(0.7, lo=0.0, hi=1.0, lo_open=True,
                     help="adaptive=specdec: stop when the predicted chance of at least one rejection exceeds h "
                          "(predicted by the trained acceptance head where the pair has one, else by the draft's "
                          "confidences).")
    temperature: float = param(0.0, lo=0.0, hi=100.0, help="0 = greedy verification (output equals target greedy); "
                                                           ">0 = speculative sampling at this temperature.")
    top_k: int = param(0, lo=0, hi=1_000_000, help="Top-k warper on both p and q (0 = off).")
    top_p: float = param(1.0, lo=0.0, hi=1.0, lo_open=True, help="Top-p warper on both p and q (1 = off).")
    ngram_size: int = param(2, lo=1, hi=8, help="prompt_lookup: the longest trailing n-gram matched (transformers' "
                                               "max_matching_ngram_size default: 2).")
    prompt_lookup_eos: str = param("cut", choices=("cut", "keep"),
                                   help="prompt_lookup: cut = the copied draft ends before its first EOS (transformers'"
                                        " setting; an EOS-only draft drafts nothing); keep = draft up to and including "
                                        "the EOS.")
    measure_speedup: bool = param(True, help="After the run, time target-only decoding of the same length and report "
                                             "the speedup (adds that run's time).")

    def check(self) -> None:
        if not self.draft.strip():
            raise UserError("speculative: draft must be 'model', a model key, 'ngram' or 'prompt_lookup', got ''")
        if self.draft.strip() in TRAINED and self.adaptive not in ("off", "confidence"):
            raise UserError(f"speculative: draft={self.draft.strip()} drafts a fixed-length chain (adaptive=off) or, "
                            f"for kangaroo, stops on its confidence (adaptive=confidence); got adaptive="
                            f"{self.adaptive}")

    def chain(self) -> SpecTreeConfig:
        """draft = a trained drafter (medusa, hydra, eagle, kangaroo): the same run as spec_tree with branching 1,
        gamma = num_draft_tokens (adaptive=confidence: max_draft_tokens and Kangaroo's eta = confidence_threshold;
        otherwise Kangaroo keeps its own eta 0.6)."""
        gamma = min(self.max_draft_tokens if self.adaptive == "confidence" else self.num_draft_tokens, 32)
        eta = self.confidence_threshold if self.adaptive == "confidence" else SpecTreeConfig.confidence_threshold
        return SpecTreeConfig(drafter=self.draft.strip(), tree_budget=gamma, tree_depth=gamma, branching=1,
                              temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              confidence_threshold=eta, measure_speedup=self.measure_speedup)


# ------------------------------------------------------------------------------------------------ drafters
class PromptLookupDrafter:
    """Copy the continuation of the latest trailing n-gram's first earlier occurrence (transformers' prompt lookup)."""

    name = "prompt_lookup"

    def __init__(self, ngram_size: int, eos_ids, cut_at_eos: bool = False):
        self.ngram_size, self.eos_ids, self.cut_at_eos = ngram_size, eos_ids, cut_at_eos

    def propose(self, seq: list[int], gamma: int, keep_going) -> tuple[list[Proposal], int]:
        for n in range(min(self.ngram_size, len(seq) - 1), 0, -1):
            tail = seq[-n:]
            for start in range(0, len(seq) - n):
                if seq[start:start + n] == tail:
                    cont = seq[start + n: start + n + gamma]
                    if cont:
                        if self.cut_at_eos:
                            # transformers: chosen_ids[:first_eos]; the first match stands even if nothing is left
                            cut = next((i for i, t in enumerate(cont) if t in self.eos_ids), len(cont))
                            return _point_masses(cont[:cut], self.eos_ids), 0
                        return _point_masses(cont, self.eos_ids), 0
        return [], 0

    def observe(self, seq: list[int]) -> None:
        pass


class NgramDrafter:
    """ADED-style tri-gram table over the context, updated with every emitted token; bigram back-off."""

    name = "ngram"

    def __init__(self, eos_ids):
        self.eos_ids = eos_ids
        self.tri: dict[tuple[int, int], Counter] = defaultdict(Counter)
        self.bi: dict[int, Counter] = defaultdict(Counter)
        self.last_seen: dict[tuple, int] = {}
        self.seen = 0

    def observe(self, seq: list[int]) -> None:
        for i in range(max(self.seen, 1), len(seq)):
            b, c = seq[i - 1], seq[i]
            self.bi[b][c] += 1
            self.last_seen[(b, c)] = i
            if i >= 2:
                self.tri[(seq[i - 2], b)][c] += 1
                self.last_seen[(seq[i - 2], b, c)] = i
        self.seen = len(seq)

    def _next(self, a: int | None, b: int) -> int | None:
        if a is not None and self.tri.get((a, b)):
            table, key = self.tri[(a, b)], (a, b)
        elif self.bi.get(b):
            table, key = self.bi[b], (b,)
        else:
            return None
        return max(table, key=lambda c: (table[c], self.last_seen.get(key + (c,), -1)))

    def propose(self, seq: list[int], gamma: int, keep_going) -> tuple[list[Proposal], int]:
        self.observe(seq)
        ctx = list(seq[-2:])
        out = []
        for _ in range(gamma):
            nxt = self._next(ctx[-2] if len(ctx) > 1 else None, ctx[-1])
            if nxt is None:
                break
            out.append(nxt)
            ctx.append(nxt)
            if nxt in self.eos_ids:
                break
        return _point_masses(out, self.eos_ids), 0


def acceptance_head_for(target, draft):
    """SpecDec++'s trained acceptance head of (target, draft), asked of the target LM (`acceptance_head(draft)`,
    declab/models/lm.py, which loads declab/models/acceptance.py's file once), or None: a model without that
    method (the scripted fakes) or a pair without a trained head."""
    get = getattr(target, "acceptance_head", None)
    return get(draft) if callable(get) else None


def specdec_keep_going(a_hat: list[float], num_drafted: int, h: float, k_min: int = SPECDEC_MIN_DRAFT) -> bool:
    """SpecDec++'s rule after draft forward j = num_drafted (token j drawn): go on while j < K_min, else while the
    predicted chance of at least one rejection among the tokens the draft has read, 1 - prod(a_hat), is <= h.
    a_hat = [a_1 .. a_{j-1}]. K_max is the drafter's gamma."""
    if num_drafted < k_min:
        return True
    prod = 1.0
    for a in a_hat:
        prod *= a
    return 1.0 - prod <= h


def specdec_length(a: list[float], h: float, k_max: int, k_min: int = SPECDEC_MIN_DRAFT) -> int:
    """The draft length SpecDec++'s rule gives for acceptance predictions a_1, a_2, ... (the oracle's, when they
    are the true a_i): the first j in [K_min, K_max] with 1 - prod_{i<j} a_i > h, else K_max (K_max wins over
    K_min)."""
    for j in range(1, k_max):
        if not specdec_keep_going(list(a[:j - 1]), j, h, k_min):
            return j
    return k_max


def _point_masses(tokens: list[int], eos_ids) -> list[Proposal]:
    out = []
    for t in tokens:
        out.append(Proposal(int(t), None, 1.0, 1.0))
        if t in eos_ids:
            break
    return out


# ------------------------------------------------------------------------------------------------ strategy
@register
class Speculative(Strategy):
    name = "speculative"
    title = "Speculative decoding / sampling"
    paper = ("Leviathan et al. 2023, Fast Inference from Transformers via Speculative Decoding; Chen et al. 2023, "
             "Accelerating LLM Decoding with Speculative Sampling")
    explanation = ("A small, cheap drafter guesses the next few tokens; the big model checks all of them in one "
                   "forward pass. Each guess is kept with probability min(1, p/q) (always, when the big model agrees "
                   "in greedy mode); at the first miss the big model's own choice replaces it, and when every guess "
                   "passes it adds one more token for free. The text follows exactly the big model's distribution, "
                   "yet several tokens can come out of one expensive pass.")
    advice = DRAFTER_ADVICE
    Config = SpeculativeConfig
    deterministic = False
    roles = ("draft",)

    def needs(self, cfg: SpeculativeConfig) -> Needs:
        """A draft model (the key `draft` names, else the paired one), or none for the model-free drafters."""
        if cfg.draft.strip() in MODEL_FREE + TRAINED:
            return Needs()
        return Needs(models=(ModelNeed("draft", named_model(cfg.draft) or ""),))

    def make_drafter(self, ctx: RunContext, cfg: SpeculativeConfig):
        d = cfg.draft.strip()
        if d == "ngram":
            return NgramDrafter(ctx.lm.eos_ids)
        if d == "prompt_lookup":
            return PromptLookupDrafter(cfg.ngram_size, ctx.lm.eos_ids, cfg.prompt_lookup_eos == "cut")
        draft = ctx.model("draft")
        head = acceptance_head_for(ctx.lm, draft) if cfg.adaptive == "specdec" else None
        return ModelDrafter(draft, cfg, ctx.generator, ctx.lm.eos_ids, head=head)

    def run(self, ctx: RunContext, cfg: SpeculativeConfig) -> RunGen:
        if cfg.draft.strip() in TRAINED:                  # the target's own trained drafter: spec_tree's chain
            return (yield from SpecTree().run(ctx, cfg.chain()))
        lm, trace = ctx.lm, ctx.trace
        drafter = self.make_drafter(ctx, cfg)
        target = ModelState(lm, "target")
        greedy = cfg.temperature == 0
        seq = list(ctx.prompt_ids)
        P = len(seq)
        generated: list[int] = []
        total_logprob = 0.0
        gamma = cfg.num_draft_tokens if cfg.adaptive in ("off", "heuristic") else cfg.max_draft_tokens
        stats = {"rounds": 0, "drafted": 0, "accepted": 0, "verified": 0, "emitted": 0, "bonus": 0, "resampled": 0}
        by_pos: dict[int, list[int]] = defaultdict(lambda: [0, 0])        # draft_pos -> [accepted, drafted]
        t_start = lm.clock_ms()
        finished = False
        rnd = 0

        use_head = getattr(drafter, "head", None) is not None
        predictor = (PREDICTORS[0] if use_head else PREDICTORS[1]) if cfg.adaptive == "specdec" else None

        def keep_going(confs: list[float | None]) -> bool:
            if cfg.adaptive == "confidence":
                return confs[-1] >= cfg.confidence_threshold
            if cfg.adaptive == "specdec":
                if use_head:                                   # confs = [a_1 .. a_{n-1}, None]
                    return specdec_keep_going(confs[:-1], len(confs), cfg.h)
                prod = 1.0
                for c in confs:
                    prod *= c
                return 1.0 - prod <= cfg.h
            return True

        while not finished and len(generated) < ctx.max_new_tokens:
            remaining = ctx.max_new_tokens - len(generated)
            g_allowed = min(gamma, remaining - 1)
            step0 = len(generated)
            drafter.observe(seq)
            props, catch_up = drafter.propose(seq, g_allowed, keep_going) if g_allowed > 0 else ([], 0)
            drafts = [pr.token for pr in props]
            for i, pr in enumerate(props):
                trace.add("propose", step0 + i, branch_id=0, parent_id=0, position=P + step0 + i, token_id=pr.token,
                          token_text=lm.token_text(pr.token), logprob=pr.logprob, entropy=pr.entropy,
                          model=drafter.name, accepted=None, round=rnd, draft_pos=i + 1, q=pr.q_token,
                          confidence=pr.confidence, gamma=g_allowed, draft_ms=pr.ms,
                          catch_up=catch_up if i == 0 else None)
            # ---- verify: one target forward over [last token, drafts]
            out, _fed = target.advance(seq, extra=drafts, all_logits=True)
            logits = out.logits[0, -(len(drafts) + 1):]                                      # [g+1, V]
            logp = logits.log_softmax(-1)
            ent = entropy_bits(logp).tolist()                                                # [g+1]
            n_acc, emitted_tok, verdicts = 0, None, []
            if greedy:
                tgt = logits.argmax(-1).tolist()
                while n_acc < len(drafts) and drafts[n_acc] == tgt[n_acc]:
                    n_acc += 1
                p_x = logp[torch.arange(len(drafts)), torch.as_tensor(drafts, dtype=torch.long)].exp().tolist() \
                    if drafts else []
                for i in range(len(drafts)):
                    verdict = "accepted" if i < n_acc else "rejected" if i == n_acc else "discarded"
                    verdicts.append((verdict, None if verdict == "discarded" else float(i < n_acc), None, p_x[i]))
                emitted_tok = tgt[n_acc]
            else:
                p_rows = probs(logits, cfg.temperature, cfg.top_k, cfg.top_p)                # [g+1, V]
                rejected_at = None
                for i, pr in enumerate(props):
                    q = pr.q if pr.q is not None else _one_hot(pr.token, logits.shape[-1], logits)
                    ok, tok, u = speculative_step(p_rows[i], q, pr.token, ctx.generator)
                    p_x = float(p_rows[i][pr.token])
                    a_prob = 1.0 if pr.q_token <= 0 else min(1.0, p_x / pr.q_token)
                    verdicts.append(("accepted" if ok else "rejected", a_prob, u, p_x))
                    if not ok:
                        rejected_at, emitted_tok = i, tok
                        break
                    n_acc += 1
                for i in range(len(verdicts), len(props)):
                    verdicts.append(("discarded", None, None, float(p_rows[i][props[i].token])))
                if rejected_at is None:
                    emitted_tok = draw_from(p_rows[len(drafts)], ctx.generator)
            verify_ms = out.fwd_ms
            for i, (verdict, a_prob, u, p_x) in enumerate(verdicts):
                pr = props[i]
                trace.add("accept" if verdict == "accepted" else "reject", step0 + i, branch_id=0, parent_id=0,
                          position=P + step0 + i, token_id=pr.token, token_text=lm.token_text(pr.token),
                          logprob=float(logp[i, pr.token]), entropy=ent[i], accepted=verdict == "accepted",
                          round=rnd, draft_pos=i + 1, p=p_x, q=pr.q_token, accept_prob=a_prob, u=u, verdict=verdict,
                          verify_ms=verify_ms if i == 0 else None)
            # ---- emit: accepted drafts, then the resampled / bonus token (none after an accepted EOS)
            emit = [(d, "accepted", i) for i, d in enumerate(drafts[:n_acc])]
            if not (n_acc and drafts[n_acc - 1] in lm.eos_ids):
                emit.append((emitted_tok, "bonus" if n_acc == len(drafts) else "resampled", n_acc))
            for k, (tok, origin, i) in enumerate(emit):
                lp = float(logp[i, tok])
                trace.add("token", step0 + k, branch_id=0, parent_id=0, position=P + step0 + k, token_id=tok,
                          token_text=lm.token_text(tok), logprob=lp, entropy=ent[i], score=lp, accepted=True,
                          round=rnd, draft_pos=i + 1, origin=origin,
                          verify_ms=verify_ms if (k == 0 and not drafts) else None)
                total_logprob += lp
                if tok in lm.eos_ids:
                    finished = True
                    break
                generated.append(tok)
                seq.append(tok)
            # ---- bookkeeping
            stats["rounds"] += 1
            stats["drafted"] += len(drafts)
            stats["accepted"] += n_acc
            stats["verified"] += sum(v[0] != "discarded" for v in verdicts)
            stats["emitted"] += len(emit)
            last_origin = emit[-1][1] if emit else None
            stats["bonus"] += last_origin == "bonus"
            stats["resampled"] += last_origin == "resampled"
            for i, v in enumerate(verdicts):
                by_pos[i + 1][0] += v[0] == "accepted"
                by_pos[i + 1][1] += 1
            if cfg.adaptive == "heuristic" and drafts:
                gamma = min(cfg.max_draft_tokens, gamma + 2) if n_acc == len(drafts) else max(1, gamma - 1)
            rnd += 1
            ctx.metrics = self.metrics(stats, by_pos, drafter, predictor)
            yield Progress(max(0, len(generated) - 1), generated)
        metrics = self.metrics(stats, by_pos, drafter, predictor)
        record_speedup(ctx, metrics, stats["emitted"], lm.clock_ms() - t_start, cfg.measure_speedup)
        ctx.metrics = metrics
        return [Sequence(token_ids=list(generated), score=total_logprob)]

    @staticmethod
    def metrics(stats: dict, by_pos: dict, drafter, predictor: str | None = None) -> SpeculativeMetrics:
        drafted, rounds = stats["drafted"], max(stats["rounds"], 1)
        alpha = stats["accepted"] / stats["verified"] if stats["verified"] else None
        gamma_mean = drafted / rounds
        return SpeculativeMetrics(
            drafter=drafter.name, rounds=stats["rounds"], drafted=drafted, accepted=stats["accepted"],
            acceptance_rate=round(stats["accepted"] / drafted, 6) if drafted else None,
            alpha_hat=round(alpha, 6) if alpha is not None else None,
            mean_accepted_length=round(stats["emitted"] / rounds, 6), mean_draft_length=round(gamma_mean, 6),
            bonus_tokens=stats["bonus"], resampled_tokens=stats["resampled"],
            acceptance_by_position={str(k): round(a / n, 4) for k, (a, n) in sorted(by_pos.items()) if n},
            expected_tokens_per_round=round(expected_tokens_per_round(alpha, round(gamma_mean)), 4)
            if alpha is not None and gamma_mean else None,
            draft_forwards=drafter.state.forwards if isinstance(drafter, ModelDrafter) else None,
            acceptance_predictor=predictor)


def _one_hot(token: int, V: int, like: torch.Tensor) -> torch.Tensor:
    q = torch.zeros(V, dtype=like.dtype, device=like.device)
    q[token] = 1.0
    return q
