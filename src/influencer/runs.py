"""Run directories: what ``influencer fit`` writes and ``scan`` / ``report`` read.

::

    RUN_DIR/
      run.json              model source, data source and settings, sizes, versions, stage timings
      curvature/            Curvature.save: manifest.json + factors.safetensors
      scan/                 ScanResult.save + the scan's query store and shards, request.json (queries, settings)
      scan.partial/         an unfinished (resumable) scan; renamed to scan/ when complete
      report.html           influencer report

Every write is atomic: a fit fills a temporary sibling folder and renames it into place; a scan is renamed from
``scan.partial`` only when complete. Nothing is written before the inputs have been checked.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from influencer.io import TMP_MARK, RunLock, atomic_write_dir, read_json

__all__ = [
    "CURVATURE",
    "REPORT",
    "RUN_FILE",
    "SCAN",
    "SCAN_PARTIAL",
    "SCAN_REQUEST",
    "Run",
    "RunDirError",
    "check_fit_target",
    "check_scan_target",
    "publish_scan",
    "read_run",
    "read_scan_request",
    "versions",
    "write_fit",
]

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


def read_documents(settings: dict[str, Any], timer: Any = None) -> Any:
    """The training documents a run's data settings name (``run.json``'s ``data``): read, not yet tokenized."""
    from influencer.data import load_documents

    with (timer or _NoTimer()).stage("read data") as row:
        docs = load_documents(
            settings["source"],
            format=settings["format"],
            field=settings.get("field", "text"),
            unit=settings.get("text_unit", "line"),
            split=settings.get("split", "train"),
            max_documents=None if settings["packing"] else settings["sequences"],
        )
        row.detail = f"{len(docs)} documents"
    return docs


def tokenize_documents(tokenizer: Any, settings: dict[str, Any], docs: Any, timer: Any = None) -> Any:
    """The sequences (:class:`influencer.data.Sequences`) the data settings make of ``docs``."""
    from influencer.data import make_sequences

    with (timer or _NoTimer()).stage("tokenize") as row:
        seqs = make_sequences(
            tokenizer,
            docs,
            max_length=settings["max_length"],
            packing=settings["packing"],
            truncation=settings["truncation"],
            add_bos=settings["bos"],
            add_eos=settings["eos"],
            max_sequences=settings["sequences"],
        )
        row.detail = f"{len(seqs)} sequences"
    return seqs


# --------------------------------------------------------------------------------------------------------
# Run: a run directory as an object
# --------------------------------------------------------------------------------------------------------


class _Stage:
    detail = ""


class _NoTimer:
    """Stage timing that records nothing (the command line passes its own, which prints a table)."""

    @contextlib.contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[_Stage]:
        yield _Stage()


class Run:
    """A run directory written by ``influencer fit`` (``run.json``, ``curvature/``, ``scan/``, ``report.html``).

    ``Run.open(path)`` checks it is one; then ``record`` (run.json), ``curvature(model)``, ``result()`` (the
    finished scan), ``request()`` (its request.json: queries, settings, timings), ``training(tokenizer)`` (the
    scanned sequences, checked unchanged) and ``report()`` (the HTML page) read it. ``timer``: any object with a
    ``stage(name, detail)`` context manager (the command line's prints stage timings).
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path).expanduser()
        self.record = read_run(self.path)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Run:
        return cls(path)

    def curvature(self, model: Any = None) -> Any:
        """The fitted curvature (checked against ``model`` when given)."""
        from influencer.curvature import Curvature

        return Curvature.load(self.path / CURVATURE, model)

    def request(self) -> dict[str, Any]:
        return read_scan_request(self.path)

    def result(self) -> Any:
        """The finished scan (:class:`influencer.ScanResult`); RunDirError when there is none."""
        from influencer.scan import ScanResult

        self.request()  # the clear error when the run has no finished scan
        return ScanResult.load(self.path / SCAN)

    def training(self, tokenizer: Any, timer: Any = None) -> Any:
        """The sequences the scan scored (:class:`influencer.data.Sequences`), read and tokenized as the scan did;
        RunDirError when the data changed since (its texts would be shown against the wrong scores)."""
        from influencer.data import sequence_digest

        data = self.request()["data"]
        seqs = tokenize_documents(tokenizer, data, read_documents(data, timer), timer)
        if sequence_digest(seqs.batch) != data.get("digest"):
            raise RunDirError(
                f"the training data at {data['source']} changed since the scan; the report would show the wrong texts"
            )
        return seqs

    def report(
        self, out: str | os.PathLike[str] | None = None, *, top: int = 10, title: str | None = None, timer: Any = None
    ) -> Path:
        """Write the HTML report of the scan (``RUN/report.html`` by default, atomically); returns its path.
        Holds the run's lock while it reads, so a scan cannot replace ``scan/`` underneath."""
        from influencer.models import describe_model, load_tokenizer
        from influencer.pieces import token_pieces
        from influencer.report import write_report
        from influencer.units import units_note

        timer = timer or _NoTimer()
        target = Path(out).expanduser() if out is not None else self.path / REPORT
        if target.is_dir():
            raise RunDirError(f"{target} is a directory; give a file name with --out")
        request = self.request()
        with locked_run(self.path, "report"):
            with timer.stage("load scan"):
                result = self.result()
            with timer.stage("load tokenizer"):
                tok = load_tokenizer(request.get("model") or self.record["model"]["source"])
            seqs = self.training(tok, timer)
            ids, mask = seqs.batch["input_ids"], seqs.batch["attention_mask"]
            fit = self.record["fit"]
            model = self.record["model"]
            notes = [
                f"model: {model.get('description') or describe_model(model['source'])} ({model['class']})",
                f"curvature: {fit['strategy']} ({fit['fisher']} Fisher) on {len(fit['tracked_layers'])} layers "
                f"({fit['layers']}), fitted on {fit['n_fit']} sequences",
                f"data: {request['data']['source']} ({seqs.report.summary()})",
            ]
            if request["settings"].get("prefilter"):
                notes.append(f"BM25 prefilter: top {request['settings']['prefilter']} sequences per query were scored")
            notes.append(units_note(result.meta.get("inverse"), result.n_train, result.meta.get("self_correction")))
            with timer.stage("write report"):
                target.parent.mkdir(parents=True, exist_ok=True)
                return write_report(
                    result,
                    target,
                    queries=request["queries"],
                    train_tokens=lambda i: token_pieces(tok, ids[i, : int(mask[i].sum())].tolist()),
                    train_text=lambda i: tok.decode(ids[i, : int(mask[i].sum())].tolist()),
                    train_source=lambda i: str(seqs.labels[i]),
                    title=title or f"influencer report: {self.path.name}",
                    top=top,
                    notes=notes,
                )
