"""A run's training data as settings: which source, how it is read and tokenized (``run.json``'s ``data``), and
the same settings read back for a scan (the fit's, overridden where asked)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from influencer.runs.checks import RequestError, _NoTimer

SETTING_KEYS = (
    "source",
    "format",
    "field",
    "text_unit",
    "split",
    "sequences",
    "max_length",
    "packing",
    "truncation",
    "bos",
    "eos",
)


def data_settings(
    data: str | os.PathLike[str],
    *,
    format: str = "auto",
    field: str = "text",
    text_unit: str = "line",
    split: str = "train",
    sequences: int | None = None,
    max_length: int | None = 512,
    packing: bool = False,
    truncation: str = "right",
    bos: bool = False,
    eos: bool | None = None,
) -> dict[str, Any]:
    """The data settings of a run: ``data`` is a file or folder (made absolute) or ``kjv``; ``format`` ``auto`` is
    detected from it. The other settings are those of :func:`influencer.data.load_documents` and
    :func:`influencer.data.make_sequences` (``sequences``: the first N; ``eos`` None: with packing)."""
    from influencer.data import detect_format

    data = os.fspath(data)
    source = "kjv" if data.lower() == "kjv" else str(Path(data).expanduser().resolve())
    resolved = detect_format(source) if format == "auto" else format
    if packing and max_length is None:
        raise RequestError("packing needs {} (the length of every packed sequence)", "max_length")
    if sequences is not None and sequences < 1:
        raise RequestError(f"{{}} must be ≥ 1, got {sequences}", "sequences")
    settings: dict[str, Any] = {"source": source, "format": resolved}
    if resolved in ("jsonl", "hf"):
        settings["field"] = field
    if resolved == "text":
        settings["text_unit"] = text_unit
    if resolved == "hf":
        settings["split"] = split
    settings.update(
        {
            "sequences": sequences,
            "max_length": max_length,
            "packing": packing,
            "truncation": truncation,
            "bos": bos,
            "eos": eos,
        }
    )
    return settings


def scan_data_settings(
    recorded: dict[str, Any], data: str | os.PathLike[str] | None = None, **given: Any
) -> dict[str, Any]:
    """The data a scan reads: the fit's recorded settings (only ``sequences`` may change), or with ``data`` another
    source whose format is detected afresh and whose other settings default to the fit's. ``given``: the
    settings of :func:`data_settings` (None = as recorded)."""
    if data is None:
        settings = {k: recorded[k] for k in SETTING_KEYS if k in recorded}
        if given.get("sequences") is not None:
            settings["sequences"] = given["sequences"]
        changed = [k for k, v in given.items() if v is not None and k != "sequences"]
        if changed:
            names = ", ".join(f"{{{i + 2}}}" for i in range(len(changed)))
            raise RequestError(
                f"data settings other than {{1}} ({names}) need {{0}} (without it the fit's data is scanned "
                "exactly as it was fitted)",
                "data",
                "sequences",
                *changed,
            )
        return settings

    def pick(key: str, default: Any) -> Any:
        value = given.get(key)
        return value if value is not None else recorded.get(key, default)

    return data_settings(
        data,
        format=given.get("format") or "auto",
        field=pick("field", "text"),
        text_unit=pick("text_unit", "line"),
        split=pick("split", "train"),
        sequences=given.get("sequences"),
        max_length=pick("max_length", 512),
        packing=pick("packing", False),
        truncation=pick("truncation", "right"),
        bos=pick("bos", False),
        eos=pick("eos", None),
    )


def read_documents(settings: dict[str, Any], timer: Any = None) -> Any:
    """The training documents a run's data settings name (``run.json``'s ``data``): read, not yet tokenized."""
    from influencer.data import load_documents

    with (timer or _NoTimer()).stage("read data") as row:
        docs = load_documents(
            settings["source"],
            format=settings["format"],
            field=settings.get("field", "text"),
            unit=settings.get("text_unit", "line"),
            split=settings.get("split", "train"),
            max_documents=None if settings["packing"] else settings["sequences"],
        )
        row.detail = f"{len(docs)} documents"
    return docs


def tokenize_documents(tokenizer: Any, settings: dict[str, Any], docs: Any, timer: Any = None) -> Any:
    """The sequences (:class:`influencer.data.Sequences`) the data settings make of ``docs``."""
    from influencer.data import make_sequences

    with (timer or _NoTimer()).stage("tokenize") as row:
        seqs = make_sequences(
            tokenizer,
            docs,
            max_length=settings["max_length"],
            packing=settings["packing"],
            truncation=settings["truncation"],
            add_bos=settings["bos"],
            add_eos=settings["eos"],
            max_sequences=settings["sequences"],
        )
        row.detail = f"{len(seqs)} sequences"
    return seqs


def data_record(settings: dict[str, Any], docs: Any, seqs: Any) -> dict[str, Any]:
    """What ``run.json`` / ``request.json`` record of the data: its settings, what was skipped, the tokenization
    report and the digest of the tokens (a later read is checked against it)."""
    from influencer.data import sequence_digest

    return {
        **settings,
        "documents_skipped": docs.skipped,
        "report": seqs.report.as_dict(),
        "digest": sequence_digest(seqs.batch),
    }


def fit_sequences(recorded: dict[str, Any], tokenizer: Any, timer: Any = None) -> Any:
    """The sequences a fit was made on, read again (``recorded``: run.json's ``data``); RequestError when they
    changed since (other tokens), since the curvature no longer describes them."""
    from influencer.data import sequence_digest

    settings = scan_data_settings(recorded, None)
    seqs = tokenize_documents(tokenizer, settings, read_documents(settings, timer), timer)
    if recorded.get("digest") not in (None, sequence_digest(seqs.batch)):
        raise RequestError(
            f"the fit's training data at {settings['source']} changed since the fit (other tokens), so the "
            "refinement has no data the curvature describes; set {} to 0",
            "refine",
        )
    return seqs
