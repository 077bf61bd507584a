"""The memory guard: compare a run's predicted peak (:func:`influencer.plan.plan`) with the memory it may use,
before the expensive part, and refuse with settings that would fit.

The budget is the memory available now (CPU: ``MemAvailable`` of ``/proc/meminfo``, lowered to the cgroup limit
when one is set; CUDA: the device's free memory) plus what this process already holds (the model is in both the
prediction and the RSS), or a size given by the user (``--memory-budget 20GB``; ``off`` disables the guard).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "m": 2**20, "mb": 2**20, "g": 2**30, "gb": 2**30, "t": 2**40}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tb": 2**40, "tib": 2**40})


class MemoryBudgetError(ValueError):
    """A run predicted to need more memory than it may use; the message names settings that would fit."""


def parse_size(text: str) -> int | None:
    """'auto' → None (the memory available), 'off' → -1 (no guard), else bytes: '20GB', '512M', '1.5GiB', '1e9'."""
    value = text.strip().lower()
    if value == "auto":
        return None
    if value == "off":
        return -1
    match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)", value)
    if match is None or match.group(2) not in _UNITS:
        raise ValueError(f"a memory size looks like 20GB, 512MB or 1.5GiB (or auto / off), got {text!r}")
    size = float(match.group(1)) * _UNITS[match.group(2)]
    if not size > 0:
        raise ValueError(f"a memory budget must be > 0, got {text!r}")
    return int(size)


def _cgroup_limit() -> int | None:
    for path, used in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit = Path(path).read_text().strip()
            if limit == "max" or int(limit) > 2**60:
                return None
            return int(limit) - int(Path(used).read_text().strip())
        except (OSError, ValueError):
            continue
    return None


def available_memory(device: str | torch.device = "cpu") -> int:
    """Bytes a run on ``device`` may still allocate (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    available: int | None = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        available = int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    limit = _cgroup_limit()
    return min(available, limit) if limit is not None else available


def _fmt(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def memory_limit(budget: int | None, device: str | torch.device = "cpu") -> int | None:
    """The bytes a run may peak at: ``budget`` if given (from :func:`parse_size`; negative → None, no guard), else
    the memory available now plus what this process already holds (the plan counts the model and runtime)."""
    if budget is not None:
        return None if budget < 0 else budget
    device = torch.device(device)
    if device.type == "cuda":
        held = int(torch.cuda.memory_allocated(device))
    else:
        from influencer.plan import _rss

        held = _rss()
    return available_memory(device) + held


def check_memory(
    plan: Any,
    stages: Sequence[str],
    limit: int,
    *,
    what: str,
    given: bool = False,
    hints: Sequence[str] = ("batch_size", "blocks"),
) -> None:
    """Raise :class:`MemoryBudgetError` when the largest of ``stages`` in ``plan`` exceeds ``limit`` bytes
    (``given``: the limit came from --memory-budget rather than the memory available); the message offers the
    plan's suggestions for the options ``hints``."""
    chosen = [s for s in plan.stages if s.name in stages]
    if not chosen:
        return
    worst = max(chosen, key=lambda s: s.memory)
    if worst.memory <= limit:
        return
    parts = ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(worst.parts.items(), key=lambda kv: -kv[1])[:3])
    hints = [f"--{k.replace('_', '-')} {v}" for k, v in plan.suggestions.items() if k in hints and v]
    hint = ("try " + ", ".join(hints) + "; or ") if hints else ""
    source = "the --memory-budget" if given else "available"
    raise MemoryBudgetError(
        f"the {what} would peak at ~{_fmt(worst.memory)} in its {worst.name} stage ({parts}) but "
        f"{_fmt(limit)} is {source}: {hint}track fewer layers (--layers), or pass --memory-budget off to run anyway"
    )
