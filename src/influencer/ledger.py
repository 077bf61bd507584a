"""Resumable work, once: a :class:`Ledger` records the settings a piece of work started with and what of it is
done; a run directory resumes only with the same settings.

Fit (``fit.json``: finished stages) and scan (``scan.json``: finished shards) keep their state in a ledger; fit
partitions compare their settings the same way. On resume :func:`check_resume` compares the recorded settings
with the ones asked for now and refuses a difference with one line that names the first differing setting
(:class:`ResumeConflictError`), never ignoring it silently. The ledger is a sealed JSON file, rewritten atomically
(its rename is the commit point of each step); the checksums of the artifacts themselves live in
:mod:`influencer.io` (every safetensors file and sealed manifest verifies itself on load).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from influencer.io import atomic_write_json, read_json


class ResumeConflictError(ValueError):
    """A run directory holds unfinished (or finished) work made with other settings than the ones asked for.

    ``setting`` names the first differing setting (dotted for nested ones); ``saved`` and ``asked`` its values.
    """

    def __init__(self, directory: str | os.PathLike[str], what: str, setting: str, saved: Any, asked: Any):
        self.directory, self.what, self.setting, self.saved, self.asked = str(directory), what, setting, saved, asked
        super().__init__(
            f"'{directory}' holds a {what} made with {setting}={_short(saved)}, but this run asks "
            f"{setting}={_short(asked)}: use the same setting, another output directory, or --overwrite"
        )


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def differences(saved: Mapping[str, Any], asked: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(dotted name, saved value, asked value) of every setting that differs, in the order of ``asked``, then the
    settings only ``saved`` has."""
    for key in [*asked, *(k for k in saved if k not in asked)]:
        a, b = saved.get(key), asked.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            yield from differences(a, b, f"{name}.")
        elif a != b:
            yield name, a, b


def check_resume(
    directory: str | os.PathLike[str], what: str, saved: Mapping[str, Any], asked: Mapping[str, Any]
) -> None:
    """Raise :class:`ResumeConflictError` naming the first setting where ``saved`` and ``asked`` differ."""
    for name, a, b in differences(saved, asked):
        raise ResumeConflictError(directory, what, name, a, b)


def examples_digest(task: Any, data: Any, queries: bool = True) -> str:
    """sha256 of every tensor of every example as ``task`` sees it (identifies a query set, or with
    ``queries=False`` a training set): part of the settings a resumed run must share."""
    h = hashlib.sha256()
    dataset = task.as_dataset(data, queries=queries)
    for i in range(len(dataset)):
        ex = dataset[i]
        parts = ex.values() if isinstance(ex, dict) else ex
        for t in parts:
            h.update(torch.as_tensor(t).detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Ledger:
    """The state of resumable work in one sealed JSON file: ``{"config", "done", **fields}``.

    :meth:`open` creates the file, or checks the recorded settings against ``config`` (a
    :class:`ResumeConflictError` naming the first difference) and returns what is done; :meth:`mark` records a
    new done-list atomically. ``what`` names the work in errors ("fit", "scan").
    """

    def __init__(self, path: str | os.PathLike[str], what: str, config: Mapping[str, Any], **fields: Any):
        self.path, self.what, self.config, self.fields = Path(path), what, dict(config), fields

    def open(self) -> list[Any]:
        if self.path.is_file():
            saved = self.read(self.path)
            check_resume(self.path.parent, self.what, saved.get("config") or {}, self.config)
            return list(saved.get("done", []))
        self.mark([])
        return []

    def mark(self, done: list[Any], **fields: Any) -> None:
        """Record ``done`` (and ``fields``, kept from then on) atomically: the commit point of a step."""
        self.fields.update(fields)
        atomic_write_json(self.path, {**self.fields, "config": self.config, "done": list(done)}, seal=True)

    @staticmethod
    def read(path: str | os.PathLike[str]) -> dict[str, Any]:
        """A ledger file as written (checksum verified): ``{"config", "done", **fields}``."""
        return read_json(path, sealed=True)
