"""Progress bars for long stages: tqdm by default; a front end can install its own bars.

Every long loop of the library (fitting passes, eigendecomposition, query gradients, scan) opens a bar with
:func:`progress_bar`. By default that is a tqdm bar (off when the caller passes ``progress=False``). A front end
such as the command line installs another implementation for a block of code::

    with use_bars(factory):          # factory(desc, total, unit) -> an object with update(n) and close()
        fit_curvature(..., progress=True)
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Protocol

__all__ = ["Bar", "BarFactory", "LogBars", "NoBar", "progress_bar", "use_bars"]


class Bar(Protocol):
    """What a progress bar must offer."""

    def update(self, n: int = 1) -> None: ...

    def close(self) -> None: ...


BarFactory = Callable[[str, "int | None", str], Bar]
"""``factory(desc, total, unit)`` → a new :class:`Bar` (total None: unknown)."""

_FACTORY: ContextVar[BarFactory | None] = ContextVar("influencer_progress_factory", default=None)


class NoBar:
    """A bar that shows nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class LogBars:
    """A :data:`BarFactory` for logs and long unattended runs: each bar writes one line through ``say`` at most
    every ``every`` seconds, with its count, the seconds per unit and, when the total is known, the time left.

    Example: ``with use_bars(LogBars(print)): lissa_ihvp(..., progress=True)``.
    """

    def __init__(self, say: Callable[[str], None], every: float = 60.0) -> None:
        self.say, self.every = say, every

    def __call__(self, desc: str, total: int | None, unit: str) -> Bar:
        return _LogBar(self.say, self.every, desc, total, unit)


class _LogBar:
    def __init__(self, say: Callable[[str], None], every: float, desc: str, total: int | None, unit: str) -> None:
        self.say, self.every, self.desc, self.total, self.unit = say, every, desc, total, unit
        self.done, self.start = 0, time.perf_counter()
        self.last = self.start

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last < self.every:
            return
        self.last = now
        rate = (now - self.start) / self.done
        left = f", ~{rate * (self.total - self.done) / 60:.0f} min left" if self.total else ""
        count = f"{self.done}/{self.total}" if self.total else str(self.done)
        self.say(f"  {self.desc} {count} {self.unit}s ({rate:.2f} s/{self.unit}{left})")

    def close(self) -> None:
        pass


@contextlib.contextmanager
def use_bars(factory: BarFactory) -> Iterator[None]:
    """Within the block, every enabled progress bar of the library is made by ``factory``."""
    token = _FACTORY.set(factory)
    try:
        yield
    finally:
        _FACTORY.reset(token)


@contextlib.contextmanager
def progress_bar(desc: str, total: int | None, *, unit: str = "seq", enabled: bool = True) -> Iterator[Bar]:
    """A bar for one stage: the installed factory's, else tqdm's; a no-op bar when ``enabled`` is False."""
    if not enabled:
        yield NoBar()
        return
    factory = _FACTORY.get()
    if factory is not None:
        bar: Bar = factory(desc, total, unit)
    else:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=desc, unit=unit, leave=False)
    try:
        yield bar
    finally:
        bar.close()
