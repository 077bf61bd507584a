"""BM25-style candidate prefilter (Grosse et al. 2023, §3.2.1, Eq. 28–29).

Before a full influence scan, each query keeps only the top-N training documents (paper: N = 10,000) under a
modified Okapi BM25 that uses *binary* term presence instead of term frequency:

    score(Q, D) = Σ_{t ∈ Q} (k1 + 1)·[t ∈ D] / (k1 + [t ∈ D]) · IDF(t),
    IDF(t)      = log((C − n_t + 0.5) / (n_t + 0.5) + 1),

with k1 = 1.5, C the number of documents and n_t the number of documents containing term t. A query term
counts once (Q is a set). With binary presence the per-term factor (k1 + 1)·f / (k1 + f) is 1 when f = 1 and
0 when f = 0, so the score is simply the IDF mass of the query terms the document contains; the code keeps
the general factor (see ``_saturate``) so a term-frequency variant is a one-line change.

Terms are integer ids (e.g. token ids). Documents and queries are accepted as

- a LongTensor ``[N, T]`` (a 1-D tensor ``[T]`` is one sequence) with an optional ``attention_mask`` ``[N, T]``
  (0 = padding);
- a list of 1-D integer sequences of varying lengths (lists, arrays or tensors);
- a dict ``{"input_ids", "attention_mask"}`` as produced by :func:`influencer.data.tokenize_texts`;
- a list of strings, when the index knows how to tokenize (built by :meth:`BM25Index.from_texts`).

Padding (mask 0) and the index's ``ignore_ids`` never count, in documents or in queries. Query ids that no
document contains (including ids ≥ ``vocab_size``) contribute nothing; a query with no known terms scores 0
against every document (its top-N is then documents ``0 .. N-1``). An empty corpus is an error.

    index = BM25Index(train["input_ids"], attention_mask=train["attention_mask"])
    top_idx, top_scores = index.top(queries, n=10_000, query_mask=completion_mask(queries))
    scan_over = index.candidates(queries, n=10_000)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, overload

import numpy as np
import scipy.sparse as sp
import torch

from influencer.prefilter_inputs import _and_masks, _flatten

__all__ = ["BM25Index", "completion_mask", "overlap", "regex_tokenize"]

K1 = 1.5
"""BM25 saturation constant used by the paper."""

_WORD = re.compile(r"\w+")
_CHUNK_ELEMENTS = 1 << 22  # dense [queries × documents] block size used by top(): 32 MiB of float64

Terms = Any
"""Documents or queries in any accepted format (see the module docstring)."""


def regex_tokenize(text: str) -> list[str]:
    """Lowercase word tokens of ``text`` (regex ``\\w+``), the default tokenizer of :meth:`BM25Index.from_texts`."""
    return _WORD.findall(text.lower())


def completion_mask(queries: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mask ``[Q, T]`` (LongTensor, 1 on completion tokens) for queries from :func:`influencer.data.tokenize_queries`.

    Pass it as ``query_mask`` to score only the completion. Uses ``prompt_length`` [Q] and ``attention_mask``.
    """
    ids = queries["input_ids"]
    attn = queries.get("attention_mask")
    attn = torch.ones_like(ids) if attn is None else attn
    positions = torch.arange(ids.shape[-1], device=ids.device)
    after_prompt = positions[None, :] >= queries["prompt_length"].to(ids.device)[:, None]
    return (after_prompt & (attn != 0)).long()


def _saturate(tf: np.ndarray, k1: float) -> np.ndarray:
    """BM25 per-term document factor (k1 + 1)·f / (k1 + f); with binary f ∈ {0, 1} it is exactly f."""
    return (k1 + 1.0) * tf / (k1 + tf)


def _binary_matrix(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """CSR matrix of the given shape with a 1 at each distinct (row, col) pair (duplicates collapse)."""
    if len(rows):
        key = np.sort(rows * shape[1] + cols)  # sort + diff: much faster than np.unique's hash path here
        key = key[np.concatenate(([True], key[1:] != key[:-1]))]
        rows, cols = key // shape[1], key % shape[1]
    data = np.ones(len(rows), dtype=np.int8)
    return sp.csr_matrix((data, (rows, cols)), shape=shape)


def _top_rows(scores: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row top ``m = min(n, C)`` of ``scores`` [Q, C]: (indices, values) [Q, m], by decreasing score, ties by
    lower column index. Selects with ``np.argpartition`` (O(C) per row) then sorts only the m survivors."""
    q, c = scores.shape
    m = min(n, c)
    if m == 0 or q == 0:
        return np.zeros((q, m), dtype=np.int64), np.zeros((q, m), dtype=scores.dtype)
    if m < c:
        kth = np.argpartition(-scores, m - 1, axis=1)[:, m - 1]
        threshold = scores[np.arange(q), kth][:, None]  # the m-th largest score of each row
        above = scores > threshold
        tied = scores == threshold
        need = m - above.sum(axis=1, keepdims=True)  # ties at the threshold admitted by lowest index
        keep = above | (tied & (np.cumsum(tied, axis=1) <= need))
        idx = np.nonzero(keep)[1].reshape(q, m)  # ascending column order within each row
    else:
        idx = np.broadcast_to(np.arange(c), (q, c))
    vals = np.take_along_axis(scores, idx, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")  # stable: equal scores keep ascending index
    return np.take_along_axis(idx, order, axis=1).astype(np.int64), np.take_along_axis(vals, order, axis=1)


class BM25Index:
    """Binary-presence BM25 index over a corpus of term-id sequences (Grosse et al. 2023, Eq. 28–29).

    Attributes:
        matrix: binary document-term matrix, ``scipy.sparse.csr_matrix`` [C, V] (int8, 1 = term present).
        doc_freq: n_t, ``np.ndarray`` [V] int64, documents containing each term.
        idf: ``np.ndarray`` [V] float64, log((C − n_t + 0.5) / (n_t + 0.5) + 1).
        num_docs: C. vocab_size: V (max id + 1, or the given ``vocab_size``).
        vocabulary: word → id for indexes built by :meth:`from_texts` with the regex tokenizer, else None.
    """

    def __init__(
        self,
        docs: Terms,
        *,
        attention_mask: Any = None,
        vocab_size: int | None = None,
        ignore_ids: Iterable[int] = (),
        k1: float = K1,
    ) -> None:
        """Index ``docs`` ([C, T] LongTensor + optional mask, list of 1-D id sequences, or tokenize_texts dict).

        Documents with no (unmasked, non-ignored) terms are allowed and score 0. Raises ValueError for an empty
        corpus, negative ids, or ids ≥ ``vocab_size``.
        """
        if k1 < 0:
            raise ValueError(f"k1 must be >= 0, got {k1}.")
        self.k1 = float(k1)
        self.ignore_ids = frozenset(int(i) for i in ignore_ids)
        self.vocabulary: dict[str, int] | None = None
        self._tokenizer: Callable[[list[str]], list[list[int]]] | None = None
        rows, ids, c = self._terms(docs, attention_mask, "docs", drop_ignored=False)
        if c == 0:
            raise ValueError("The corpus is empty; pass at least one document.")
        if vocab_size is None:
            vocab_size = int(ids.max()) + 1 if len(ids) else 0
        elif len(ids) and int(ids.max()) >= vocab_size:
            raise ValueError(f"docs contain id {int(ids.max())} but vocab_size={vocab_size}.")
        rows, ids, c = self._drop_ignored(rows, ids, c)
        self.num_docs = c
        self.vocab_size = int(vocab_size)
        self.matrix = _binary_matrix(rows, ids, (c, self.vocab_size))
        self.doc_freq = np.bincount(self.matrix.indices, minlength=self.vocab_size).astype(np.int64)
        n_t = self.doc_freq.astype(np.float64)
        self.idf = np.log((c - n_t + 0.5) / (n_t + 0.5) + 1.0)
        # Inverted index [V, C] holding the per-term document factor (k1+1)·f/(k1+f), f = [t ∈ D] (here 1 or 0).
        weighted = self.matrix.astype(np.float64)
        weighted.data = _saturate(weighted.data, self.k1)
        self._postings = weighted.T.tocsr()

    @classmethod
    def from_texts(
        cls,
        texts: Sequence[str],
        tokenizer: Any = None,
        *,
        ignore_ids: Iterable[int] = (),
        k1: float = K1,
    ) -> BM25Index:
        """Index raw strings. Without ``tokenizer``: lowercase ``\\w+`` words with a vocabulary built in order of
        first appearance (``index.vocabulary``; unseen query words are unknown terms). With a Hugging Face
        tokenizer: its ids (``add_special_tokens=False``), ``vocab_size = len(tokenizer)``. Queries may then be
        given as lists of strings."""
        if isinstance(texts, str):
            raise ValueError("texts must be a list of strings, not a single string.")
        texts = list(texts)
        if tokenizer is None:
            vocabulary: dict[str, int] = {}
            docs = [[vocabulary.setdefault(w, len(vocabulary)) for w in regex_tokenize(t)] for t in texts]
            index = cls(docs, vocab_size=len(vocabulary), ignore_ids=ignore_ids, k1=k1)
            index.vocabulary = vocabulary
            index._tokenizer = lambda qs: [[vocabulary.get(w, -1) for w in regex_tokenize(q)] for q in qs]
            return index

        def encode(qs: list[str]) -> list[list[int]]:
            return [list(ids) for ids in tokenizer(list(qs), add_special_tokens=False)["input_ids"]] if qs else []

        size = len(tokenizer) if hasattr(tokenizer, "__len__") else None
        index = cls(encode(texts), vocab_size=size, ignore_ids=ignore_ids, k1=k1)
        index._tokenizer = encode
        return index

    # ------------------------------------------------------------------------------------------------ inputs

    def _terms(
        self, seqs: Terms, mask: Any, what: str, *, drop_ignored: bool = True
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """(row, id) pairs of the counted tokens of ``seqs``: unmasked, id ≥ 0, not in ``ignore_ids``."""
        if isinstance(seqs, Mapping):
            if "input_ids" not in seqs:
                raise ValueError(f"{what} dict has no 'input_ids'.")
            if mask is not None and seqs.get("attention_mask") is not None:
                raise ValueError(f"Pass the mask of {what} inside the dict or as attention_mask, not both.")
            mask = seqs.get("attention_mask") if mask is None else mask
            seqs = seqs["input_ids"]
        if isinstance(seqs, Sequence) and len(seqs) and all(isinstance(s, str) for s in seqs):
            if self._tokenizer is None:
                raise ValueError(f"{what} are strings but this index was not built by from_texts.")
            if mask is not None:
                raise ValueError(f"A mask cannot be given with string {what}.")
            ids = self._tokenizer(list(seqs))
            rows, terms, n = _flatten(ids, None, what)
            known = terms >= 0  # the regex vocabulary maps unseen words to -1
            rows, terms = rows[known], terms[known]
        else:
            rows, terms, n = _flatten(seqs, mask, what)
            if len(terms) and int(terms.min()) < 0:
                raise ValueError(f"{what} contain a negative id ({int(terms.min())}) outside the mask.")
        return self._drop_ignored(rows, terms, n) if drop_ignored else (rows, terms, n)

    def _drop_ignored(self, rows: np.ndarray, terms: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, int]:
        if self.ignore_ids and len(terms):
            keep = ~np.isin(terms, np.fromiter(self.ignore_ids, dtype=np.int64))
            rows, terms = rows[keep], terms[keep]
        return rows, terms, n

    def query_matrix(self, queries: Terms, *, attention_mask: Any = None, query_mask: Any = None) -> sp.csr_matrix:
        """Sparse [Q, V] float64 matrix: IDF(t) at each distinct known term t of each query (a term counts once).

        ``attention_mask`` (or the dict's) marks padding; ``query_mask`` (same layout as the ids) further
        restricts which tokens count, e.g. :func:`completion_mask` for completion-only causal-LM queries.
        """
        if query_mask is not None:
            if isinstance(queries, Mapping):
                base = queries.get("attention_mask") if attention_mask is None else attention_mask
                queries = {"input_ids": queries["input_ids"]}
            else:
                base = attention_mask
            attention_mask = query_mask if base is None else _and_masks(base, query_mask)
        rows, terms, q = self._terms(queries, attention_mask, "queries")
        known = terms < self.vocab_size  # ids no document could contain score 0; drop them
        binary = _binary_matrix(rows[known], terms[known], (q, self.vocab_size)).astype(np.float64)
        binary.data *= self.idf[binary.indices]
        return binary

    # ------------------------------------------------------------------------------------------------ scoring

    def scores(self, queries: Terms, *, attention_mask: Any = None, query_mask: Any = None) -> np.ndarray:
        """BM25 scores ``np.ndarray`` [Q, C] float64 (Eq. 28). Queries take the same formats as documents.

        Computed as one sparse product: query matrix [Q, V] (IDF weights) @ inverted index [V, C] (per-term
        factor (k1+1)·f/(k1+f), which is 1 for a present term under binary presence).
        """
        qm = self.query_matrix(queries, attention_mask=attention_mask, query_mask=query_mask)
        return self._score_matrix(qm)

    def _score_matrix(self, qm: sp.csr_matrix) -> np.ndarray:
        return np.asarray((qm @ self._postings).toarray(), dtype=np.float64)

    def top(
        self, queries: Terms, n: int = 10_000, *, attention_mask: Any = None, query_mask: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top ``m = min(n, C)`` documents per query: (indices LongTensor [Q, m], scores float64 Tensor [Q, m]),
        by decreasing score, ties broken by lower document index (deterministic). Scores dense blocks of
        queries at a time so memory stays bounded for large C."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}.")
        qm = self.query_matrix(queries, attention_mask=attention_mask, query_mask=query_mask)
        step = max(1, _CHUNK_ELEMENTS // self.num_docs)
        m = min(n, self.num_docs)
        idx = np.zeros((qm.shape[0], m), dtype=np.int64)
        val = np.zeros((qm.shape[0], m), dtype=np.float64)
        for start in range(0, qm.shape[0], step):
            block = self._score_matrix(qm[start : start + step])
            idx[start : start + step], val[start : start + step] = _top_rows(block, m)
        return torch.from_numpy(idx), torch.from_numpy(val)

    @overload
    def candidates(
        self,
        queries: Terms,
        n: int = ...,
        *,
        attention_mask: Any = ...,
        query_mask: Any = ...,
        per_query: Literal[False] = ...,
    ) -> torch.Tensor: ...

    @overload
    def candidates(
        self,
        queries: Terms,
        n: int = ...,
        *,
        attention_mask: Any = ...,
        query_mask: Any = ...,
        per_query: Literal[True],
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def candidates(
        self,
        queries: Terms,
        n: int = 10_000,
        *,
        attention_mask: Any = None,
        query_mask: Any = None,
        per_query: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Sorted union (LongTensor [K]) of the per-query top-n documents: the documents a scan must score.

        With ``per_query=True`` returns ``(union, indices)`` where ``indices`` [Q, min(n, C)] are the per-query
        lists from :meth:`top` (each query's candidates, best first).
        """
        indices, _ = self.top(queries, n, attention_mask=attention_mask, query_mask=query_mask)
        union = torch.unique(indices)  # sorted ascending
        return (union, indices) if per_query else union

    def __repr__(self) -> str:
        return f"BM25Index(num_docs={self.num_docs}, vocab_size={self.vocab_size}, nnz={self.matrix.nnz}, k1={self.k1})"


def overlap(filtered_top: Sequence[int] | torch.Tensor, unfiltered_top: Sequence[int] | torch.Tensor) -> float:
    """Fraction of the unfiltered top-k documents that the prefiltered run also found: |F ∩ U| / |U| (sets).

    The paper warns the BM25 filter biases which documents are found; a scan reports this when both runs exist.
    Raises ValueError when ``unfiltered_top`` is empty.
    """
    found = set(np.asarray(filtered_top, dtype=np.int64).reshape(-1).tolist())
    wanted = set(np.asarray(unfiltered_top, dtype=np.int64).reshape(-1).tolist())
    if not wanted:
        raise ValueError("unfiltered_top is empty; overlap is undefined.")
    return len(found & wanted) / len(wanted)
