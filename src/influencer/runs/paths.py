"""The layout of a run directory (drawn in :mod:`influencer.runs`), its lock, and the checked moves that create
and replace its parts; a fit's checkpoints wait in a sibling ``.<name>.fit-partial`` until the run is written."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from influencer.io import TMP_MARK, RunLock, atomic_write_dir, read_json

RUN_FILE = "run.json"
CURVATURE = "curvature"
SCAN = "scan"
SCAN_PARTIAL = "scan.partial"
SCAN_REQUEST = "request.json"
REPORT = "report.html"
FORMAT = "influencer.run"
VERSION = 1


class RunDirError(ValueError):
    """A run directory that is missing, incomplete, or would be overwritten."""


def _holds_fit(path: Path) -> bool:
    return (path / RUN_FILE).exists() or (path / CURVATURE).exists()


def locked_run(path: str | os.PathLike[str], purpose: str) -> contextlib.AbstractContextManager[None]:
    """Hold the lock of run directory ``path`` for a whole command (fit, scan, report): a sibling file
    ``.<name>.lock`` (the directory itself is replaced atomically by a fit, so it cannot hold its own lock).
    Another live process holding it makes this raise :class:`influencer.io.RunLockedError` naming it."""
    from influencer import distributed as dist

    p = Path(path).expanduser()
    return dist.locked(p.parent, purpose=f"{purpose} of {p.name}", name=f".{p.name}.lock", clean=False)


def fit_partial(path: str | os.PathLike[str]) -> Path:
    """Where the command-line fit of run ``path`` keeps its checkpoints until the run is written: the sibling
    ``.<name>.fit-partial`` (a killed fit resumes from it when run again with the same settings)."""
    p = Path(path).expanduser()
    return p.parent / f".{p.name}.fit-partial"


def discard_partial(partial: Path) -> None:
    """Remove an unfinished fit or scan folder, refused while a live process holds its lock."""
    if partial.exists():
        with RunLock(partial, purpose="discard"):
            pass
        shutil.rmtree(partial)


def _clear_finished_partial(run: Path) -> None:
    """Remove the partial fit a killed fit left after writing ``run`` (its curvature is the run's, by checksum)."""
    partial = fit_partial(run)
    mine, theirs = partial / CURVATURE / "manifest.json", run / CURVATURE / "manifest.json"
    try:
        finished = read_json(mine, sealed=True)["tensors_sha256"] == read_json(theirs, sealed=True)["tensors_sha256"]
    except (OSError, ValueError, KeyError):
        return
    if finished:
        discard_partial(partial)


def check_fit_target(path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Check that a fit may be written to ``path``: absent, empty, or (with ``overwrite``) an earlier fit."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise RunDirError(f"{p} is a file; choose a directory for the run")
    if p.is_dir():
        if _holds_fit(p):
            _clear_finished_partial(p)
            if not overwrite:
                raise RunDirError(
                    f"{p} already holds a fit; pass --overwrite to replace it (with its scans and "
                    "report) or choose another directory"
                )
        elif any(p.iterdir()):
            raise RunDirError(f"{p} exists and is not an influencer run directory; choose another directory")
    check_writable(p.parent)
    return p


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and prove a file can be written there (RunDirError naming it otherwise)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".influencer-write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise RunDirError(f"cannot write to {folder} ({exc.strerror or exc}); choose a writable --out") from None


def write_fit(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Create the run directory atomically: ``write(tmp)`` fills a temporary sibling that replaces ``path``."""
    p = Path(path).expanduser()
    atomic_write_dir(p, write)
    return p


def read_run(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The run record ``run.json`` of a run directory (RunDirError when there is none)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise RunDirError(f"{p}: no such run directory; create one with: influencer fit MODEL DATA --out {p}")
    if not (p / RUN_FILE).is_file() or not (p / CURVATURE).is_dir():
        raise RunDirError(
            f"{p} is not a complete run directory (no {RUN_FILE} or {CURVATURE}/); create one with influencer fit"
        )
    try:
        record = read_json(p / RUN_FILE)
    except ValueError as exc:  # names the file and the parse error
        raise RunDirError(str(exc)) from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise RunDirError(f"{p / RUN_FILE} is not an influencer run record")
    if record.get("version", 0) > VERSION:
        raise RunDirError(f"{p} was written by a newer influencer (run format {record['version']}); upgrade")
    return record


def check_scan_target(run: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Check that a scan may be written into ``run``; with ``overwrite`` an unfinished scan is discarded.

    Returns the folder the scan writes to (``scan.partial``; an interrupted scan of the same queries and
    settings there resumes).
    """
    p = Path(run).expanduser()
    if (p / SCAN).exists() and not overwrite:
        raise RunDirError(f"{p / SCAN} already holds a scan; pass --overwrite to replace it")
    partial = p / SCAN_PARTIAL
    if overwrite:
        discard_partial(partial)  # refused while a live scan (e.g. a library call) holds it
    return partial


def publish_scan(run: str | os.PathLike[str]) -> Path:
    """Rename the finished ``scan.partial`` to ``scan`` (replacing an older scan)."""
    p = Path(run).expanduser()
    final, partial = p / SCAN, p / SCAN_PARTIAL
    old = None
    if final.exists():
        old = p / f".{SCAN}{TMP_MARK}old-{os.getpid()}-{time.time_ns()}"
        os.replace(final, old)
    os.replace(partial, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_scan_request(run: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``request.json`` of the run's finished scan (RunDirError when there is no scan)."""
    p = Path(run).expanduser()
    path = p / SCAN / SCAN_REQUEST
    if not path.is_file():
        hint = (
            " (an unfinished one is in scan.partial: run the same scan again to finish it)"
            if (p / SCAN_PARTIAL).exists()
            else ""
        )
        raise RunDirError(f"{p} has no finished scan{hint}; run: influencer scan {p} --queries Q.jsonl")
    return read_json(path)


def versions() -> dict[str, str]:
    """Versions of Python and of the packages that shape the numbers."""
    import importlib.metadata

    out = {"python": platform.python_version()}
    for dist in ("influencer", "torch", "transformers", "tokenizers", "safetensors", "numpy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    if "influencer" not in out:
        from influencer import __version__

        out["influencer"] = __version__
    return out
