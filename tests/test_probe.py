"""The word-order probe (paper §5.3.4): its sequences, its scores and the CLI command."""

from __future__ import annotations

import pytest
import torch
import zoo

import influencer as inf
from influencer.probe import CONDITIONS, FRAMES, probe_sequences, word_order_probe


class _CharTokenizer:
    """A tokenizer of one id per character (enough for tokenize_texts / tokenize_queries)."""

    pad_token_id = 0
    eos_token_id = 0
    bos_token_id = None

    def __call__(self, texts, add_special_tokens=False, **_):
        return {"input_ids": [[1 + (ord(ch) % 60) for ch in t] for t in texts]}

    def encode(self, text, add_special_tokens=False):
        return [1 + (ord(ch) % 60) for ch in text]


def test_sequences_place_the_phrases_in_each_order_within_the_same_frames() -> None:
    seqs = probe_sequences("The capital of Zorvania is", " Quellmoor")
    assert list(seqs) == list(CONDITIONS)
    assert all(len(v) == len(FRAMES) for v in seqs.values())
    before, after = seqs["prompt→completion"][0], seqs["completion→prompt"][0]
    assert before.index("Zorvania") < before.index("Quellmoor") and after.index("Quellmoor") < after.index("Zorvania")
    assert "Quellmoor" not in seqs["prompt only"][0] and "Zorvania" not in seqs["completion only"][0]
    assert seqs["neither"][0] == " ".join(FRAMES[0])
    with pytest.raises(ValueError, match="non-empty"):
        probe_sequences("prompt", "  ")


def test_probe_scores_equal_pairwise_scores_of_its_sequences() -> None:
    from influencer.data import tokenize_queries, tokenize_texts

    tok = _CharTokenizer()
    model = zoo.tiny_llama(hidden=8, intermediate=12, vocab=64)
    task = inf.CausalLM()
    train = tokenize_texts(tok, ["abc def", "ghi jkl mno", "the capital is here", "quellmoor and zorvania"] * 3)
    curv = inf.fit_curvature(model, task, train, layers="all", progress=False)
    result = word_order_probe(model, task, curv, tok, "the capital of zor is", " quell")
    flat = [t for c in CONDITIONS for t in result.sequences[c]]
    expected = inf.pairwise_scores(
        model,
        task,
        curv,
        tokenize_queries(tok, ["the capital of zor is"], [" quell"]),
        tokenize_texts(tok, flat),
        progress=False,
    ).total[0]
    got = torch.tensor([v for c in CONDITIONS for v in result.influence[c]], dtype=torch.float64)
    torch.testing.assert_close(got, expected.to(torch.float64), rtol=1e-5, atol=1e-8)
    assert result.ratio == pytest.approx(result.mean("prompt→completion") / result.mean("completion→prompt"))
    assert not result.nats and "mean per copy (score)" in result.table()
    d = result.to_dict()
    assert set(d["means"]) == set(CONDITIONS) and d["n_train"] == curv.n_train
