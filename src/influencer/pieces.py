"""The text of each token, for token-level displays (heatmaps, snippets, completion splits)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"
_LONGEST_CHARACTER = 8  # tokens one character may span in a byte-level vocabulary (UTF-8 has ≤ 4 bytes)


def token_pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """One string per token id. Decoding each token alone turns a character split over several byte-level tokens
    (CJK, emoji, accented letters in some vocabularies) into ``"��"``; here the character goes to the token that
    completes it and the tokens before it get ``""``, so the pieces join to the decoded text."""
    ids = [int(t) for t in ids]
    out: list[str] = []
    start = 0
    for i in range(len(ids)):
        text = tokenizer.decode(ids[start : i + 1])
        incomplete = text.endswith(REPLACEMENT) and i + 1 < len(ids) and i + 1 - start < _LONGEST_CHARACTER
        if incomplete:
            out.append("")
            continue
        out.append(text)
        start = i + 1
    return out
