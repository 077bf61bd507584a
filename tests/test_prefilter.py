"""Tests for influencer.prefilter: binary-presence BM25 (Grosse et al. 2023, Eq. 28–29) against brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from influencer.prefilter import BM25Index, _top_rows, completion_mask, overlap

K1 = 1.5


def brute_scores(docs: list[list[int]], queries: list[list[int]], k1: float = K1) -> list[list[float]]:
    """Eq. 28–29 in pure Python: loops over documents and query terms, with sets."""
    doc_sets = [set(d) for d in docs]
    c = len(docs)
    out = []
    for q in queries:
        row = []
        for d in doc_sets:
            total = 0.0
            for t in set(q):
                n_t = sum(t in e for e in doc_sets)
                idf = math.log((c - n_t + 0.5) / (n_t + 0.5) + 1)
                f = 1.0 if t in d else 0.0
                total += (k1 + 1) * f / (k1 + f) * idf
            row.append(total)
        out.append(row)
    return out


def brute_top(scores: np.ndarray, n: int) -> list[list[int]]:
    """Per-row top-n by decreasing score, ties by lower index (full sort)."""
    return [sorted(range(len(r)), key=lambda j, r=r: (-r[j], j))[:n] for r in scores.tolist()]


def assert_close(actual: np.ndarray, expected: list[list[float]]) -> None:
    expected_arr = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected_arr.shape
    assert actual.dtype == np.float64
    err = np.abs(actual - expected_arr)
    assert np.all(err <= 1e-12 * np.maximum(np.abs(expected_arr), 1e-300) + 1e-300), err.max()


TOY_DOCS = [[1, 2, 3], [2, 2, 4], [5], [1, 4, 4, 6], [2, 3, 7, 7]]
TOY_QUERIES = [[2, 3], [4, 4, 4], [1, 7, 9], [5, 6], [8]]


# --------------------------------------------------------------------------------------------------- scores


def test_toy_corpus_matches_brute_force():
    index = BM25Index(TOY_DOCS)
    assert index.num_docs == 5 and index.vocab_size == 8
    assert isinstance(index.matrix, sp.csr_matrix) and index.matrix.shape == (5, 8)
    assert set(np.unique(index.matrix.data).tolist()) == {1}  # binary: repeated terms collapse
    np.testing.assert_array_equal(index.doc_freq, [0, 2, 3, 2, 2, 1, 1, 1])
    n_t = index.doc_freq.astype(float)
    np.testing.assert_allclose(index.idf, np.log((5 - n_t + 0.5) / (n_t + 0.5) + 1), rtol=0, atol=0)
    assert_close(index.scores(TOY_QUERIES), brute_scores(TOY_DOCS, TOY_QUERIES))


def test_hand_computed_score():
    # Query {2, 3} against doc [1, 2, 3]: IDF(2) + IDF(3), n_2 = 3, n_3 = 2, C = 5.
    expected = math.log(2.5 / 3.5 + 1) + math.log(3.5 / 2.5 + 1)
    assert BM25Index(TOY_DOCS).scores([[2, 3, 3]])[0, 0] == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize("seed", range(12))
def test_random_corpora_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    c, vocab = int(rng.integers(1, 40)), int(rng.integers(1, 30))
    docs = [rng.integers(0, vocab, size=int(rng.integers(0, 12))).tolist() for _ in range(c)]
    queries = [
        rng.integers(0, vocab + 5, size=int(rng.integers(0, 8))).tolist() for _ in range(int(rng.integers(1, 6)))
    ]
    index = BM25Index(docs)
    expected = brute_scores(docs, queries)
    assert_close(index.scores(queries), expected)
    for n in (1, 3, c, c + 7):
        idx, val = index.top(queries, n)
        assert idx.dtype == torch.long and val.dtype == torch.float64 and idx.shape == (len(queries), min(n, c))
        assert idx.tolist() == brute_top(np.asarray(expected), n)
        assert_close(val.numpy(), np.take_along_axis(np.asarray(expected), idx.numpy(), axis=1).tolist())


def test_input_formats_agree():
    ids = torch.tensor([[1, 2, 3, 0], [2, 2, 4, 0], [5, 0, 0, 0], [1, 4, 4, 6], [2, 3, 7, 7]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]])
    ref = BM25Index(TOY_DOCS).scores(TOY_QUERIES)
    as_tensor = BM25Index(ids, attention_mask=mask)
    as_dict = BM25Index({"input_ids": ids, "attention_mask": mask})
    as_arrays = BM25Index([np.asarray(d) for d in TOY_DOCS])
    for index in (as_tensor, as_dict, as_arrays):
        np.testing.assert_array_equal(index.scores(TOY_QUERIES), ref)
    q_ids = torch.tensor([[2, 3, 0], [4, 4, 4], [1, 7, 9], [5, 6, 0], [8, 0, 0]])
    q_mask = (q_ids != 0).long()
    np.testing.assert_array_equal(as_tensor.scores(q_ids, attention_mask=q_mask), ref)
    np.testing.assert_array_equal(as_tensor.scores({"input_ids": q_ids, "attention_mask": q_mask}), ref)
    np.testing.assert_array_equal(as_tensor.scores(torch.tensor([2, 3])), ref[:1])  # 1-D = one query


# ------------------------------------------------------------------------------------------ masks and ignores


def test_padding_and_ignore_ids_do_not_count():
    pad, bos = 0, 99
    docs = torch.tensor([[bos, 1, 2, pad, pad], [bos, 2, 3, 3, pad], [bos, 4, pad, pad, pad]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    index = BM25Index(docs, attention_mask=mask, ignore_ids=[bos])
    assert index.doc_freq[pad] == 0 and index.doc_freq[bos] == 0
    clean = [[1, 2], [2, 3, 3], [4]]
    queries = torch.tensor([[bos, 2, pad], [bos, 4, 1]])
    qmask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert_close(index.scores(queries, attention_mask=qmask), brute_scores(clean, [[2], [4, 1]]))
    # Without the mask, pad id 0 is a term no document contains: it still scores nothing.
    assert_close(index.scores(queries), brute_scores(clean, [[2], [4, 1]]))


def test_query_mask_completion_only():
    index = BM25Index(TOY_DOCS)
    queries = {
        "input_ids": torch.tensor([[1, 5, 2, 3], [4, 6, 7, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
        "prompt_length": torch.tensor([2, 1]),
    }
    cmask = completion_mask(queries)
    assert cmask.tolist() == [[0, 0, 1, 1], [0, 1, 1, 0]]
    expected = brute_scores(TOY_DOCS, [[2, 3], [6, 7]])
    assert_close(index.scores(queries, query_mask=cmask), expected)
    assert_close(
        index.scores(queries["input_ids"], attention_mask=queries["attention_mask"], query_mask=cmask), expected
    )
    ragged = [[1, 5, 2, 3], [4, 6, 7]]
    assert_close(index.scores(ragged, query_mask=[[0, 0, 1, 1], [0, 1, 1]]), expected)


# ----------------------------------------------------------------------------------------------------- top-N


def test_top_deterministic_ties_and_partition_path():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(6, 2000)).astype(np.float64)  # heavy ties at every threshold
    for n in (1, 5, 499, 1999, 2000, 5000):
        idx, val = _top_rows(scores, n)
        assert idx.tolist() == brute_top(scores, n)
        np.testing.assert_array_equal(val, np.take_along_axis(scores, idx, axis=1))


def test_top_ties_by_lower_document_index():
    docs = [[1], [2], [1], [1, 2], [3], [1]]
    idx, val = BM25Index(docs).top([[1]], n=3)
    assert idx.tolist() == [[0, 2, 3]]
    assert val[0, 0] == val[0, 2] > 0
    idx, _ = BM25Index(docs).top([[1]], n=10)
    assert idx.tolist() == [[0, 2, 3, 5, 1, 4]]


def test_top_chunks_queries(monkeypatch):
    import influencer.prefilter as prefilter

    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 20, size=6).tolist() for _ in range(50)]
    queries = [rng.integers(0, 20, size=4).tolist() for _ in range(7)]
    index = BM25Index(docs)
    ref_idx, ref_val = index.top(queries, n=10)
    monkeypatch.setattr(prefilter, "_CHUNK_ELEMENTS", 120)  # 2 queries per block
    idx, val = index.top(queries, n=10)
    assert torch.equal(idx, ref_idx) and torch.equal(val, ref_val)


def test_candidates_union_and_per_query():
    index = BM25Index(TOY_DOCS)
    union = index.candidates(TOY_QUERIES, n=2)
    per = index.top(TOY_QUERIES, n=2)[0]
    assert union.dtype == torch.long
    assert union.tolist() == sorted(set(per.reshape(-1).tolist()))
    union2, per2 = index.candidates(TOY_QUERIES, n=2, per_query=True)
    assert torch.equal(union2, union) and torch.equal(per2, per)


# ------------------------------------------------------------------------------------------------ from_texts


def test_from_texts_regex_tokenizer():
    texts = ["In the beginning God created", "the heaven and the earth.", "And God said, Let there be light"]
    index = BM25Index.from_texts(texts)
    assert index.vocabulary is not None and index.vocabulary["in"] == 0 and "god" in index.vocabulary
    words = [[index.vocabulary[w] for w in t.lower().replace(",", " ").replace(".", " ").split()] for t in texts]
    queries = ["GOD said", "heaven, earth!", "unknown words only"]
    q_ids = [
        [index.vocabulary.get(w, 10_000) for w in q.lower().replace(",", "").replace("!", "").split()] for q in queries
    ]
    assert_close(index.scores(queries), brute_scores(words, q_ids))
    assert index.top(["God"], n=2)[0].tolist() == [[0, 2]]


def test_from_texts_with_tokenizer():
    class CharTokenizer:
        """Minimal HF-like tokenizer: one id per lowercase letter."""

        def __len__(self) -> int:
            return 26

        def __call__(self, texts, add_special_tokens=True):
            assert add_special_tokens is False
            return {"input_ids": [[ord(ch) - 97 for ch in t.lower() if ch.isalpha()] for t in texts]}

    texts = ["abc", "bcd", "xyz"]
    index = BM25Index.from_texts(texts, tokenizer=CharTokenizer())
    assert index.vocab_size == 26 and index.vocabulary is None
    docs = [[ord(ch) - 97 for ch in t] for t in texts]
    assert_close(index.scores(["ad", "z"]), brute_scores(docs, [[0, 3], [25]]))


# ------------------------------------------------------------------------------------------------ edge cases


def test_query_with_no_known_terms_scores_zero():
    index = BM25Index(TOY_DOCS, ignore_ids=[3])
    scores = index.scores([[], [100, 200], [0], [3]])
    np.testing.assert_array_equal(scores, np.zeros((4, 5)))
    assert index.top([[100]], n=3)[0].tolist() == [[0, 1, 2]]
    assert index.scores(torch.zeros((0, 4), dtype=torch.long)).shape == (0, 5)


def test_errors():
    with pytest.raises(ValueError, match="empty"):
        BM25Index([])
    with pytest.raises(ValueError, match="empty"):
        BM25Index(torch.zeros((0, 3), dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        BM25Index.from_texts([])
    with pytest.raises(ValueError, match="negative"):
        BM25Index([[1, -2]])
    with pytest.raises(ValueError, match="vocab_size"):
        BM25Index([[1, 5]], vocab_size=5)
    with pytest.raises(ValueError, match="integer"):
        BM25Index(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="shape"):
        BM25Index(torch.tensor([[1, 2]]), attention_mask=torch.tensor([[1, 1, 1]]))
    with pytest.raises(ValueError, match="flat list"):
        BM25Index(TOY_DOCS).scores([1, 2])
    with pytest.raises(ValueError, match="from_texts"):
        BM25Index(TOY_DOCS).scores(["words"])
    with pytest.raises(ValueError, match="n must be"):
        BM25Index(TOY_DOCS).top(TOY_QUERIES, n=0)
    # An all-padding document is fine: it is a document that scores 0.
    index = BM25Index(torch.tensor([[1, 2], [3, 4]]), attention_mask=torch.tensor([[1, 1], [0, 0]]))
    assert index.num_docs == 2 and index.scores([[3]]).tolist() == [[0.0, 0.0]]


# --------------------------------------------------------------------------------------------------- overlap


def test_overlap():
    assert overlap([1, 2, 3, 4], [4, 3, 9, 8]) == 0.5
    assert overlap(torch.tensor([5, 6]), torch.tensor([6, 5])) == 1.0
    assert overlap([], [1, 2]) == 0.0
    with pytest.raises(ValueError, match="empty"):
        overlap([1], [])
