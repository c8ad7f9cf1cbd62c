"""Run metrics. Derived metrics are functions over a trace frame, each defined in its docstring; `summarize` applies
those that fit the frame (a metric whose rows are absent is left out rather than reported as 0). What a strategy
measures itself is one dataclass per strategy family below, each metric defined in the class docstring."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import pandas as pd


def _tokens(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["kind"] == "token"]


def num_token_rows(df: pd.DataFrame) -> int:
    """Number of `token` rows: tokens emitted by the strategy over all branches (EOS included)."""
    return int((df["kind"] == "token").sum())


def mean_entropy_bits(df: pd.DataFrame) -> float:
    """Mean over `token` rows of the entropy (bits) of the model's next-token distribution at that step."""
    return float(_tokens(df)["entropy"].mean())


def mean_logprob(df: pd.DataFrame) -> float:
    """Mean over `token` rows of ln p_model(chosen token)."""
    return float(_tokens(df)["logprob"].mean())


def perplexity(df: pd.DataFrame) -> float:
    """exp(-mean_logprob): the model's perplexity on its own chosen tokens."""
    return float(math.exp(-mean_logprob(df)))


def median_step_ms(df: pd.DataFrame) -> float:
    """Median of dt_ms over `token` rows: the typical cost of one decoding step."""
    return float(_tokens(df)["dt_ms"].median())


def acceptance_rate(df: pd.DataFrame) -> float:
    """accepted / (accepted + rejected) over `accept` and `reject` rows (speculative drafts, grammar tokens...)."""
    acc = int((df["kind"] == "accept").sum())
    rej = int((df["kind"] == "reject").sum())
    return acc / (acc + rej)


def summarize(df: pd.DataFrame) -> dict:
    out: dict[str, float] = {}
    if df.empty:
        return out
    if (df["kind"] == "token").any():
        out.update(token_rows=num_token_rows(df), mean_entropy_bits=mean_entropy_bits(df),
                   mean_logprob=mean_logprob(df), perplexity=perplexity(df))
        if _tokens(df)["dt_ms"].notna().any():
            out["median_step_ms"] = median_step_ms(df)
    if df["kind"].isin(["accept", "reject"]).any():
        out["acceptance_rate"] = acceptance_rate(df)
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in out.items()}


# ------------------------------------------------------------------------------------------------ strategy metrics
@dataclass
class StrategyMetrics:
    """Base of the metrics a strategy measures itself (set on `RunContext.metrics` as the run goes). Each field is
    one metric, defined in its class's docstring; `as_dict` gives the flat JSON the run metadata carries (fields
    that were not measured, None, are left out)."""

    def as_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class SpeculativeMetrics(StrategyMetrics):
    """Draft-and-verify metrics (speculative), in the manner of vLLM's spec-decode metrics.

    drafter: the drafter's name (model key, ngram, prompt_lookup). rounds: draft-verify rounds. drafted: tokens
    proposed. accepted: proposed tokens the target accepted. acceptance_rate = accepted / drafted. alpha_hat =
    accepted / verified, where verified leaves out drafts discarded after an earlier rejection (the per-token
    acceptance of Leviathan et al.'s i.i.d. model). mean_accepted_length = emitted tokens per round (bonus and
    resampled tokens included). mean_draft_length = drafted / rounds. bonus_tokens: tokens from the target after a
    fully accepted draft. resampled_tokens: tokens drawn from the residual at a rejection. acceptance_by_position:
    draft position (1-based, as text) -> accepted / verified at that position. expected_tokens_per_round:
    (1 - alpha_hat^(gamma+1)) / (1 - alpha_hat) with gamma the rounded mean draft length. draft_forwards: forwards
    of a model drafter. spec_ms: wall time of the speculative run (prefill included). target_only_ms: wall time of
    target-only decoding of the same number of tokens, measured in the same run. speedup = target_only_ms /
    spec_ms. acceptance_predictor (adaptive = specdec only): what predicted each drafted token's acceptance for
    the stop rule, "trained head" (SpecDec++'s acceptance head of the target/draft pair) or "draft confidence"
    (the draft's own probability of the token, when the pair has no trained head)."""

    drafter: str | None = None
    rounds: int | None = None
    drafted: int | None = None
    accepted: int | None = None
    acceptance_rate: float | None = None
    alpha_hat: float | None = None
    mean_accepted_length: float | None = None
    mean_draft_length: float | None = None
    bonus_tokens: int | None = None
    resampled_tokens: int | None = None
    acceptance_by_position: dict | None = None
    expected_tokens_per_round: float | None = None
    draft_forwards: int | None = None
    spec_ms: float | None = None
    target_only_ms: float | None = None
    speedup: float | None = None
    acceptance_predictor: str | None = None


@dataclass
class SwitchingMetrics(StrategyMetrics):
    """Model-switching metrics (ead).

    large_fraction f_L = large_tokens / (large_tokens + small_tokens): the share of tokens the large model produced.
    switches: hand-overs between the models. catch_up_tokens: generated tokens a model was fed besides the latest
    one when it became active again. param_ratio = P_S / P_L (parameter counts, tied weights once). compute_ratio
    C / C_L = f_L + (1 - f_L) P_S / P_L (only the active model charged, catch-up ignored, as the paper).
    compute_saved = 1 - compute_ratio. measured_step_ratio: mean forward time of the small model / of the large
    one in this run."""

    large_fraction: float | None = None
    large_tokens: int | None = None
    small_tokens: int | None = None
    switches: int | None = None
    catch_up_tokens: int | None = None
    param_ratio: float | None = None
    compute_ratio: float | None = None
    compute_saved: float | None = None
    measured_step_ratio: float | None = None


@dataclass
class ContrastMetrics(StrategyMetrics):
    """Contrast metrics (contrastive, uscd).

    flips: steps whose chosen token differs from the plain model's argmax. flip_fraction = flips / steps.
    mean_head_size (contrastive): mean size of the plausible set V_head. contrast_steps (uscd): steps where the
    uncertainty gate applied the contrast; contrast_fraction = contrast_steps / steps. lame_prompt_tokens (uscd):
    tokens of the lame prompt; lame_same_as_prompt: the lame prompt equals the prompt (uscd is then plain decoding)."""

    flips: int | None = None
    flip_fraction: float | None = None
    mean_head_size: float | None = None
    contrast_steps: int | None = None
    contrast_fraction: float | None = None
    lame_prompt_tokens: int | None = None
    lame_same_as_prompt: bool | None = None


@dataclass
class GrammarMetrics(StrategyMetrics):
    """Grammar-constrained sampling metrics (gcd, asap).

    grammar: the built-in grammar's name, or custom. samples: samples drawn. complete_rate: share of samples that
    ended in EOS inside the grammar within the token budget. trie_nodes: prefixes in the sample trie. kl_exact: the
    target Q was enumerated exactly (else the explored-support approximation). kl: KL(empirical of the complete
    samples || Q) in nats after all samples; kl_window: the same over the last quarter of the samples. efg_root
    (asap): the estimate EFG~(root) of the probability that an unconstrained sample is grammatical. z (exact mode):
    the exact sum of P(w) over the language. kl_gcd_limit (exact mode): KL(GCD's sampling distribution || Q), where
    GCD's KL converges to. median_mask_ms: median time to fill the grammar mask for one token."""

    grammar: str | None = None
    samples: int | None = None
    complete_rate: float | None = None
    trie_nodes: int | None = None
    kl_exact: bool | None = None
    kl: float | None = None
    kl_window: float | None = None
    efg_root: float | None = None
    z: float | None = None
    kl_gcd_limit: float | None = None
    median_mask_ms: float | None = None


@dataclass
class SuperposedMetrics(StrategyMetrics):
    """Superposed-decoding metrics.

    drafts: k, the drafts decoded together. forwards: model forwards (one per step for all drafts). fallback_steps:
    steps where some kept draft took the no-n-gram-hit penalty path. finished_drafts: drafts that ended in EOS and
    were pooled. ngram_corpus / ngram_tokens / ngram_cached: the n-gram corpus used, its size in tokens, whether its
    tokenized form came from the cache."""

    drafts: int | None = None
    forwards: int | None = None
    fallback_steps: int | None = None
    finished_drafts: int | None = None
    ngram_corpus: str | None = None
    ngram_tokens: int | None = None
    ngram_cached: bool | None = None


@dataclass
class TreeMetrics(StrategyMetrics):
    """Draft-tree metrics (spec_tree).

    drafter: the drafter's name. rounds: draft-verify rounds. target_forwards: target forwards of the decoding
    (prefill excluded; one per round). tree_nodes_mean: drafted nodes per round (root excluded). drafted: drafted
    nodes in all. accepted: drafted tokens emitted. acceptance_rate = accepted / drafted. mean_accepted_length =
    emitted tokens per target forward (the bonus or resampled token included). acceptance_by_depth: depth d (as
    text) -> rounds whose accepted path reached depth d / rounds whose path reached depth d-1 and that drafted a
    node at depth d. node_efficiency = (mean_accepted_length - 1) / tree_nodes_mean: accepted tokens per drafted
    node. expected_accepted_length: 1 + the mean over rounds of the sum over drafted nodes of exp(cum ln q), the
    length the drafter's own probabilities predict (model drafter only; model-free drafts have no probabilities).
    spec_ms / target_only_ms / speedup: as SpeculativeMetrics, measured in the same run. table_coverage: rows of a
    table-based drafter's table ever filled (token_recycling). target_exact: False for Medusa's typical
    acceptance (verify=typical, lossy), True for every exact verifier."""

    drafter: str | None = None
    rounds: int | None = None
    target_forwards: int | None = None
    tree_nodes_mean: float | None = None
    drafted: int | None = None
    accepted: int | None = None
    acceptance_rate: float | None = None
    mean_accepted_length: float | None = None
    acceptance_by_depth: dict | None = None
    node_efficiency: float | None = None
    expected_accepted_length: float | None = None
    spec_ms: float | None = None
    target_only_ms: float | None = None
    speedup: float | None = None
    table_coverage: int | None = None
    target_exact: bool | None = None


@dataclass
class UncertaintyMetrics(StrategyMetrics):
    """Uncertainty-guided decoding metrics (cautious, adadec).

    decisions: steps where the entropy gate was read (one per emitted token for adadec; for cautious the tokens of
    a kept trial after its first are not decisions). interventions: decisions where the gate fired (cautious:
    N > 1 trials; adadec: a pause with a lookahead rerank). intervention_rate = interventions / decisions.
    mean_trials (cautious): mean N over the interventions. trial_tokens (cautious): tokens sampled in all trials.
    flips (adadec): pauses whose chosen token differs from the greedy top-1; flip_fraction = flips / decisions.
    forwards: model forwards after the prefill; forward_tokens: token positions those forwards computed (rows x
    new positions, junk rows of a finished trial included). forward_tokens_per_token = forward_tokens / emitted
    tokens (plain decoding: 1); extra_forwards_per_token = (forwards - emitted tokens) / emitted tokens (plain
    decoding: about 0)."""

    decisions: int | None = None
    interventions: int | None = None
    intervention_rate: float | None = None
    mean_trials: float | None = None
    trial_tokens: int | None = None
    flips: int | None = None
    flip_fraction: float | None = None
    forwards: int | None = None
    forward_tokens: int | None = None
    forward_tokens_per_token: float | None = None
    extra_forwards_per_token: float | None = None
