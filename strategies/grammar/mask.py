"""The grammar mask: xgrammar's compiled grammars (cached), a run's matcher and bitmask, and `parses`.

Engine: xgrammar 0.2.8 (docs/strategies.md#gcd). TokenizerInfo comes from the model's Hugging Face tokenizer with
vocab_size = the logits width and stop tokens = the model's EOS ids; a tokenizer that is not a Hugging Face one
(the scripted fake model) gets a RAW vocabulary made of each id's text. The compiled grammar is cached per
(tokenizer identity, logits width, EOS ids, grammar text) in a small module-level LRU (`compiled_grammar`); the
shared LM object is never written to. Each run owns its GrammarMatcher and bitmask.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict

import numpy as np
import torch
import xgrammar as xg
from transformers import PreTrainedTokenizerBase

from declab.core.errors import UserError
from strategies.grammar.builtin import xgrammar_message

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
    tok, eos = lm.tokenizer, sorted(int(i) for i in lm.eos_ids)
    if isinstance(tok, PreTrainedTokenizerBase):
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
            raise UserError(f"grammar does not compile: {xgrammar_message(e)}") from None
        _lru_put(_COMPILED, base + (text,), tok, compiled, MAX_COMPILED)
        return compiled


class GrammarMask:
    """One run's matcher and bitmask: `allowed()` lists the token ids the grammar allows next."""

    def __init__(self, lm, compiled):
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
    m = xg.GrammarMatcher(compiled_grammar(lm, grammar_text))
    if not all(m.accept_token(int(t)) for t in token_ids):
        return False
    eos = min(lm.eos_ids) if eos_id is None else eos_id
    return m.is_completed() and m.accept_token(int(eos)) and m.is_terminated()
