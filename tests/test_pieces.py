"""Token pieces for displays: a character split over several byte-level tokens is shown once, never as '��'."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
from tiny_hf import byte_bpe_tokenizer

from influencer.data import kjv_verses
from influencer.pieces import REPLACEMENT, token_pieces


@pytest.mark.parametrize("text", ["東京は日本の首都です", "party 🎉🎉 time", "café naïve", "In the beginning", ""])
def test_pieces_join_to_the_text_and_hold_no_replacement_character(text: str) -> None:
    tok = byte_bpe_tokenizer([v["text"] for v in kjv_verses(50)])
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = token_pieces(tok, ids)
    assert len(pieces) == len(ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any(REPLACEMENT in p for p in pieces)
    if any(ord(c) > 127 for c in text):  # the byte-level vocabulary splits these characters: some pieces are empty
        assert any(REPLACEMENT in tok.decode([i]) for i in ids) and "" in pieces
