"""Measuring memory: this process's resident memory now (:func:`_rss`) and its peak while a function runs
(:func:`measure_peak_rss`, sampled in a thread), as the plan's baseline and as the checks of its predictions."""

from __future__ import annotations

import os
from typing import Any


def _rss() -> int:
    """This process's resident memory now (psutil if installed, else /proc, else the peak so far)."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def measure_peak_rss(fn, *args: Any, interval: float = 0.002, **kwargs: Any) -> tuple[Any, int]:
    """Run ``fn`` while sampling this process's RSS in a thread; (its result, the peak RSS in bytes)."""
    import threading

    import psutil

    proc = psutil.Process(os.getpid())
    peak = [proc.memory_info().rss]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            stop.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = fn(*args, **kwargs)
    finally:
        stop.set()
        thread.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    return result, peak[0]
