"""Checkpoints of a fitting stage's running sums: a killed fit resumes from the last one (written atomically,
named by a commit-point JSON), and nothing else of an interrupted stage is kept."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Any, Protocol

import torch

from influencer import distributed as dist
from influencer.io import atomic_save_tensors, atomic_write_json, load_tensors, read_json


class RunningSums(Protocol):
    """What a checkpoint saves and restores: the running sums of one stage (``curvature.sums._Sums``)."""

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]: ...

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None: ...


# --------------------------------------------------------------------------------------------------------
# Checkpoints of running sums
# --------------------------------------------------------------------------------------------------------


def _digest_of(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


class _Checkpoint:
    """This rank's running sums of one stage, saved after every chunk of ``every`` sequences.

    ``<dir>/<stage>.r<rank>of<world>.json`` (the commit point) names the current tensor file; the previous
    file is removed only after the JSON points to the new one, so a kill at any moment leaves a usable pair.
    """

    def __init__(self, directory: Path, stage: str, config: dict[str, Any], every: int):
        self.dir, self.every = directory, every
        self.config = {**config, "rank": dist.rank(), "world": dist.world_size()}
        self.stem = f"{stage}.r{dist.rank()}of{dist.world_size()}"
        self.digest = _digest_of(self.config)
        self.file: str | None = None

    @property
    def manifest(self) -> Path:
        return self.dir / f"{self.stem}.json"

    def restore(self, sums: RunningSums, default: int) -> int:
        """Load the saved sums into ``sums``; returns the first sequence still to do."""
        m = read_json(self.manifest, sealed=True) if self.manifest.is_file() else None
        if m is not None and (m.get("config") != self.digest or not (self.dir / m["file"]).is_file()):
            warnings.warn(
                f"ignoring the checkpoint '{self.manifest}' (other settings); this stage starts over", stacklevel=3
            )
            m = None
        self.file = None if m is None else m["file"]
        self._remove_strays()
        if m is None:
            return default
        sums.load_state(load_tensors(self.dir / m["file"], expect=m.get("sha256_tensors"), required=True), m["sums"])
        return int(m["next"])

    def save(self, sums: RunningSums, next_: int) -> None:
        tensors, meta = sums.state()
        name = f"{self.stem}.{next_:012d}.safetensors"
        digest = atomic_save_tensors(self.dir / name, tensors)
        atomic_write_json(
            self.manifest,
            {"config": self.digest, "next": next_, "file": name, "sums": meta, "sha256_tensors": digest},
            seal=True,
        )
        if self.file is not None and self.file != name:
            (self.dir / self.file).unlink(missing_ok=True)
        self.file = name

    def _remove_strays(self) -> None:
        """Tensor files and temporaries of this rank's stage that the manifest does not name (left by a kill)."""
        if not self.dir.is_dir():
            return
        for p in [*self.dir.glob(f"{self.stem}.*.safetensors"), *self.dir.glob(f".{self.stem}.*.tmp")]:
            if p.name != self.file:
                p.unlink(missing_ok=True)

    def clear(self) -> None:
        """Remove this rank's checkpoint of the stage (after the stage's result is saved)."""
        self.manifest.unlink(missing_ok=True)
        self.file = None
        self._remove_strays()


def _clear_partials(directory: Path) -> None:
    """Once a run's result is saved: drop every checkpoint left in ``directory`` (by any rank or earlier run)."""
    dist.barrier()
    if dist.is_main():
        shutil.rmtree(directory, ignore_errors=True)
