"""Corpora and tokenization: documents from files, the King James Bible, training sequences and queries.

Documents (:class:`Documents`, a list of texts with a label each) come from

- plain text files (:func:`read_text`): one document per non-blank line (``unit="line"``) or one per file
  (``unit="file"``); a folder means its ``*.txt`` files in name order;
- JSON Lines (:func:`read_jsonl`): one object per line, the text in a chosen field; a bad line is an error
  naming the file and the line number;
- a local Hugging Face dataset (:func:`read_hf_dataset`): a folder written by ``Dataset.save_to_disk`` or a
  data file / folder ``datasets.load_dataset`` reads (json, jsonl, csv, parquet, txt); needs ``datasets``;
- the built-in King James Bible (:func:`read_kjv`, one verse per document).

:func:`load_documents` picks the reader from a source string. :func:`make_sequences` turns documents into
training sequences (one per document, or packed into fixed-length sequences) under an explicit truncation
policy and reports what it did; :func:`read_queries` and :func:`encode_queries` do the same for queries.

Formats consumed by the engine:

- training texts: ``{"input_ids": LongTensor [N, T], "attention_mask": LongTensor [N, T]}``, right-padded;
- queries: the same plus ``"prompt_length": LongTensor [Q]`` (number of prompt tokens at the start of each
  row; the completion occupies positions ``prompt_length .. attention_mask.sum(1) - 1``).

Tokenizers are any Hugging Face tokenizer (``transformers.PreTrainedTokenizerBase``). Special tokens are never
added implicitly (``add_special_tokens=False``); a BOS token is prepended only when ``add_bos=True``.

Modules: :mod:`~influencer.data.corpora` (the KJV), :mod:`~influencer.data.tokenizing` (texts and queries →
batches), :mod:`~influencer.data.documents` (readers, :func:`load_documents`), :mod:`~influencer.data.sequences`
(:func:`make_sequences`) and :mod:`~influencer.data.query_files` (:func:`read_queries`, :func:`encode_queries`);
every public name is importable from ``influencer.data``.
"""

from __future__ import annotations

import importlib.util  # noqa: F401  (tests patch influencer.data.importlib.util.find_spec)

from influencer.data.corpora import KJV_NUM_VERSES, kjv_path, kjv_verses
from influencer.data.documents import (
    DATA_FORMATS,
    TEXT_UNITS,
    TRUNCATION,
    DataError,
    Documents,
    detect_format,
    load_documents,
    read_hf_dataset,
    read_jsonl,
    read_kjv,
    read_text,
)
from influencer.data.query_files import QueryReport, encode_queries, read_queries
from influencer.data.sequences import SequenceReport, Sequences, make_sequences, sequence_digest
from influencer.data.tokenizing import split_verse_queries, tokenize_queries, tokenize_texts

__all__ = [
    "DATA_FORMATS",
    "KJV_NUM_VERSES",
    "TEXT_UNITS",
    "TRUNCATION",
    "DataError",
    "Documents",
    "QueryReport",
    "SequenceReport",
    "Sequences",
    "detect_format",
    "encode_queries",
    "kjv_path",
    "kjv_verses",
    "load_documents",
    "make_sequences",
    "read_hf_dataset",
    "read_jsonl",
    "read_kjv",
    "read_queries",
    "read_text",
    "sequence_digest",
    "split_verse_queries",
    "tokenize_queries",
    "tokenize_texts",
]
