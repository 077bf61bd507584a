"""Two writers on one run directory: two fits, two scans, and ``scan --overwrite`` during a scan. The second
command is refused with one error line while the first holds the run (or, if the first has finished, because its
result is there); the first finishes and its result is intact — nothing is lost or mixed."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli import (
    error_line,
    invoke,
    ok,
    snapshot,
    ws,  # noqa: F401  (the shared fixture: a tiny model folder, data and one fitted run)
)

import influencer as inf


def _start(ws, *args: object) -> subprocess.Popen:  # noqa: F811
    return subprocess.Popen(
        [sys.executable, "-m", "influencer", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ws.env,
    )


def _held(lock: Path) -> bool:
    """True while another process holds the flock on ``lock``."""
    if not lock.exists():
        return False
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock we may have taken
    return False


def _while_held(proc: subprocess.Popen, lock: Path, timeout: float = 120.0) -> bool:
    """Wait until ``proc`` holds ``lock`` (True) or has exited (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _held(lock):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    raise AssertionError("the first command neither took the lock nor ended")


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return out


def test_two_fits_on_one_directory(ws, tmp_path) -> None:  # noqa: F811
    out = tmp_path / "run"
    first = _start(ws, "fit", ws.model, ws.train, "--out", out, "--batch-size", "2", "--seed", "5")
    overlapped = _while_held(first, tmp_path / ".run.lock")
    line = error_line(invoke("fit", ws.model, ws.train, "--out", out, "--seed", "6"))
    assert ("in use by pid" in line) if overlapped else ("already holds a fit" in line), line
    _finish(first)
    curv = inf.Curvature.load(out / "curvature")  # the first fit, whole and verified
    assert curv.seed == 5
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("overwrite", [False, True], ids=["second-scan", "overwrite-during-scan"])
def test_a_second_scan_during_a_scan(ws, tmp_path, overwrite) -> None:  # noqa: F811
    run = tmp_path / "run"
    shutil.copytree(ws.run, run)
    first = _start(ws, "scan", run, "--queries", ws.queries, "--shard-size", "4", "--batch-size", "2")
    overlapped = _while_held(first, tmp_path / ".run.lock")
    extra = ["--overwrite"] if overwrite else []
    before = snapshot(run) if not overlapped else None
    line = error_line(invoke("scan", run, "-p", "In the", "-c", " beginning", "--no-tokens", *extra))
    if overlapped:
        assert "in use by pid" in line, line
    else:  # the first scan had finished: only --overwrite may replace it, and then it must succeed
        assert not overwrite and "already holds a scan" in line
        assert snapshot(run) == before
    _finish(first)
    result = inf.ScanResult.load(run / "scan")
    assert result.n_queries == 2 and result.n_scanned == 24
    assert not (run / "scan.partial").exists()
    if overwrite:  # once the first is done, --overwrite works
        ok(invoke("scan", run, "-p", "In the", "-c", " beginning", "--no-tokens", "--overwrite"))
        assert inf.ScanResult.load(run / "scan").n_queries == 1
