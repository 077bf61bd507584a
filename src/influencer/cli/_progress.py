"""Progress bars with ETA, stage timings and their table, console output."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from influencer.cli._runtime import _SETTINGS, _main_rank

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress


@dataclass
class _Stage:
    name: str
    depth: int
    seconds: float | None = None
    detail: str = ""


@dataclass
class _Timer:
    """Wall time of each stage; library bars (fit passes, scan, …) are recorded as sub-stages."""

    stages: list[_Stage] = field(default_factory=list)
    depth: int = 0
    progress: Progress | None = None  # while bars are live: a spinner per running stage

    @contextlib.contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[_Stage]:
        row = _Stage(name, self.depth, detail=detail)
        self.stages.append(row)
        self.depth += 1
        task = self.progress.add_task(name, total=None, unit="") if self.progress is not None else None
        start = time.perf_counter()
        try:
            yield row
        finally:
            row.seconds = time.perf_counter() - start
            self.depth -= 1
            if task is not None and self.progress is not None:
                self.progress.remove_task(task)

    def as_dict(self) -> dict[str, float]:
        """Seconds per finished stage, sub-stages keyed "stage/sub-stage"."""
        out: dict[str, float] = {}
        path: list[str] = []
        for row in self.stages:
            path = [*path[: row.depth], row.name]
            if row.seconds is not None:
                key = "/".join(path)
                out[key] = round(out.get(key, 0.0) + row.seconds, 3)
        return out


class _RichBar:
    def __init__(self, owner: _Bars, desc: str, total: int | None, unit: str):
        self.owner, self.desc, self.unit, self.count = owner, desc, unit, 0
        self.start = time.perf_counter()
        self.row = _Stage(desc, owner.timer.depth)
        owner.timer.stages.append(self.row)
        self.task = owner.progress.add_task(desc, total=total, unit=unit)

    def update(self, n: int = 1) -> None:
        self.count += n
        self.owner.progress.advance(self.task, n)

    def close(self) -> None:
        if self.row.seconds is not None:
            return
        self.row.seconds = time.perf_counter() - self.start
        self.row.detail = f"{self.count} {self.unit}"
        self.owner.progress.remove_task(self.task)
        if self.owner.show:
            self.owner.progress.console.print(
                f"  {self.desc}: {self.row.detail} in {_seconds(self.row.seconds)}", highlight=False
            )


class _Bars:
    """A progress-bar factory for :func:`influencer.progress.use_bars`: rich bars with ETA on stderr."""

    def __init__(self, timer: _Timer, show: bool, console: Console | None = None):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.timer, self.show = timer, show
        self.progress: Progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console or Console(stderr=True),
            disable=not show,
            transient=True,
            redirect_stdout=sys.stdout.isatty(),
            redirect_stderr=False,
        )  # keep piped stdout out of the bars

    def __call__(self, desc: str, total: int | None, unit: str) -> _RichBar:
        return _RichBar(self, desc, total, unit)


@contextlib.contextmanager
def _live(timer: _Timer) -> Iterator[None]:
    """Show library progress as rich bars (when enabled) and record their timings."""
    from influencer.progress import use_bars

    show = (_SETTINGS.progress if _SETTINGS.progress is not None else sys.stderr.isatty()) and _main_rank()
    bars = _Bars(timer, show)
    timer.progress = bars.progress
    try:
        with bars.progress, use_bars(bars):
            yield
    finally:
        timer.progress = None


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} bytes"  # pragma: no cover


def _seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.2f} s" if s < 60 else f"{int(s // 60)} min {s % 60:04.1f} s"


def _timing_table(console: Console, timer: _Timer, title: str) -> None:
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    table.add_column("stage")
    table.add_column("time", justify="right")
    table.add_column("", style="dim")
    for row in timer.stages:
        table.add_row("  " * row.depth + row.name, _seconds(row.seconds), row.detail)
    total = sum(r.seconds or 0.0 for r in timer.stages if r.depth == 0)
    table.add_row("total", _seconds(total), "", style="bold")
    console.print(table)


def _timings_title(command: str, processes: int) -> str:
    if processes == 1:
        return f"{command} timings"
    return f"{command} timings (rank 0 of {processes} processes)"


def _console() -> Console:
    """stdout for tables and messages; silent on torchrun ranks other than 0."""
    import os
    import sys

    from rich.console import Console

    # piped output (| less, > file) would be cut to 80 columns: give tables room unless COLUMNS says otherwise
    width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
    return Console(highlight=False, quiet=not _main_rank(), width=width)
