"""What a plan returns: :class:`Stage` (one stage's predicted peak memory, its parts and its time) and
:class:`Plan` (the stages, the settings, suggestions and calibration, with a readable report), and the byte /
time formatting the report and the suggestions use."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_GIB = 2**30


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.2f} s"


@dataclass
class Stage:
    """One stage of a run: predicted peak memory (with its parts) and time."""

    name: str
    parts: dict[str, int]
    seconds: float | None = None
    note: str = ""

    @property
    def memory(self) -> int:
        return sum(self.parts.values())


@dataclass
class Plan:
    """Predicted memory and time per stage of a fit + scan, and suggestions (see :func:`plan`)."""

    settings: dict[str, Any]
    stages: list[Stage]
    device: str
    memory_kind: str
    suggestions: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, float] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        """The largest predicted stage memory (bytes)."""
        return max(s.memory for s in self.stages)

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage '{name}'; stages: {[s.name for s in self.stages]}")

    @property
    def seconds(self) -> float | None:
        times = [s.seconds for s in self.stages]
        return None if any(t is None for t in times) else float(sum(times))  # type: ignore[arg-type]

    def report(self) -> str:
        """A readable table: stage, peak memory, the largest parts, time; then the suggestions."""
        lines = [
            f"plan on {self.device} ({self.memory_kind}); settings: "
            + ", ".join(f"{k}={v}" for k, v in self.settings.items())
        ]
        lines.append(f"{'stage':<12} {'peak':>11} {'time':>9}  largest parts")
        for s in self.stages:
            parts = sorted(s.parts.items(), key=lambda kv: -kv[1])[:4]
            lines.append(
                f"{s.name:<12} {_fmt_bytes(s.memory):>11} {_fmt_time(s.seconds):>9}  "
                + ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in parts)
                + (f"  ({s.note})" if s.note else "")
            )
        lines.append(f"peak {_fmt_bytes(self.peak)}; total time {_fmt_time(self.seconds)}")
        for key, value in self.suggestions.items():
            lines.append(f"suggest {key}: {value}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "device": self.device,
            "memory_kind": self.memory_kind,
            "peak": self.peak,
            "seconds": self.seconds,
            "suggestions": self.suggestions,
            "calibration": self.calibration,
            "stages": [
                {"name": s.name, "memory": s.memory, "parts": s.parts, "seconds": s.seconds, "note": s.note}
                for s in self.stages
            ],
        }
