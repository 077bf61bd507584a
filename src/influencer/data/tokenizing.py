"""Tokenizing texts and queries into the engine's right-padded batches (:func:`tokenize_texts`,
:func:`tokenize_queries`), splitting verses into (prompt, completion) queries (:func:`split_verse_queries`),
and the shared helpers (text checks, encoding without special tokens, pad / BOS ids, right padding) that the
sequence and query-file modules build on."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def _check_texts(texts: Any, what: str) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"{what} must be a list of strings, got {type(texts).__name__}.")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{what}[{i}] must be a string, got {type(text).__name__}.")
    return list(texts)


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    raise ValueError(
        "The tokenizer has neither a pad token nor an EOS token; set one, e.g. tokenizer.pad_token = '<pad>'."
    )


def _bos_ids(tokenizer: PreTrainedTokenizerBase, add_bos: bool) -> list[int]:
    if not add_bos:
        return []
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise ValueError("add_bos=True but the tokenizer has no BOS token; pass add_bos=False.")
    return [int(bos)]


def _check_max_length(max_length: int | None) -> None:
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be a positive integer or None, got {max_length!r}.")


def _cut(rows: list[list[int]], max_length: int, what: str, how: str) -> list[list[int]]:
    """Rows cut to ``max_length`` tokens, warning how many of the ``what`` were longer (``how``: what was lost)."""
    truncated = sum(len(r) > max_length for r in rows)
    if truncated:
        warnings.warn(
            f"{truncated} of {len(rows)} {what} were longer than max_length={max_length} tokens{how}", stacklevel=3
        )
    return [r[:max_length] for r in rows]


def _right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists → (input_ids [N, T], attention_mask [N, T]), both int64, T = longest row."""
    width = max((len(r) for r in rows), default=0)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask


def tokenize_texts(
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    *,
    max_length: int | None = None,
    add_bos: bool = False,
) -> dict[str, torch.Tensor]:
    """Tokenize training texts into a right-padded batch.

    Returns ``{"input_ids": LongTensor [N, T], "attention_mask": LongTensor [N, T]}`` with T the longest row
    (at most ``max_length``, which counts the BOS token when ``add_bos``). Padding uses the tokenizer's pad id
    (its EOS id when it has none); the mask is 1 on real tokens. Texts longer than ``max_length`` are cut at
    the end and a single warning says how many were cut. A text with no tokens is an error.
    """
    texts = _check_texts(texts, "texts")
    if not texts:
        raise ValueError("texts is empty; pass at least one string.")
    _check_max_length(max_length)
    bos = _bos_ids(tokenizer, add_bos)
    rows = [bos + ids for ids in _encode(tokenizer, texts)]
    for i, (text, ids) in enumerate(zip(texts, rows, strict=True)):
        if len(ids) == len(bos):
            raise ValueError(f"texts[{i}] has no tokens ({text!r}); drop empty texts before tokenizing.")
    if max_length is not None:
        rows = _cut(rows, max_length, "texts", " and were truncated at the end.")
    input_ids, attention_mask = _right_pad(rows, _pad_id(tokenizer))
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def tokenize_queries(
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    completions: list[str],
    *,
    max_length: int | None = None,
    add_bos: bool = False,
) -> dict[str, torch.Tensor]:
    """Tokenize (prompt, completion) queries into a right-padded batch with an exact boundary between them.

    Prompt and completion are tokenized separately and their ids concatenated, so row q holds
    ``[bos?] + ids(prompt_q) + ids(completion_q)``. Returns ``{"input_ids": LongTensor [Q, T],
    "attention_mask": LongTensor [Q, T], "prompt_length": LongTensor [Q]}``; ``prompt_length`` counts the
    BOS token when ``add_bos``. Completion tokens are positions
    ``prompt_length[q] .. attention_mask[q].sum() - 1``.
    ``max_length`` cuts rows at the end (the completion's tail) with a warning; a query whose prompt or
    completion has no tokens (before or after truncation) is an error naming its index.

    Note: tokenizing the completion on its own keeps the boundary exact but can differ from tokenizing the
    joined string; for BPE tokenizers start completions with their leading space (``" Paris"``).
    """
    prompts = _check_texts(prompts, "prompts")
    completions = _check_texts(completions, "completions")
    if len(prompts) != len(completions):
        raise ValueError(f"Got {len(prompts)} prompts but {len(completions)} completions; pass one of each.")
    if not prompts:
        raise ValueError("No queries given; pass at least one prompt and completion.")
    _check_max_length(max_length)
    bos = _bos_ids(tokenizer, add_bos)
    prompt_ids = [bos + ids for ids in _encode(tokenizer, prompts)]
    completion_ids = _encode(tokenizer, completions)
    for q, (p_ids, c_ids) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        if len(p_ids) == len(bos):
            raise ValueError(f"Query {q} has an empty prompt ({prompts[q]!r} gives no tokens).")
        if not c_ids:
            raise ValueError(f"Query {q} has an empty completion ({completions[q]!r} gives no tokens).")
    rows = [p + c for p, c in zip(prompt_ids, completion_ids, strict=True)]
    if max_length is not None:
        for q, p_ids in enumerate(prompt_ids):
            if len(p_ids) >= max_length:
                raise ValueError(
                    f"Query {q}: its prompt has {len(p_ids)} tokens, so max_length={max_length} leaves no "
                    "room for the completion; shorten the prompt or raise max_length."
                )
        rows = _cut(rows, max_length, "queries", "; their completions were truncated at the end.")
    input_ids, attention_mask = _right_pad(rows, _pad_id(tokenizer))
    prompt_length = torch.tensor([len(p) for p in prompt_ids], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "prompt_length": prompt_length}


# ---------------------------------------------------------------------------------------------------- queries

_BOUNDARY = re.compile(r"(?<=\S)\s+(?=\S)")


def split_verse_queries(texts: list[str]) -> tuple[list[str], list[str]]:
    """Split each text at the word boundary nearest its middle → (prompts, completions).

    The completion keeps the whitespace, e.g. ``"In the beginning God created"`` and
    ``" the heaven and the earth."``, so ``prompt + completion == text``. Ties go to the earlier boundary.
    A text with a single word cannot be split (ValueError naming its index).
    """
    texts = _check_texts(texts, "texts")
    prompts: list[str] = []
    completions: list[str] = []
    for i, text in enumerate(texts):
        cuts = [m.start() for m in _BOUNDARY.finditer(text)]
        if not cuts:
            raise ValueError(f"texts[{i}] has fewer than two words and cannot be split: {text!r}.")
        middle = len(text) / 2
        cut = min(cuts, key=lambda c: abs(c - middle))
        prompts.append(text[:cut])
        completions.append(text[cut:])
    return prompts, completions
