"""Which windows of a split a cache keeps, and in which order: windows sampled across documents.

Every window gets a **rank**: a 64-bit hash of ``(seed, its document's id, its number within
that document)``. A split's windows are stored in rank order (cache format 2), so any prefix of
a split -- what ``max_tokens`` keeps, and what a reader taking the first windows in order sees
(e.g. an evaluation capped at ``eval_max_tokens``) -- is a sample drawn across all of the split's
documents, not the first documents of the corpus.

Properties (tested in ``tests/test_window_sampling.py``):

* deterministic: a function of the seed, the document ids and the tokenization only;
* stable when documents are added: a window's rank depends on its own document's id and number
  alone, so a new document's windows slot in between the others, and a capped split only trades
  its highest-ranked windows for the new document's lower-ranked ones;
* nested: a larger ``max_tokens`` keeps a superset of the windows a smaller one keeps.

The budget of each split is ``max_tokens`` in proportion to the split fractions (val
``round(max_tokens * val_fraction)``, test likewise, train the rest); a split keeps the shortest
prefix of its ranked windows holding at least its budget of real tokens (or all of them).
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _document_hash(seed: int, doc_key: str) -> int:
    digest = hashlib.sha256(f"sae-sweep windows\0{seed}\0{doc_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, element-wise on uint64 (wrapping arithmetic)."""
    z = z ^ (z >> np.uint64(30))
    z = z * _MIX1
    z = z ^ (z >> np.uint64(27))
    z = z * _MIX2
    return z ^ (z >> np.uint64(31))


def window_numbers(doc_index: np.ndarray) -> np.ndarray:
    """The number of each window within its document (0, 1, ...), for windows whose documents
    are contiguous runs of ``doc_index`` (as :class:`WindowedTextDataset` lays them out)."""
    doc_index = np.asarray(doc_index)
    n = len(doc_index)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, doc_index[1:] != doc_index[:-1]])
    lengths = np.diff(np.r_[starts, n])
    return np.arange(n, dtype=np.int64) - np.repeat(starts, lengths)


def window_ranks(doc_keys: Sequence[str], doc_index: np.ndarray, seed: int) -> np.ndarray:
    """uint64 rank of every window: window i belongs to document ``doc_keys[doc_index[i]]``
    (its stable id) and is number ``window_numbers(doc_index)[i]`` in it."""
    doc_index = np.asarray(doc_index, dtype=np.int64)
    per_doc = np.array([_document_hash(seed, str(k)) for k in doc_keys], dtype=np.uint64)
    numbers = window_numbers(doc_index).astype(np.uint64)
    with np.errstate(over="ignore"):
        return _mix64(per_doc[doc_index] + (numbers + np.uint64(1)) * _GOLDEN)


def rank_order(doc_keys: Sequence[str], doc_index: np.ndarray, seed: int) -> np.ndarray:
    """The permutation that puts windows in rank order (ties, which a 64-bit hash practically
    never has, broken by document id and window number)."""
    doc_index = np.asarray(doc_index, dtype=np.int64)
    if len(doc_index) == 0:
        return np.zeros(0, dtype=np.int64)
    ranks = window_ranks(doc_keys, doc_index, seed)
    key_order = np.argsort(np.asarray([str(k) for k in doc_keys], dtype=object), kind="stable")
    doc_rank = np.empty(len(doc_keys), dtype=np.int64)
    doc_rank[key_order] = np.arange(len(doc_keys))
    return np.lexsort((window_numbers(doc_index), doc_rank[doc_index], ranks))


def split_budgets(max_tokens: int, val_fraction: float, test_fraction: float) -> dict[str, int]:
    """Real tokens each split may keep under ``max_tokens`` (val and test in proportion to their
    fractions, train the rest)."""
    val = int(round(max_tokens * val_fraction))
    test = int(round(max_tokens * test_fraction))
    return {"train": max_tokens - val - test, "val": val, "test": test}


def prefix_for_budget(tokens_per_window: np.ndarray, budget: int) -> int:
    """How many leading windows to keep: the shortest prefix holding at least ``budget`` real
    tokens (all windows when they hold fewer; none for a budget of 0)."""
    if budget <= 0:
        return 0
    counts = np.cumsum(tokens_per_window)
    return min(len(counts), int(np.searchsorted(counts, budget, side="left")) + 1)
