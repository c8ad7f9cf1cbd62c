"""Shared pieces of the grammar strategies `gcd` and `asap` (algorithms.md section 7): built-in grammars, the
xgrammar mask, the prefix trie with expected-future-grammaticality bookkeeping, the sampling loop both strategies
run, exact enumeration of small finite grammars, and the KL curves.

Grammar input, in order of precedence:
  1. the run's grammar input (`RunInputs.grammar`): EBNF/GBNF text (the CLI's `--grammar-file`, the app's editor);
  2. the config field `grammar`: the name of a built-in grammar (files in strategies/grammars/*.ebnf; default json).
The text is checked once before decoding starts (`prepare_grammar`, the strategies' `prepare` hook, which the
engine's plan runs before any model is loaded): a grammar that does not compile is a UserError with xgrammar's line
and column.

Engine: xgrammar 0.2.8 (algorithms.md 7.4). TokenizerInfo comes from the model's Hugging Face tokenizer with
vocab_size = the logits width and stop tokens = the model's EOS ids; a tokenizer that is not a Hugging Face one
(the scripted fake model) gets a RAW vocabulary made of each id's text. The compiled grammar is cached per
(tokenizer identity, logits width, EOS ids, grammar text) in a small module-level LRU (`compiled_grammar`); the
shared LM object is never written to. Each run owns its GrammarMatcher and bitmask.

The loop (`run_grammar`), per sample i = 0 .. num_samples-1, all samples one after another from one trie:
  u = root; reset the matcher
  loop (at most max_new_tokens steps, EOS included):
    if u has no cached distribution: one forward for the tokens fed since the last forward (KV cache cropped
        back to the prompt between samples), fill the mask, store the allowed ids and their
        P(t|u) = softmax(logits / temperature)[t]   (full-vocabulary softmax, unmasked: algorithms.md 7.2)
        and EFG~(u) <- sum_allowed P(t|u) * EFG~(u.t), propagated to every ancestor
    q = rule.weights(u)            gcd: P restricted to the allowed set (then top-k / top-p), renormalised
                                   asap: P(t|u) * EFG~(u.t), renormalised
    t ~ q (inverse CDF with one uniform from the run's seeded generator, the same for both strategies, so equal
        distributions give equal draws); stop at EOS; else accept t in the matcher and go to u.t
  a sample that reaches max_new_tokens without EOS, or a node with no allowed token, marks its last node dead
  (EFG~ = 0): within this token budget nothing grammatical lies below it.
EFG~ of a node is kept as mass(u) - sum over visited children c of P(c|u) * (1 - EFG~(c)), which equals
sum_allowed P(t|u) * EFG~(u.t) with EFG~ = 1 for the children never visited; it only ever decreases.
gcd keeps no distributions (every step is a forward and a mask, as plain grammar-constrained decoding); asap keeps
them (revisits read the trie, algorithms.md 7.4 "Recommendation"), evicting the least recently used ones past
TRIE_CACHE_ENTRIES allowed tokens in all (an evicted node is recomputed on its next visit; EFG~ is kept).

Exact mode (`exact_max_nodes` > 0): after sampling, if every grammatical token sequence that fits in
max_new_tokens (EOS included) lies in a trie of at most `exact_max_nodes` prefixes (checked with the matcher alone,
no model), the model scores every prefix (one batched forward per depth on a copy of the prompt's KV cache) and
the run records the exact
grammar-conditioned distribution Q(w) = P(w) 1[w in L] / Z, GCD's exact sampling distribution, and
KL(empirical || Q) against the number of samples. Otherwise it records the paper's explored-support
approximation instead (algorithms.md 7.3: the support is the distinct complete samples of this run, each
weighted by its likelihood P(w), renormalised) and says so (`exact` = False on the kl rows). Differences from the
paper's evaluation, on purpose: outcomes are token sequences (two tokenisations of one string are two outcomes,
as in Q's definition over P); the explored support is this run's own samples (the paper pools ASAp's and GCD's,
which needs two runs: put them side by side on the Compare page, or see bench/grammar.py); the empirical
distribution counts complete samples only (a sample cut by the budget is outside L and is counted in
`incomplete`).

Trace rows (besides the base columns): `token` rows per step of every sample, branch_id = parent_id = sample index,
step = position in the sample: `sample`, `allowed` (allowed-token count), `masked_mass` (1 - sum_allowed P(t|u)),
`p_gcd` (the chosen token's probability under GCD), `p_asap` (under ASAp; asap only), `efg_before`/`efg_after`
(EFG~(u) before and after this step's expansion; asap only), `efg_child` (EFG~ of the chosen child before the
draw; asap only), `cached` (the distribution came from the trie, no forward), `fwd_ms`, `mask_ms` (fill the
bitmask and list the allowed ids), `sel_ms`. `logprob`/`entropy` are the untempered model's, `score` is
ln q(token), what was actually sampled from. Up to `num_alternatives` `candidate` rows per step: the allowed
tokens with the largest q. One `finish` row per sample: `score` = ln P(w) (EOS included), `final_rank` = sample
index (samples stay in the order drawn), `complete`, `length`, `efg_root`, `trie_nodes`. After sampling: `kl` rows
(`samples` = n, `kl` = KL(empirical of the first n complete samples || target) in nats, `kl_window` = the same
over the last ceil(n/4) samples as the paper's plot, `exact`, `support`, `incomplete`), `target` rows (one per
sequence of the target: `seq` ids, `q`, `q_gcd` (exact mode), `p_w` = P(w), `count`), and `node` rows (the trie:
`node_id`, `node_parent`, `depth`, `p`, `efg` (asap), `visits`, `dead`); these three kinds have no step.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from declab.core.errors import UserError
from declab.core.metrics import GrammarMetrics
from declab.core.sampling import entropy_bits, top_k_filter, top_p_filter
from declab.core import Progress, RunContext, RunGen, RunInputs, Sequence

GRAMMAR_DIR = Path(__file__).resolve().parent / "grammars"
DEFAULT_GRAMMAR = "json"
MAX_GRAMMAR_CHARS = 100_000
MAX_SAMPLES = 5000
TRIE_CACHE_ENTRIES = 4_000_000      # allowed tokens with cached P(t|u) kept by asap (~100 MB), LRU beyond that
MAX_NODE_ROWS = 2000                # `node` rows written (breadth-first)
MAX_TARGET_ROWS = 2000              # `target` rows written (largest q first)
KL_POINTS = 200                     # `kl` rows at most (sample counts on a log/linear grid)
EXACT_BATCH = 32                    # prefixes per forward in exact mode


# ================================================================================================ built-in grammars
class _BuiltinGrammars(Mapping):
    """name -> EBNF text of strategies/grammars/*.ebnf, read on first use (nothing runs at import time)."""

    _texts: dict[str, str] | None = None

    def _load(self) -> dict[str, str]:
        if self._texts is None:
            order = BUILTIN_NAMES
            files = {p.stem: p for p in GRAMMAR_DIR.glob("*.ebnf")}
            names = [n for n in order if n in files] + sorted(set(files) - set(order))
            self._texts = {n: files[n].read_text(encoding="utf-8") for n in names}
        return self._texts

    def __getitem__(self, name: str) -> str:
        return self._load()[name]

    def __iter__(self):
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())


BUILTIN_NAMES = ("binary_len_3", "binary_len_5", "arithmetic", "json", "sql_select", "sygus_string")
BUILTIN_GRAMMARS = _BuiltinGrammars()


def resolve_grammar(cfg, text: str | None) -> tuple[str, str]:
    """(label, text): the grammar text given (label: the built-in it equals, else 'custom'), else the built-in
    named by cfg.grammar."""
    if text is not None:
        if not isinstance(text, str):
            raise UserError(f"grammar must be EBNF text, got {type(text).__name__}")
        same = [n for n in BUILTIN_GRAMMARS if BUILTIN_GRAMMARS[n].strip() == text.strip()]
        return (same[0] if same else "custom"), text
    return cfg.grammar, BUILTIN_GRAMMARS[cfg.grammar]


def _xgrammar_message(e: Exception) -> str:
    """xgrammar's error without its '[time] /path/file.cc:NNN: ' prefix, on one line."""
    msg = str(e).strip()
    m = re.search(r"(EBNF (?:parser|lexer) error.*)", msg, re.S)
    msg = m.group(1) if m else re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", msg)
    return " ".join(msg.split())


def check_grammar_text(text: str) -> None:
    """Parse the EBNF without a tokenizer (milliseconds); raise UserError with the position of the error."""
    import xgrammar as xg
    if not text.strip():
        raise UserError("grammar is empty; give EBNF text with a `root ::= ...` rule, or a built-in grammar name")
    if len(text) > MAX_GRAMMAR_CHARS:
        raise UserError(f"grammar has {len(text)} characters; the limit is {MAX_GRAMMAR_CHARS}")
    try:
        xg.Grammar.from_ebnf(text)
    except Exception as e:  # xgrammar raises RuntimeError with the line and column
        raise UserError(f"grammar does not compile: {_xgrammar_message(e)}") from None


def prepare_grammar(cfg, inputs: RunInputs) -> RunInputs:
    """`Strategy.prepare` of gcd and asap (before any model is loaded, once per run): the grammar text (given, or
    the built-in's), parsed once; the inputs carry the text and its name from here on."""
    label, text = resolve_grammar(cfg, inputs.grammar)
    check_grammar_text(text)
    return dataclasses.replace(inputs, grammar=text, grammar_name=label)


# ================================================================================================ compiled grammars
_LOCK = threading.Lock()
_INFOS: OrderedDict = OrderedDict()       # (id(tok), V, eos) -> (ref, compiler)
_COMPILED: OrderedDict = OrderedDict()    # (id(tok), V, eos, text) -> (ref, compiled)
MAX_TOKENIZERS = 4
MAX_COMPILED = 32


def _ref(obj):
    try:
        return weakref.ref(obj)
    except TypeError:                   # not weak-referenceable: hold it (bounded by the LRU size)
        return lambda: obj


def _tokenizer_info(lm):
    import xgrammar as xg
    tok, eos = lm.tokenizer, sorted(int(i) for i in lm.eos_ids)
    try:
        from transformers import PreTrainedTokenizerBase
        is_hf = isinstance(tok, PreTrainedTokenizerBase)
    except ImportError:  # pragma: no cover
        is_hf = False
    if is_hf:
        return xg.TokenizerInfo.from_huggingface(tok, vocab_size=lm.vocab_size, stop_token_ids=eos)
    vocab = [lm.token_text(i) for i in range(lm.vocab_size)]
    return xg.TokenizerInfo(vocab, xg.VocabType.RAW, vocab_size=lm.vocab_size, stop_token_ids=eos)


def _lru_get(cache: OrderedDict, key, tok):
    hit = cache.get(key)
    if hit is not None and hit[0]() is tok:
        cache.move_to_end(key)
        return hit[1]
    return None


def _lru_put(cache: OrderedDict, key, tok, value, limit: int) -> None:
    cache[key] = (_ref(tok), value)
    cache.move_to_end(key)
    while len(cache) > limit:
        cache.popitem(last=False)


def compiled_grammar(lm, text: str):
    """The xgrammar CompiledGrammar of `text` for this model's tokenizer, from the module LRU when it is there."""
    import xgrammar as xg
    tok = lm.tokenizer
    base = (id(tok), int(lm.vocab_size), tuple(sorted(int(i) for i in lm.eos_ids)))
    with _LOCK:
        compiled = _lru_get(_COMPILED, base + (text,), tok)
        if compiled is not None:
            return compiled
        compiler = _lru_get(_INFOS, base, tok)
        if compiler is None:
            compiler = xg.GrammarCompiler(_tokenizer_info(lm))
            _lru_put(_INFOS, base, tok, compiler, MAX_TOKENIZERS)
        try:
            compiled = compiler.compile_grammar(text)
        except Exception as e:
            raise UserError(f"grammar does not compile: {_xgrammar_message(e)}") from None
        _lru_put(_COMPILED, base + (text,), tok, compiled, MAX_COMPILED)
        return compiled


class GrammarMask:
    """One run's matcher and bitmask: `allowed()` lists the token ids the grammar allows next."""

    def __init__(self, lm, compiled):
        import xgrammar as xg
        self.vocab_size = int(lm.vocab_size)
        self.matcher = xg.GrammarMatcher(compiled)
        self.bitmask = xg.allocate_token_bitmask(1, self.vocab_size)            # [1, ceil(V/32)] int32

    def reset(self) -> None:
        self.matcher.reset()

    def allowed(self) -> torch.Tensor:
        """[A] long, ascending. (Bit j of word i is token 32 i + j; numpy's single-threaded unpackbits, ~0.2 ms
        for 49k tokens, because torch's parallel shift-and-mask stalls for tens of ms on an oversubscribed CPU.)"""
        self.matcher.fill_next_token_bitmask(self.bitmask)
        bits = np.unpackbits(self.bitmask[0].numpy().view(np.uint8), bitorder="little")[: self.vocab_size]
        return torch.from_numpy(np.flatnonzero(bits))

    def accept(self, token: int) -> None:
        if not self.matcher.accept_token(int(token)):
            raise RuntimeError(f"the grammar matcher refused token {token}, which its own mask allowed")

    def accepts_all(self, tokens) -> bool:
        return all(self.matcher.accept_token(int(t)) for t in tokens)


def parses(lm, grammar_text: str, token_ids, eos_id: int | None = None) -> bool:
    """A fresh matcher accepts every token and then the stop token (the sequence is a complete sentence)."""
    import xgrammar as xg
    m = xg.GrammarMatcher(compiled_grammar(lm, grammar_text))
    if not all(m.accept_token(int(t)) for t in token_ids):
        return False
    eos = min(lm.eos_ids) if eos_id is None else eos_id
    return m.is_completed() and m.accept_token(int(eos)) and m.is_terminated()


def allowed_probs(logits: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """P(t|u) of the allowed ids: the full-vocabulary softmax of logits / temperature, unmasked, in float64. [A].
    (One function for the sampler and for exact mode, so both see the same numbers.)"""
    logits = logits.double()
    logp = torch.log_softmax(logits if temperature == 1.0 else logits / temperature, -1)
    return logp[ids].exp()


def gcd_probs(probs: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """GCD's next-token distribution over the allowed set: P renormalised, after top-k / top-p (transformers'
    order; on the allowed set this equals warping the masked full-vocabulary logits). [A] float64."""
    logits = probs.log()
    if top_k:
        logits = top_k_filter(logits, top_k)
    if top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    return torch.softmax(logits, -1)


# ================================================================================================ the trie
class Node:
    """A prefix u of generated tokens. `p` = P(token|parent); `mass` = sum over allowed t of P(t|u) once expanded;
    `efg` = EFG~(u): 1 until expanded, then mass - sum over visited children of p_c (1 - efg_c), 0 when dead.
    `ids`/`probs`: the cached distribution (allowed ids, their P), None when not cached; `child_efg`: EFG~ of each
    allowed child ([A] float64, 1 for children never visited), kept beside it."""

    __slots__ = ("parent", "token", "pos", "depth", "p", "children", "mass", "efg", "ids", "probs", "raw_logp",
                 "child_efg", "entropy", "visits", "dead", "node_id")

    def __init__(self, parent, token: int | None, pos: int, p: float, node_id: int):
        self.parent, self.token, self.pos, self.p, self.node_id = parent, token, pos, p, node_id
        self.depth = 0 if parent is None else parent.depth + 1
        self.children: dict[int, Node] = {}
        self.mass: float | None = None
        self.efg = 1.0
        self.ids = self.probs = self.raw_logp = self.child_efg = None
        self.entropy = float("nan")
        self.visits = 0
        self.dead = False

    def prefix(self) -> tuple[int, ...]:
        out, n = [], self
        while n.parent is not None:
            out.append(n.token)
            n = n.parent
        return tuple(reversed(out))


class Trie:
    """The prefix trie of one run, with EFG~ bookkeeping and an LRU cache of node distributions."""

    def __init__(self, cache_entries: int | None = None):
        self.root = Node(None, None, -1, 1.0, 0)
        self.size = 1
        self.cache_entries = TRIE_CACHE_ENTRIES if cache_entries is None else cache_entries
        self.cached: OrderedDict[int, Node] = OrderedDict()
        self.entries = 0

    def child(self, node: Node, pos: int, token: int, p: float) -> Node:
        c = node.children.get(token)
        if c is None:
            c = node.children[token] = Node(node, token, pos, p, self.size)
            self.size += 1
        return c

    @staticmethod
    def recompute(node: Node) -> float:
        if node.dead:
            return 0.0
        if node.mass is None:
            return 1.0
        s = node.mass
        for c in node.children.values():
            s -= c.p * (1.0 - c.efg)
        return max(s, 0.0)

    def propagate(self, node: Node) -> None:
        """Recompute EFG~ of `node` and of every ancestor (each only decreases)."""
        while node is not None:
            node.efg = self.recompute(node)
            parent = node.parent
            if parent is not None and parent.child_efg is not None:
                parent.child_efg[node.pos] = node.efg
            node = parent

    def expand(self, node: Node, ids: torch.Tensor, probs: torch.Tensor, raw_logp, entropy: float,
               keep: bool) -> None:
        """Store the allowed ids and P at `node` (first visit, or a revisit after eviction); update EFG~."""
        node.ids, node.probs, node.raw_logp, node.entropy = ids, probs, raw_logp, entropy
        node.child_efg = torch.ones_like(probs)
        for c in node.children.values():
            node.child_efg[c.pos] = c.efg
        if node.mass is None:
            node.mass = float(probs.sum())
            self.propagate(node)
        if keep:
            self.cached[node.node_id] = node
            self.entries += len(ids)
            while self.entries > self.cache_entries and len(self.cached) > 1:   # `node` is the newest: kept
                _, old = self.cached.popitem(last=False)
                self.entries -= len(old.ids)
                old.ids = old.probs = old.raw_logp = old.child_efg = None

    def touch(self, node: Node) -> None:
        if node.node_id in self.cached:
            self.cached.move_to_end(node.node_id)

    def drop(self, node: Node) -> None:
        """Forget a node's distribution (gcd keeps none)."""
        node.ids = node.probs = node.raw_logp = node.child_efg = None

    def kill(self, node: Node) -> None:
        """Nothing grammatical lies below `node` within the budget: EFG~ = 0, propagated."""
        node.dead = True
        self.propagate(node)

    def nodes(self):
        """Breadth-first."""
        level = [self.root]
        while level:
            yield from level
            level = [c for n in level for c in n.children.values()]


# ================================================================================================ sampling rules
class Rule:
    """How a grammar strategy picks the next token at a node. gcd: plain masking; asap: weighted by EFG~."""

    name = "rule"
    is_gcd = False          # p_gcd is the probability actually sampled from (gcd with its top-k / top-p)
    caches = False          # keep node distributions in the trie (revisits need no forward)
    reports_efg = False

    def weights(self, node: Node) -> torch.Tensor | None:
        """The sampling distribution over node.ids ([A] float64, sums to 1), or None if it has no mass."""
        raise NotImplementedError


def draw_index(q: torch.Tensor, generator: torch.Generator) -> int:
    """One index drawn from the distribution q ([A], sums to 1) by inverse CDF with one uniform from the run's
    generator (gcd and asap draw the same way, so equal distributions give equal draws). Zero entries are never
    drawn."""
    u = float(torch.rand((), dtype=torch.float64, generator=generator))
    if len(q) <= 64:                                   # small sets: plain Python is faster than torch ops
        values = q.tolist()
        x, acc = u * sum(values), 0.0
        for i, v in enumerate(values):
            acc += v
            if x < acc:
                return i
        return max(i for i, v in enumerate(values) if v > 0)
    c = torch.cumsum(q, 0)
    i = int(torch.searchsorted(c, u * c[-1], right=True))
    return i if i < len(q) else int(torch.nonzero(q).max())


# ================================================================================================ the loop
@dataclass
class SampleResult:
    tokens: list[int]
    loglik: float                 # ln P(w), EOS included (the temperature-scaled model)
    complete: bool
    efg_root: float
    key: tuple | None = None      # tuple(tokens) when complete


@dataclass
class GrammarRun:
    """One run's grammar, trie and samples (local to `run_grammar`)."""

    label: str
    text: str
    trie: Trie
    samples: list[SampleResult] = field(default_factory=list)
    exact: object = None          # ExactResult or None
    mask_ms: list[float] = field(default_factory=list)


def run_grammar(ctx: RunContext, cfg, rule: Rule) -> RunGen:
    """The shared sampling loop of gcd and asap (see the module docstring). Returns every sample in order."""
    lm, trace = ctx.lm, ctx.trace
    inputs = ctx.inputs if ctx.inputs.grammar_name else prepare_grammar(cfg, ctx.inputs)   # prepared by the plan
    label, text = inputs.grammar_name, inputs.grammar
    mask = GrammarMask(lm, compiled_grammar(lm, text))
    trie = Trie()
    result = GrammarRun(label=label, text=text, trie=trie)
    eos_ids = lm.eos_ids
    temperature = float(getattr(cfg, "temperature", 1.0))
    n_prompt = len(ctx.prompt_ids)
    if not len(mask.allowed()):
        raise UserError(f"grammar '{label}' allows no token of model '{lm.key}' at the start: this vocabulary cannot "
                        f"begin any sentence of it")
    out = lm.prefill(ctx.prompt_ids)
    root_logits, cache, prefill_ms = out.logits[0], out.cache, out.fwd_ms
    global_step = 0
    stopped = False
    for i in range(cfg.num_samples):
        if ctx.stop.is_set():
            break
        if trie.root.dead or (trie.root.mass is not None and trie.root.efg <= 0.0):
            break                                   # nothing grammatical is left to sample within the budget
        if i:
            lm.crop(cache, n_prompt)
        mask.reset()
        node, pending, tokens = trie.root, [], []
        loglik, complete, last_step = 0.0, False, 0
        for step in range(ctx.max_new_tokens):
            t0 = lm.clock_ms()
            fwd_ms = mask_ms = 0.0
            cached = node.ids is not None
            efg_before = node.efg
            if not cached:
                if step == 0:
                    logits = root_logits
                    fwd_ms = prefill_ms if i == 0 else 0.0
                else:
                    out = lm.step([pending], cache)
                    logits, fwd_ms, pending = out.logits[0], out.fwd_ms, []
                tm = lm.clock_ms()
                ids = mask.allowed()
                mask_ms = lm.clock_ms() - tm
                result.mask_ms.append(mask_ms)
                raw = torch.log_softmax(logits, -1)                              # [V] untempered
                probs = allowed_probs(logits, ids, temperature)                  # [A] float64
                trie.expand(node, ids, probs, None if temperature == 1.0 else raw[ids], float(entropy_bits(raw)),
                            keep=rule.caches)
                ts = lm.clock_ms()
            else:
                trie.touch(node)
                ts = t0
            ids, probs = node.ids, node.probs
            if len(ids) == 0:                                                    # dead end: no token continues
                trie.kill(node)
                break
            q = rule.weights(node)
            if q is None:                                                        # every child known dead
                trie.kill(node)
                break
            idx = draw_index(q, ctx.generator)
            token = int(ids[idx])
            p_tok = float(probs[idx])
            q_tok = float(q[idx])
            p_gcd = q_tok if rule.is_gcd else p_tok / node.mass
            child = trie.child(node, idx, token, p_tok)
            efg_child = child.efg
            child.visits += 1
            is_eos = token in eos_ids
            if not is_eos:
                mask.accept(token)
            sel_ms = lm.clock_ms() - ts
            raw_lp = math.log(p_tok) if node.raw_logp is None else float(node.raw_logp[idx])
            cols = {"sample": i, "allowed": len(ids), "masked_mass": max(0.0, 1.0 - node.mass), "p_gcd": p_gcd,
                    "cached": cached, "fwd_ms": fwd_ms, "mask_ms": mask_ms, "sel_ms": sel_ms}
            if rule.reports_efg:
                cols.update(p_asap=q_tok, efg_before=efg_before, efg_after=node.efg, efg_child=efg_child)
            trace.add("token", step, branch_id=i, parent_id=i, position=n_prompt + step, token_id=token,
                      token_text=lm.token_text(token), logprob=raw_lp, entropy=node.entropy,
                      score=math.log(q_tok), accepted=True, dt_ms=fwd_ms + mask_ms + sel_ms, **cols)
            _candidates(ctx, trie, rule, node, q, token, i, step, n_prompt)
            if not rule.caches:
                trie.drop(node)
            loglik += math.log(p_tok)
            last_step = step
            global_step += 1
            if is_eos:
                complete = True
                break
            tokens.append(token)
            pending.append(token)
            node = child
            yield Progress(global_step, list(tokens))
            if ctx.stop.is_set():
                stopped = True
                break
        else:
            trie.kill(node)                          # the budget ran out below this node
        if stopped:
            break
        sample = SampleResult(tokens=tokens, loglik=loglik, complete=complete, efg_root=trie.root.efg,
                              key=tuple(tokens) if complete else None)
        result.samples.append(sample)
        trace.add("finish", last_step, branch_id=i, parent_id=i, score=loglik, final_rank=i, sample=i,
                  complete=complete, length=len(tokens), efg_root=trie.root.efg, trie_nodes=trie.size)
        yield Progress(global_step, list(tokens))
    lm.crop(cache, n_prompt)
    _after_sampling(ctx, cfg, rule, result, root_logits, cache, temperature)
    return [Sequence(token_ids=s.tokens, score=s.loglik, extra={"sample": k, "complete": s.complete})
            for k, s in enumerate(result.samples)]


def _candidates(ctx, trie, rule, node, q, token, sample, step, n_prompt) -> None:
    """The allowed tokens with the largest sampling probability, as `candidate` rows."""
    k = min(ctx.num_alternatives, len(q))
    if k <= 0:
        return
    if len(q) <= 64:                                  # small sets: Python lists beat tensor indexing
        values = q.tolist()
        positions = sorted(range(len(values)), key=lambda j: -values[j])[:k]
        top_q = [values[j] for j in positions]

        def pick(t):
            full = t.tolist()
            return [full[j] for j in positions]
    else:
        top = torch.topk(q, k)
        top_q, positions = top.values.tolist(), top.indices.tolist()

        def pick(t):
            return t[positions].tolist()
    ids, probs = pick(node.ids), pick(node.probs)
    raw = None if node.raw_logp is None else pick(node.raw_logp)
    efgs = pick(node.child_efg) if rule.reports_efg else None
    lm, mass = ctx.lm, node.mass
    for rank, (qv, tid, p) in enumerate(zip(top_q, ids, probs)):
        raw_lp = math.log(p) if raw is None else raw[rank]
        cols = {"p_gcd": qv if rule.is_gcd else p / mass, "rank": rank}
        if rule.reports_efg:
            cols.update(p_asap=qv, efg=efgs[rank])
        ctx.trace.add("candidate", step, branch_id=sample, parent_id=sample, position=n_prompt + step,
                      token_id=tid, token_text=lm.token_text(tid), logprob=raw_lp, entropy=node.entropy,
                      score=math.log(qv) if qv > 0 else float("-inf"), accepted=(tid == token), **cols)


# ================================================================================================ exact mode
@dataclass
class ExactResult:
    """The whole grammatical language within the budget, scored by the model."""

    q: dict            # tuple(ids) -> Q(w) = P(w) / Z
    p: dict            # tuple(ids) -> P(w) (EOS included)
    q_gcd: dict        # tuple(ids) -> GCD's probability of producing w (its remaining mass ends in dead ends)
    efg: dict          # prefix -> exact EFG(prefix)
    z: float           # sum of P(w) = EFG(root)
    nodes: int         # internal prefixes scored


def language_prefixes(lm, compiled, max_new_tokens: int, max_nodes: int) -> dict | None:
    """Every prefix that can still end grammatically within max_new_tokens (EOS counted) -> its allowed ids, by
    walking the grammar with the matcher only (no model); None when there are more than max_nodes."""
    mask = GrammarMask(lm, compiled)
    eos = lm.eos_ids
    internal: dict[tuple, torch.Tensor] = {}
    level: list[tuple] = [()]
    while level:
        nxt: list[tuple] = []
        for u in level:
            mask.reset()
            mask.accepts_all(u)
            ids = mask.allowed()
            internal[u] = ids
            if len(u) + 2 <= max_new_tokens:          # a child u.t (depth len(u)+1) can still emit EOS
                nxt.extend(u + (int(t),) for t in ids.tolist() if int(t) not in eos)
            if len(internal) + len(nxt) > max_nodes:
                return None
        level = nxt
    return internal


def exact_distribution(lm, compiled, prompt_ids: list[int], max_new_tokens: int, temperature: float = 1.0,
                       max_nodes: int = 256, root_logits: torch.Tensor | None = None, top_k: int = 0,
                       top_p: float = 1.0, prompt_cache=None) -> ExactResult | None:
    """Exact Q, GCD's distribution and EFG by enumeration (one batched forward per depth and chunk, on a copy of
    the prompt's KV cache: `prompt_cache` holding exactly the prompt, else one prefill), or None when the language
    within the budget has more than max_nodes prefixes."""
    internal = language_prefixes(lm, compiled, max_new_tokens, max_nodes)
    if internal is None:
        return None
    eos = lm.eos_ids
    probs: dict[tuple, torch.Tensor] = {}
    by_depth: dict[int, list[tuple]] = {}
    for u in internal:
        by_depth.setdefault(len(u), []).append(u)
    if root_logits is None or (prompt_cache is None and len(by_depth) > 1):
        out = lm.prefill(list(prompt_ids))
        root_logits, prompt_cache = out.logits[0], out.cache
    probs[()] = allowed_probs(root_logits, internal[()], temperature)
    for depth, prefixes in sorted(by_depth.items()):
        if depth == 0:
            continue
        for k in range(0, len(prefixes), EXACT_BATCH):
            chunk = prefixes[k: k + EXACT_BATCH]
            cache = lm.fork(copy.deepcopy(prompt_cache), len(chunk))
            out = lm.step([list(u) for u in chunk], cache)
            for row, u in enumerate(chunk):
                probs[u] = allowed_probs(out.logits[row], internal[u], temperature)
    efg: dict[tuple, float] = {}
    for u in sorted(internal, key=len, reverse=True):             # deepest first
        total = 0.0
        for t, p in zip(internal[u].tolist(), probs[u].tolist()):
            total += p * (1.0 if t in eos else efg.get(u + (t,), 0.0))
        efg[u] = total
    p_w: dict[tuple, float] = {}
    q_gcd: dict[tuple, float] = {}
    path = {(): (1.0, 1.0)}
    for u in sorted(internal, key=len):                           # shallowest first
        pu, gu = path[u]
        ids, pr = internal[u].tolist(), probs[u]
        g = gcd_probs(pr, top_k, top_p).tolist() if len(ids) else []
        for t, p, gq in zip(ids, pr.tolist(), g):
            if t in eos:
                p_w[u] = p_w.get(u, 0.0) + pu * p
                q_gcd[u] = q_gcd.get(u, 0.0) + gu * gq
            elif u + (t,) in internal:
                path[u + (t,)] = (pu * p, gu * gq)
    z = efg[()]
    q = {w: v / z for w, v in p_w.items()} if z > 0 else {}
    return ExactResult(q=q, p=p_w, q_gcd=q_gcd, efg=efg, z=z, nodes=len(internal))


# ================================================================================================ KL curves
def kl(p: dict, q: dict) -> float:
    """KL(p || q) in nats over p's support (scipy.stats.entropy's definition); inf where q = 0 < p."""
    total = 0.0
    for k, pk in p.items():
        if pk <= 0:
            continue
        qk = q.get(k, 0.0)
        if qk <= 0:
            return float("inf")
        total += pk * math.log(pk / qk)
    return total


def sample_grid(n: int, points: int = KL_POINTS) -> list[int]:
    """Sample counts 1..n at which the KL curve is evaluated: every count up to `points`, else a log+linear grid."""
    if n <= points:
        return list(range(1, n + 1))
    log = {int(round(x)) for x in torch.logspace(0, math.log10(n), points // 2).tolist()}
    lin = {int(round(x)) for x in torch.linspace(1, n, points // 2).tolist()}
    return sorted((log | lin) & set(range(1, n + 1)))


def kl_curve(keys: list, target: dict, grid: list[int] | None = None) -> list[dict]:
    """Per n in grid: KL(empirical of the complete samples among the first n || target) and the same over the
    last ceil(n/4) samples (the paper's sliding window), plus the support size and incomplete count."""
    grid = grid or sample_grid(len(keys))
    rows = []
    for n in grid:
        first = keys[:n]
        window = keys[n - math.ceil(n / 4): n]
        rows.append({"samples": n, "kl": _kl_of(first, target), "kl_window": _kl_of(window, target),
                     "incomplete": sum(k is None for k in first)})
    return rows


def _kl_of(keys: list, target: dict) -> float:
    counts: dict = {}
    for k in keys:
        if k is not None:
            counts[k] = counts.get(k, 0) + 1
    total = sum(counts.values())
    if not total:
        return float("nan")
    return kl({k: c / total for k, c in counts.items()}, target)


def explored_target(samples: list[SampleResult]) -> tuple[dict, dict]:
    """The paper's approximation of Q when it cannot be enumerated: the distinct complete samples, each weighted
    by its likelihood P(w), renormalised. Returns (q, p)."""
    p = {s.key: math.exp(s.loglik) for s in samples if s.key is not None}
    z = sum(p.values())
    return ({k: v / z for k, v in p.items()} if z > 0 else {}), p


def _after_sampling(ctx, cfg, rule: Rule, result: GrammarRun, root_logits, prompt_cache, temperature: float) -> None:
    """Exact or explored-support target, kl / target / node rows, run metrics."""
    lm, trace, samples = ctx.lm, ctx.trace, result.samples
    exact = None
    if cfg.exact_max_nodes > 0 and samples and not ctx.stop.is_set():
        exact = exact_distribution(lm, compiled_grammar(lm, result.text), ctx.prompt_ids, ctx.max_new_tokens,
                                   temperature, cfg.exact_max_nodes, root_logits,
                                   getattr(cfg, "top_k", 0), getattr(cfg, "top_p", 1.0), prompt_cache)
    result.exact = exact
    if exact is not None:
        target, p_w, q_gcd = exact.q, exact.p, exact.q_gcd
    else:
        (target, p_w), q_gcd = explored_target(samples), {}
    keys = [s.key for s in samples]
    curve = kl_curve(keys, target) if samples and target else []
    for row in curve:
        trace.add("kl", None, exact=exact is not None, support=len(target), **row)
    counts: dict = {}
    for k in keys:
        if k is not None:
            counts[k] = counts.get(k, 0) + 1
    for w in sorted(target, key=lambda w: -target[w])[:MAX_TARGET_ROWS]:
        trace.add("target", None, token_text=lm.decode(w), seq=" ".join(map(str, w)), q=target[w],
                  q_gcd=q_gcd.get(w) if exact is not None else None, p_w=p_w.get(w), count=counts.get(w, 0),
                  exact=exact is not None)
    for k, node in enumerate(result.trie.nodes()):
        if k >= MAX_NODE_ROWS:
            break
        if node.parent is None:
            continue
        trace.add("node", None, token_id=node.token, token_text=lm.token_text(node.token), node_id=node.node_id,
                  node_parent=node.parent.node_id, depth=node.depth, p=node.p,
                  efg=node.efg if rule.reports_efg else None, visits=node.visits, dead=node.dead)
    done = len(samples)
    metrics = GrammarMetrics(grammar=result.label, samples=done,
                             complete_rate=round(sum(s.complete for s in samples) / done, 6) if done else 0.0,
                             trie_nodes=result.trie.size, kl_exact=exact is not None)
    if curve:
        metrics.kl, metrics.kl_window = _finite(curve[-1]["kl"]), _finite(curve[-1]["kl_window"])
    if rule.reports_efg:
        metrics.efg_root = result.trie.root.efg
    if exact is not None:
        metrics.z, metrics.kl_gcd_limit = exact.z, _finite(kl(_normalised(exact.q_gcd), exact.q))
    if result.mask_ms:
        ms = sorted(result.mask_ms)
        metrics.median_mask_ms = ms[len(ms) // 2]
    ctx.metrics = metrics


def _normalised(d: dict) -> dict:
    z = sum(d.values())
    return {k: v / z for k, v in d.items()} if z > 0 else {}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
