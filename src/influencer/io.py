"""Atomic artifact writes: safetensors for tensors, JSON for everything else. Never pickle."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

TMP_MARK = ".tmp-"
"""Marks temporary siblings of a directory being written (``.<name>.tmp-*``)."""


def _atomic_target(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text to a temporary sibling, fsync, then rename over ``path``."""
    path = Path(path)
    fd, tmp = _atomic_target(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """JSON with insertion order kept (layer order is meaningful)."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def atomic_save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                        metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors via a temporary sibling and a rename."""
    path = Path(path)
    fd, tmp = _atomic_target(path)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def atomic_write_dir(final: Path, write: Callable[[Path], None]) -> None:
    """Fill a temporary sibling of ``final`` with ``write(tmp)`` and rename it into place.

    A crash leaves only a ``.<name>.tmp-*`` sibling, never a partial ``final``. An existing ``final`` is
    replaced; if another process renamed a folder into place first, that folder is kept.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{TMP_MARK}", dir=final.parent))
    try:
        write(tmp)
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}{TMP_MARK}old-{os.getpid()}-{time.time_ns()}")
            os.replace(final, old)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.exists():
                raise
            logger.info("Another process wrote %s first; keeping its folder.", final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
