"""What a validation run leaves on disk: ``table.md``, a figure and ``result/`` (JSON + safetensors); also the
figure writer (:func:`_save_figure`) and JSON conversion (:func:`_jsonable`) that the result classes share.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor

from influencer.io import atomic_write_text

__all__ = ["parse_overrides", "save_run"]


class _Result(Protocol):
    setup_info: dict[str, Any]

    def to_markdown(self) -> str: ...

    def save(self, path: str | os.PathLike) -> Path: ...

    def plot(self, path: str | os.PathLike) -> Path: ...


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["steps=1000", "lr=3e-3", "act=relu"]`` → ``{"steps": 1000, "lr": 0.003, "act": "relu"}`` (setup overrides
    for :func:`influencer.validate.load_setup`; ``-`` in keys becomes ``_``; numbers become int or float)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip().replace("-", "_")] = _number(value.strip())
    return out


def _number(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def save_run(
    result: _Result, out: str | os.PathLike, *, figure: str, command: str, log: Callable[[str], None] | None = None
) -> str:
    """Write ``out/result/`` (``result.save``), ``out/<figure>`` (skipped with a message when matplotlib is missing)
    and ``out/table.md`` (the command line in backticks, then the markdown table); returns the table text."""
    say = log or (lambda _msg: None)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    result.save(folder / "result")
    try:
        result.plot(folder / figure)
    except ImportError:
        say("matplotlib is not installed: no figure (pip install 'influencer[validate]')")
    text = f"`{command}`\n\n{result.to_markdown()}\n"
    atomic_write_text(folder / "table.md", text)
    return text


def _save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """Lay out ``fig``, write it to ``path`` as a PNG (creating the folder), close it; returns the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, Tensor):
        return x.tolist()
    return str(x)
