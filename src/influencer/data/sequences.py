"""Training sequences from documents (:func:`make_sequences`): one per document or packed into fixed-length
sequences, under an explicit truncation policy, with a :class:`SequenceReport` of what was done; and
:func:`sequence_digest`, the hash that identifies a tokenized training set."""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from influencer.data.documents import TRUNCATION, DataError, Documents
from influencer.data.tokenizing import _bos_ids, _check_max_length, _check_texts, _encode, _pad_id, _right_pad

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class SequenceReport:
    """What :func:`make_sequences` did: counts of documents, sequences, tokens and truncations."""

    documents: int
    sequences: int
    tokens: int
    truncated: int
    truncated_tokens: int
    max_length: int | None
    packing: bool
    truncation: str
    dropped_tokens: int = 0  # packing: the last partial sequence when shorter than 2 tokens, or past the limit

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def summary(self) -> str:
        how = f"packed into {self.max_length}-token sequences" if self.packing else "one sequence per document"
        text = f"{self.documents} documents → {self.sequences} sequences ({how}), {self.tokens} tokens"
        if self.truncated:
            side = "end" if self.truncation == "right" else "start"
            text += (
                f"; {self.truncated} sequences longer than {self.max_length} tokens lost their {side} "
                f"({self.truncated_tokens} tokens)"
            )
        if self.dropped_tokens:
            text += f"; {self.dropped_tokens} tokens left over"
        return text


@dataclass
class Sequences:
    """Training sequences: the engine's batch dict, one label per sequence, and a report."""

    batch: dict[str, torch.Tensor]
    labels: list[str]
    report: SequenceReport

    def __len__(self) -> int:
        return len(self.labels)


def _special_id(tokenizer: PreTrainedTokenizerBase, name: str, wanted: bool | None, what: str) -> list[int]:
    """[id] of a special token when wanted (None: when the tokenizer has one), else []."""
    if wanted is False:
        return []
    value = getattr(tokenizer, f"{name}_token_id", None)
    if value is None:
        if wanted:
            raise ValueError(f"{what} needs a {name.upper()} token but the tokenizer has none")
        return []
    return [int(value)]


def make_sequences(
    tokenizer: PreTrainedTokenizerBase,
    documents: Documents | Sequence[str],
    *,
    max_length: int | None = None,
    packing: bool = False,
    truncation: str = "right",
    add_bos: bool = False,
    add_eos: bool | None = None,
    max_sequences: int | None = None,
) -> Sequences:
    """Tokenize documents into training sequences under an explicit length policy.

    Without packing every document is one sequence ``[bos?] + ids + [eos?]``; one longer than ``max_length`` is
    refused (``truncation="error"``, a :class:`DataError` naming it), cut at the end (``"right"``) or at the
    start (``"left"``; a BOS stays first). With ``packing`` the documents are joined (each ``[bos?] + ids +
    [eos?]``) and cut into sequences of exactly ``max_length`` tokens (the last one may be shorter); nothing is
    truncated. ``add_eos`` None means: with packing, when the tokenizer has an EOS token. ``max_sequences``
    keeps the first sequences only (and tokenizes no more documents than needed).
    """
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation must be one of {TRUNCATION}, got {truncation!r}")
    _check_max_length(max_length)
    if packing and (max_length is None or max_length < 2):
        raise ValueError("packing needs max_length ≥ 2 (the length of every packed sequence)")
    if max_sequences is not None and max_sequences < 1:
        raise ValueError(f"max_sequences must be ≥ 1 or None, got {max_sequences}")
    if not isinstance(documents, Documents):
        texts = _check_texts(documents, "documents")
        documents = Documents(texts, [f"document {i}" for i in range(len(texts))])
    if not documents.texts:
        raise DataError("no documents to tokenize")
    bos = _bos_ids(tokenizer, add_bos)
    eos = _special_id(tokenizer, "eos", add_eos if add_eos is not None else (None if packing else False), "add_eos")
    if packing:
        assert max_length is not None
        return _pack(tokenizer, documents, max_length, bos, eos, max_sequences, truncation)
    rows: list[list[int]] = []
    labels: list[str] = []
    truncated = truncated_tokens = 0
    n_docs = len(documents.texts) if max_sequences is None else min(max_sequences, len(documents.texts))
    for start in range(0, n_docs, 1024):
        chunk = documents.texts[start : min(start + 1024, n_docs)]
        for i, ids in enumerate(_encode(tokenizer, chunk), start):
            label = documents.labels[i]
            if not ids:
                raise DataError(f"document {label} has no tokens; remove it")
            row = bos + ids + eos
            if max_length is not None and len(row) > max_length:
                if truncation == "error":
                    raise DataError(
                        f"document {label} has {len(row)} tokens, more than max length {max_length}; raise the "
                        "max length, truncate ('right' keeps the start, 'left' the end) or pack the documents"
                    )
                truncated += 1
                truncated_tokens += len(row) - max_length
                row = row[:max_length] if truncation == "right" else bos + row[len(row) - max_length + len(bos) :]
            rows.append(row)
            labels.append(label)
    input_ids, attention_mask = _right_pad(rows, _pad_id(tokenizer))
    report = SequenceReport(
        len(rows), len(rows), sum(map(len, rows)), truncated, truncated_tokens, max_length, False, truncation
    )
    return Sequences({"input_ids": input_ids, "attention_mask": attention_mask}, labels, report)


def _pack(
    tokenizer: PreTrainedTokenizerBase,
    documents: Documents,
    length: int,
    bos: list[int],
    eos: list[int],
    max_sequences: int | None,
    truncation: str,
) -> Sequences:
    flat: list[int] = []
    starts: list[int] = []  # offset of each document in flat
    wanted = None if max_sequences is None else max_sequences * length
    for start in range(0, len(documents.texts), 1024):
        if wanted is not None and len(flat) >= wanted:
            break
        for i, ids in enumerate(_encode(tokenizer, documents.texts[start : start + 1024]), start):
            if not ids:
                raise DataError(f"document {documents.labels[i]} has no tokens; remove it")
            starts.append(len(flat))
            flat.extend(bos + ids + eos)
    n_seq = -(-len(flat) // length)
    if len(flat) - (n_seq - 1) * length < 2:  # a last sequence of one token has nothing to predict
        n_seq -= 1
    if max_sequences is not None:
        n_seq = min(n_seq, max_sequences)
    if n_seq < 1:
        raise DataError(f"the documents hold {len(flat)} tokens: too few for one packed sequence")
    used = min(len(flat), n_seq * length)
    rows = [flat[i * length : min((i + 1) * length, used)] for i in range(n_seq)]
    labels = []
    for i in range(n_seq):
        first = bisect.bisect_right(starts, i * length) - 1
        last = bisect.bisect_left(starts, min((i + 1) * length, used)) - 1
        more = f" (+{last - first} more)" if last > first else ""
        labels.append(f"{documents.labels[first]}{more}")
    docs_used = bisect.bisect_left(starts, used)
    input_ids, attention_mask = _right_pad(rows, _pad_id(tokenizer))
    report = SequenceReport(docs_used, n_seq, used, 0, 0, length, True, truncation, dropped_tokens=len(flat) - used)
    return Sequences({"input_ids": input_ids, "attention_mask": attention_mask}, labels, report)


def sequence_digest(batch: Mapping[str, torch.Tensor]) -> str:
    """sha256 of the real tokens of every sequence (identifies a tokenized training set)."""
    h = hashlib.sha256()
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    for i in range(len(ids)):
        row = ids[i] if mask is None else ids[i][mask[i].bool()]
        h.update(len(row).to_bytes(8, "little"))
        h.update(row.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()
