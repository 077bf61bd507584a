"""Queries from files: :func:`read_queries` reads a JSON Lines file of ``{"prompt", "completion"}`` objects and
:func:`encode_queries` tokenizes them into the engine's query batch (optionally through the tokenizer's chat
template, under an explicit truncation policy), with a :class:`QueryReport` of what was done."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from influencer.data.documents import TRUNCATION, DataError, _existing, _json_lines, _string_field
from influencer.data.tokenizing import _bos_ids, _check_max_length, _encode, _pad_id, _right_pad

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def read_queries(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Queries from a JSON Lines file of ``{"prompt": ..., "completion": ...}`` objects.

    Returns ``[{"prompt", "completion", "source"}]`` (source = ``file.jsonl:LINE``). A bad line, a missing or
    non-string field, or an empty completion raises :class:`DataError` naming file and line.
    """
    p = _existing(path)
    if p.is_dir():
        raise DataError(f"{p}: is a folder, not a JSON Lines file of queries")
    queries = []
    for lineno, obj in _json_lines(p):
        where = f"{p}:{lineno}"
        prompt, completion = _string_field(obj, "prompt", where), _string_field(obj, "completion", where)
        if not completion.strip():
            raise DataError(f"{where}: empty completion; a query measures log p(completion | prompt), so give one")
        queries.append({"prompt": prompt, "completion": completion, "source": f"{p.name}:{lineno}"})
    if not queries:
        raise DataError(f'{p}: no queries (expected lines like {{"prompt": "...", "completion": "..."}})')
    return queries


@dataclass
class QueryReport:
    """What :func:`encode_queries` did."""

    queries: int
    tokens: int
    completion_tokens: int
    truncated: int
    max_length: int | None
    truncation: str
    chat_template: bool

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def summary(self) -> str:
        text = f"{self.queries} queries, {self.completion_tokens} completion tokens"
        if self.chat_template:
            text += ", chat template applied"
        if self.truncated:
            side = "the start of the prompt" if self.truncation == "left" else "the end of the completion"
            text += f"; {self.truncated} longer than {self.max_length} tokens lost {side}"
        return text


def encode_queries(
    tokenizer: PreTrainedTokenizerBase,
    queries: Sequence[Mapping[str, str]],
    *,
    max_length: int | None = None,
    truncation: str = "error",
    chat_template: bool = False,
    system: str | None = None,
    add_bos: bool = False,
) -> tuple[dict[str, torch.Tensor], QueryReport]:
    """Tokenize ``[{"prompt", "completion"}]`` into the engine's query batch (see :func:`tokenize_queries`).

    ``chat_template``: the prompt becomes the tokenizer's chat template applied to one user message (after an
    optional ``system`` message) with the generation prompt, so the completion is the assistant's reply.
    A query longer than ``max_length`` is refused (``truncation="error"``), loses the start of its prompt
    (``"left"``) or the end of its completion (``"right"``). Empty prompts or completions are errors.
    """
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation must be one of {TRUNCATION}, got {truncation!r}")
    _check_max_length(max_length)
    if not queries:
        raise DataError("no queries given")
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template; ask without the chat template")
    prompts, completions, names = [], [], []
    for q, query in enumerate(queries):
        name = str(query.get("source") or f"query {q + 1}")
        for key in ("prompt", "completion"):
            if not isinstance(query.get(key), str):
                raise DataError(f"{name}: {key!r} must be a string")
        if not query["completion"].strip():
            raise DataError(f"{name}: empty completion; a query measures log p(completion | prompt), so give one")
        prompt = query["prompt"]
        if chat_template:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}
            ]
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompts.append(prompt)
        completions.append(query["completion"])
        names.append(name)
    bos = _bos_ids(tokenizer, add_bos)
    rows, prompt_lengths, truncated = [], [], 0
    for name, p_ids, c_ids in zip(names, _encode(tokenizer, prompts), _encode(tokenizer, completions), strict=True):
        p_ids = bos + p_ids
        if len(p_ids) == len(bos):
            raise DataError(f"{name}: empty prompt (no tokens)")
        if not c_ids:
            raise DataError(f"{name}: the completion has no tokens")
        n = len(p_ids) + len(c_ids)
        if max_length is not None and n > max_length:
            if truncation == "error":
                raise DataError(
                    f"{name} has {n} tokens, more than max length {max_length}; raise the max length or "
                    "truncate ('left' drops the start of the prompt, 'right' the end of the completion)"
                )
            if truncation == "left":
                keep = max_length - len(c_ids) - len(bos)
                if keep < 1:
                    raise DataError(
                        f"{name}: its completion alone has {len(c_ids)} tokens, no room for the prompt "
                        f"within max length {max_length}"
                    )
                p_ids = bos + p_ids[len(p_ids) - keep :]
            else:
                if len(p_ids) >= max_length:
                    raise DataError(
                        f"{name}: its prompt alone has {len(p_ids)} tokens, no room for the completion "
                        f"within max length {max_length}"
                    )
                c_ids = c_ids[: max_length - len(p_ids)]
            truncated += 1
        rows.append(p_ids + c_ids)
        prompt_lengths.append(len(p_ids))
    input_ids, attention_mask = _right_pad(rows, _pad_id(tokenizer))
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "prompt_length": torch.tensor(prompt_lengths, dtype=torch.long),
    }
    report = QueryReport(
        len(rows),
        int(attention_mask.sum()),
        sum(len(r) - p for r, p in zip(rows, prompt_lengths, strict=True)),
        truncated,
        max_length,
        truncation,
        chat_template,
    )
    return batch, report
