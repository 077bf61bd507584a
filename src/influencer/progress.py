"""Progress bars for long stages: tqdm by default; a front end can install its own bars.

Every long loop of the library (fitting passes, eigendecomposition, query gradients, scan) opens a bar with
:func:`progress_bar`. By default that is a tqdm bar (off when the caller passes ``progress=False``). A front end
such as the command line installs another implementation for a block of code::

    with use_bars(factory):          # factory(desc, total, unit) -> an object with update(n) and close()
        fit_curvature(..., progress=True)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Protocol

__all__ = ["Bar", "BarFactory", "NoBar", "progress_bar", "use_bars"]


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
