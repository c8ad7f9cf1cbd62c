"""n-gram models for Superposed Decoding (strategies/superposed.py): orders 2..7 over a tokenized text corpus.

Storage (compact, built once, cached): the corpus tokenized with the model's own tokenizer is kept as one uint32
array of token ids plus the document start offsets, in `<cache_root>/ngrams/<key>.npz` (`declab.core.paths.cache_root`,
i.e. `$DECLAB_CACHE` or `~/.cache/declab`). The key hashes the model key, its vocabulary size and the corpus
identity (each file's path, size and mtime; for the default corpus the Python version), so a new corpus or a
new tokenizer builds a new file. Tokenizing is the expensive part (seconds); the count tables are rebuilt from
the array when a process first uses it (numpy sort, well under a second per million tokens) and memoised per
process, so nothing heavier than the token array ever sits on disk.

Tables: for each order n, every n-gram window inside one document is hashed to a uint64 with a polynomial rolling
hash (h = ((t0+1)·P + (t1+1))·P + ... mod 2^64), and the sorted unique hashes keep their counts; the (n-1)-token
contexts likewise. A lookup of P_n(v | context) is then two `searchsorted` calls over all drafts x candidate tokens
at once: count(context, v) / count(context), or "unseen" when the context never occurs (the reference's -1, which
adds nothing to the interpolation). Hash collisions are possible in principle (64-bit, ~1e-7 for a million keys)
and ignored.

Default corpus ("python-docs"): the English prose that ships with every CPython, so it is on any machine the
project runs on without network and without a download step: the Python Language Reference topics
(`pydoc_data/topics.py`, ~0.5 MB) and the docstrings of the standard library modules (~1.3 MB, extracted with
`ast`, tests and GUI packages left out). About 0.45M SmolLM2 tokens; built in ~15-25 s on two CPU cores. It is
technical English (programming documentation), which suits code/explanatory prompts better than stories; the
paper used 200k RedPajama documents, which cannot be fetched here. A user points `ngram_corpus` at a text file or a
folder of .txt/.md/.rst files (one document per file, or per blank-line-separated paragraph block).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from declab.core.corpus import corpus_documents, corpus_identity, default_corpus_documents  # noqa: F401
from declab.core.errors import UserError
from declab.core.paths import cache_root

MULT = np.uint64(0x9E3779B97F4A7C15)           # odd 64-bit multiplier of the rolling hash
MASK = (1 << 64) - 1
MAX_ORDER = 7
SLOW_TOKENIZER_CHARS = 60_000   # default-corpus slice for tokenizers that are not HF fast ones
_MEMO: dict[str, "NGramModel"] = {}
_LOCK = threading.Lock()


# ------------------------------------------------------------------------------------------------ tokenizing
def encode_documents(lm, docs: list[str]) -> list[list[int]]:
    """Each document with the model's tokenizer, no special tokens (HF fast tokenizers batch; the fake loops)."""
    tok = lm.tokenizer
    if callable(tok):
        out: list[list[int]] = []
        for i in range(0, len(docs), 512):
            out.extend(tok(docs[i:i + 512], add_special_tokens=False)["input_ids"])
        return out
    return [tok.encode(d) for d in docs]


def cache_key(lm, corpus: str) -> str:
    h = hashlib.sha256(f"v1\n{lm.key}\n{lm.vocab_size}\n{corpus_identity(corpus)}".encode()).hexdigest()
    return h[:24]


def cache_path(lm, corpus: str) -> Path:
    return cache_root() / "ngrams" / f"{cache_key(lm, corpus)}.npz"


def build_token_file(lm, corpus: str, path: Path) -> dict:
    """Tokenize the corpus and write tokens + document starts atomically. Returns build facts."""
    t0 = time.perf_counter()
    if not corpus and not callable(lm.tokenizer):      # a slow pure-Python tokenizer (the fake): a slice suffices
        docs = default_corpus_documents(max_chars=SLOW_TOKENIZER_CHARS)
    else:
        docs = corpus_documents(corpus)
    ids = encode_documents(lm, docs)
    lengths = np.array([len(d) for d in ids], dtype=np.int64)
    tokens = np.fromiter((t for d in ids for t in d), dtype=np.uint32, count=int(lengths.sum()))
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    os.close(fd)
    with open(tmp, "wb") as fh:
        np.savez_compressed(fh, tokens=tokens, starts=starts,
                            corpus=np.array(corpus or "python-docs"), model=np.array(lm.key))
    os.replace(tmp, path)
    return {"documents": len(docs), "tokens": int(tokens.size), "build_s": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------ model
def _window_hashes(tok: np.ndarray, n: int) -> np.ndarray:
    """Rolling hash of every length-n window: [L-n+1] uint64 (token ids shifted by one so id 0 counts)."""
    L = tok.size - n + 1
    h = np.zeros(max(L, 0), dtype=np.uint64)
    if L <= 0:
        return h
    with np.errstate(over="ignore"):
        for i in range(n):
            h = h * MULT + (tok[i:i + L].astype(np.uint64) + np.uint64(1))
    return h


@dataclass
class OrderTable:
    keys: np.ndarray        # sorted unique n-gram hashes (uint64)
    counts: np.ndarray      # their counts
    ctx_keys: np.ndarray    # sorted unique (n-1)-token context hashes
    ctx_counts: np.ndarray  # count(context) = sum over v of count(context, v)


def _lookup(keys: np.ndarray, counts: np.ndarray, query: np.ndarray) -> np.ndarray:
    if keys.size == 0:
        return np.zeros(query.shape, dtype=np.int64)
    i = np.searchsorted(keys, query)
    i = np.minimum(i, keys.size - 1)
    return np.where(keys[i] == query, counts[i], 0).astype(np.int64)


class NGramModel:
    """Counts of orders `orders` (each n >= 2) over documents of token ids; see the module docstring."""

    def __init__(self, tokens: np.ndarray, starts: np.ndarray, orders=(2, 3, 4, 5, 6), info: dict | None = None):
        self.orders = tuple(int(n) for n in orders)
        self.info = dict(info or {}, tokens=int(tokens.size), documents=int(starts.size - 1))
        tok = tokens.astype(np.int64)
        doc = np.zeros(tok.size, dtype=np.int64)
        if starts.size > 2:
            doc[starts[1:-1]] = 1
        doc = np.cumsum(doc)                                   # document index of every position
        self.tables: dict[int, OrderTable] = {}
        hashes = {1: _window_hashes(tok, 1)}
        for n in range(2, max(self.orders) + 1):
            hashes[n] = _window_hashes(tok, n)
        for n in self.orders:
            h = hashes[n]
            valid = doc[: h.size] == doc[n - 1: n - 1 + h.size]  # the window does not cross a document boundary
            keys, counts = np.unique(h[valid], return_counts=True)
            ctx, ctx_counts = np.unique(hashes[n - 1][: h.size][valid], return_counts=True)
            self.tables[n] = OrderTable(keys, counts, ctx, ctx_counts)

    @staticmethod
    def context_hash(tokens) -> int:
        h = 0
        for t in tokens:
            h = (h * int(MULT) + int(t) + 1) & MASK
        return h

    def lookup(self, contexts: list[list[int]], candidates: np.ndarray, weights: dict[int, float]):
        """Interpolated q_d(v) = sum_n w_n P_n(v | last n-1 tokens of draft d) over the candidate tokens.

        contexts: per draft, its full token history (prompt + draft); candidates: [C] token ids shared by every
        draft; weights: order -> w_n (orders whose context is longer than the history are skipped, as are unseen
        contexts). Returns q [D, C] float64, seen [D, O] bool (context seen per order), matched [D, O, C] bool
        (count(context, v) > 0), in the order of `weights`."""
        D, C = len(contexts), int(candidates.size)
        orders = list(weights)
        q = np.zeros((D, C), dtype=np.float64)
        seen = np.zeros((D, len(orders)), dtype=bool)
        matched = np.zeros((D, len(orders), C), dtype=bool)
        cand = candidates.astype(np.uint64) + np.uint64(1)
        for j, n in enumerate(orders):
            table = self.tables.get(n)
            if table is None:
                continue
            rows = [d for d in range(D) if len(contexts[d]) >= n - 1]
            if not rows:
                continue
            ctx = np.array([self.context_hash(contexts[d][len(contexts[d]) - (n - 1):]) for d in rows],
                           dtype=np.uint64)
            ctx_count = _lookup(table.ctx_keys, table.ctx_counts, ctx)           # [R]
            with np.errstate(over="ignore"):
                pair = ctx[:, None] * MULT + cand[None, :]                        # [R, C]
            count = _lookup(table.keys, table.counts, pair)
            ok = ctx_count > 0
            prob = np.where(ok[:, None], count / np.maximum(ctx_count, 1)[:, None], 0.0)
            r = np.array(rows)
            q[r] += weights[n] * prob
            seen[r, j] = ok
            matched[r, j] = count > 0
        return q, seen, matched


def load_ngrams(lm, corpus: str = "", orders=(2, 3, 4, 5, 6)) -> NGramModel:
    """The n-gram model of `corpus` ("" = the default python-docs corpus) in the model's tokenization: from the
    process memo, else from the cached token file, else built (and cached) now."""
    key = f"{cache_key(lm, corpus)}:{tuple(orders)}"
    with _LOCK:
        model = _MEMO.get(key)
        if model is not None:
            return model
        path = cache_path(lm, corpus)
        info: dict = {"cache": str(path), "cached": path.exists()}
        if not path.exists():
            info.update(build_token_file(lm, corpus, path))
        t0 = time.perf_counter()
        with np.load(path) as data:
            tokens, starts = data["tokens"], data["starts"]
        model = NGramModel(tokens, starts, orders, info)
        model.info["tables_s"] = time.perf_counter() - t0
        model.info["corpus"] = corpus or "python-docs"
        _MEMO[key] = model
        return model
