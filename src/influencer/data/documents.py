"""Documents from a source: plain text files, JSON Lines, local Hugging Face datasets or the built-in KJV
(:func:`read_text`, :func:`read_jsonl`, :func:`read_hf_dataset`, :func:`read_kjv`), the format detection and
:func:`load_documents` that picks the reader; also :class:`DataError`, the settings' allowed values
(``DATA_FORMATS``, ``TEXT_UNITS``, ``TRUNCATION``) and the JSON Lines helpers the query files share."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from influencer.data.corpora import kjv_verses

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

    def add(self, text: str, label: str) -> None:
        """Keep ``text`` under ``label``, or count it as skipped when it is empty (only whitespace)."""
        if text.strip():
            self.texts.append(text)
            self.labels.append(label)
        else:
            self.skipped += 1


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
            if text.strip() or unit == "file":  # an empty file is skipped; blank lines merely separate documents
                docs.add(text, label)
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
        docs.add(text, f"{p.name}:{lineno}")
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
        docs.add(text, f"{p.name}[{row}]")
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
