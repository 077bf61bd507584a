"""Atomic artifact writes: safetensors for tensors, JSON for everything else. Never pickle.

Every artifact carries a checksum written with it and verified on load:

- a safetensors file holds the sha256 of its tensors (names, dtypes, shapes, bytes) in its metadata
  (``influencer.sha256``); the manifest that goes with it records the same digest, so a damaged header is caught
  too (:func:`load_tensors` with ``expect=``);
- a *sealed* JSON manifest (``atomic_write_json(..., seal=True)``) holds ``"sha256"`` of its own canonical text
  without that field; :func:`read_json` with ``sealed=True`` verifies and removes it.

A mismatch raises :class:`CorruptArtifactError` naming the file and how to re-create it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

TMP_MARK = ".tmp-"
"""Marks temporary siblings of a directory being written (``.<name>.tmp-*``)."""


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_target(path: Path) -> tuple[int, str]:
    """A temporary sibling of ``path``, with the permissions a plain ``open`` would give (mkstemp makes 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())
    return fd, tmp


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text to a temporary sibling, fsync, then rename over ``path``."""
    path = Path(path)
    fd, tmp = _atomic_target(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


SEAL = "sha256"
"""The field of a sealed JSON manifest that holds the digest of the rest."""

TENSORS_SHA = "influencer.sha256"
"""The safetensors metadata key that holds the digest of the file's tensors."""


class CorruptArtifactError(ValueError):
    """An artifact whose bytes do not match the checksum written with it, or that cannot be parsed at all."""


def _json_digest(obj: dict[str, Any]) -> str:
    body = {k: v for k, v in obj.items() if k != SEAL}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def atomic_write_json(path: str | os.PathLike, obj: Any, *, seal: bool = False) -> None:
    """JSON with insertion order kept (layer order is meaningful); ``seal`` adds the ``"sha256"`` of the rest."""
    if seal:
        obj = {**{k: v for k, v in obj.items() if k != SEAL}, SEAL: _json_digest(obj)}
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: str | os.PathLike, *, sealed: bool = False, legacy_below: int | None = None) -> Any:
    """Parse a JSON file. With ``sealed``: verify and drop its ``"sha256"``; a missing seal is an error unless the
    file's ``"version"`` is below ``legacy_below`` (a format written before checksums)."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptArtifactError(f"'{path}' is not valid JSON ({e}): it is corrupt or was edited") from None
    if not sealed:
        return obj
    if not isinstance(obj, dict):
        raise CorruptArtifactError(f"'{path}' is not an influencer manifest (a JSON object was expected)")
    seal = obj.pop(SEAL, None)
    if seal is None and legacy_below is not None and int(obj.get("version", 0)) < legacy_below:
        return obj
    if seal is None:
        raise CorruptArtifactError(f"'{path}' has no checksum (\"{SEAL}\"): it is corrupt or was edited")
    if seal != _json_digest(obj):
        raise CorruptArtifactError(
            f"'{path}' does not match the checksum written with it: it is corrupt or was edited by hand"
        )
    return obj


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of named tensors: names, dtypes, shapes and bytes, in name order (independent of memory layout)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        v = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{v.dtype}|{tuple(v.shape)}|".encode())
        if v.numel():
            h.update(v.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, copying any that share memory with an earlier one (safetensors refuses shared
    storage; e.g. layers fed the same input share one eigenbasis tensor)."""
    out, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().contiguous().cpu()
        if v.numel() and v.untyped_storage().data_ptr() in seen:
            v = v.clone()
        if v.numel():
            seen.add(v.untyped_storage().data_ptr())
        out[k] = v
    return out


def atomic_save_tensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> str:
    """Save tensors as safetensors via a temporary sibling and a rename; returns their digest (also stored in the
    file's metadata, see :func:`tensors_digest`)."""
    path = Path(path)
    tensors = _unshared(tensors)
    digest = tensors_digest(tensors)
    fd, tmp = _atomic_target(path)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={**(metadata or {}), TENSORS_SHA: digest})
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors writes a new file, 0600 like mkstemp's
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest


def tensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a safetensors file (without reading its tensors)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise CorruptArtifactError(
            f"'{path}' cannot be read as safetensors ({e}): it is truncated or corrupt"
        ) from None


def load_tensors(
    path: str | os.PathLike, *, expect: str | None = None, required: bool = False
) -> dict[str, torch.Tensor]:
    """Read a safetensors file into owned, freshly allocated tensors, verified against its checksum.

    The digest stored in the file is checked when present (``required``: it must be), and ``expect`` (the digest
    a manifest recorded) when given; a mismatch raises :class:`CorruptArtifactError`.

    safetensors may hand out views into a memory map at 8-byte alignment; BLAS kernels can then take another
    code path than for the (64-byte aligned) tensors that were saved, so a round trip would not give bit-identical
    scores. The copy also releases the file at once.
    """
    stored = tensors_metadata(path).get(TENSORS_SHA)
    try:
        tensors = {k: v.clone(memory_format=torch.contiguous_format) for k, v in load_file(str(path)).items()}
    except FileNotFoundError:
        raise
    except Exception as e:
        raise CorruptArtifactError(
            f"'{path}' cannot be read as safetensors ({e}): it is truncated or corrupt"
        ) from None
    if stored is None and expect is None and required:
        raise CorruptArtifactError(f"'{path}' has no checksum in its metadata: it is corrupt or not influencer's")
    if stored is not None or expect is not None:
        digest = tensors_digest(tensors)
        for want in (stored, expect):
            if want is not None and want != digest:
                raise CorruptArtifactError(
                    f"'{path}' does not match the checksum written with it (sha256 {digest[:12]}… ≠ {want[:12]}…): "
                    "it is corrupt; re-create it"
                )
    return tensors


def atomic_write_dir(final: Path, write: Callable[[Path], None]) -> None:
    """Fill a temporary sibling of ``final`` with ``write(tmp)`` and rename it into place.

    A crash leaves only a ``.<name>.tmp-*`` sibling, never a partial ``final``. An existing ``final`` is
    replaced; if another process renamed a folder into place first, that folder is kept.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{TMP_MARK}", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        write(tmp)
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}{TMP_MARK}old-{os.getpid()}-{time.time_ns()}")
            os.replace(final, old)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.exists():
                raise
            logger.info("Another process wrote %s first; keeping its folder.", final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------
# Run-directory lock
# --------------------------------------------------------------------------------------------------------

LOCK_NAME = "lock.json"


class RunLockedError(RuntimeError):
    """Another live process holds the run directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_temporaries(directory: str | os.PathLike) -> int:
    """Delete the temporaries of interrupted atomic writes (``.<name>.<random>.tmp``) under ``directory``; only
    safe while holding the directory's :class:`RunLock` (no live writer). Returns how many were removed."""
    removed = 0
    for p in Path(directory).rglob(".*.tmp"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed += 1
    return removed


class RunLock:
    """Exclusive lock on a run directory, held for a ``with`` block: ``<dir>/lock.json`` names the holder.

    Two processes cannot write one run directory: the second raises :class:`RunLockedError` naming the holder's
    pid and host. The lock is an ``flock`` on the file, which the kernel drops when its holder dies (even by
    SIGKILL), so a stale lock left by a dead process is taken over silently. Acquiring the lock also removes
    temporaries that interrupted atomic writes left behind. Where the file system offers no
    ``flock``, the file's existence is the lock and a holder on this host whose pid is gone counts as stale.
    """

    def __init__(
        self, directory: str | os.PathLike, *, purpose: str = "run", name: str = LOCK_NAME, clean: bool = True
    ):
        self.path = Path(directory) / name
        self.purpose = purpose
        self.clean = clean  # remove interrupted writes' temporaries under the directory once the lock is had
        self._fd: int | None = None
        self._exclusive_file = False

    def _holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            return {}

    def _refuse(self, holder: dict[str, Any]) -> RunLockedError:
        who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
        what = f" ({holder['purpose']})" if holder.get("purpose") else ""
        return RunLockedError(
            f"run directory '{self.path.parent}' is in use by {who}{what} since {holder.get('since', '?')}; "
            "wait for it to finish, use another directory, or — if that process is gone — delete "
            f"'{self.path}'"
        )

    def _record(self) -> bytes:
        import socket
        import time

        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "purpose": self.purpose,
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        return (json.dumps(info) + "\n").encode()

    def acquire(self) -> RunLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._refuse(self._holder()) from None
        except OSError:  # no flock on this file system: fall back to an exclusive file + pid check
            os.close(fd)
            return self._acquire_by_file()
        os.ftruncate(fd, 0)
        os.write(fd, self._record())
        os.fsync(fd)
        self._fd = fd
        if self.clean:
            remove_temporaries(self.path.parent)
        return self

    def _acquire_by_file(self) -> RunLock:
        import socket

        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._holder()
                stale = holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", 0)))
                if not stale:
                    raise self._refuse(holder) from None
                self.path.unlink(missing_ok=True)
                continue
            os.write(fd, self._record())
            os.fsync(fd)
            os.close(fd)
            self._exclusive_file = True
            if self.clean:
                remove_temporaries(self.path.parent)
            return self
        raise self._refuse(self._holder())

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        elif self._exclusive_file:
            self.path.unlink(missing_ok=True)
            self._exclusive_file = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
