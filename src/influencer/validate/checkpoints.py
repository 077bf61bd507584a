"""The checkpoint cache of the validation setups: :func:`cache_dir` (where checkpoints live) and
:func:`_cached_model`, which loads the model trained with a given configuration (safetensors + a JSON manifest,
keyed by a hash of the configuration) or trains and stores it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from influencer.io import atomic_save_tensors, atomic_write_json, atomic_write_text, load_tensors, read_json
from influencer.tasks import Task
from influencer.validate.training import Recipe, train_model

__all__ = ["cache_dir"]


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Checkpoint cache: ``override``, else ``$INFLUENCER_CACHE/validate``, else ``~/.cache/influencer/validate``."""
    if override is not None:
        return Path(override)
    root = os.environ.get("INFLUENCER_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "influencer") / "validate"


def _key(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def _cached_model(
    name: str,
    config: dict[str, Any],
    build: Callable[[int], nn.Module],
    task: Task,
    train: Any,
    recipe: Recipe,
    seed: int,
    cache: Path | None,
    extra_files: dict[str, str] | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Load the checkpoint for ``config`` from the cache, or train it and store it (safetensors + JSON)."""
    model = build(seed)
    folder = (cache / f"{name}-{_key(config)}") if cache is not None else None
    if folder is not None and (folder / "model.safetensors").is_file() and (folder / "manifest.json").is_file():
        manifest = read_json(folder / "manifest.json")
        if manifest.get("config") == json.loads(json.dumps(config)):
            model.load_state_dict(load_tensors(folder / "model.safetensors"))
            return model.eval(), {**manifest["train"], "cached": str(folder)}
    if log:
        kind = f"mini-batch ({recipe.batch_size})" if recipe.batch_size else "full-batch"
        log(f"training the {name} model ({recipe.steps} {kind} Adam steps)…")
    stats = train_model(model, task, train, recipe, seed=seed)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        for fname, text in (extra_files or {}).items():
            atomic_write_text(folder / fname, text)
        atomic_save_tensors(folder / "model.safetensors", {k: v for k, v in model.state_dict().items()})
        atomic_write_json(
            folder / "manifest.json", {"format": "influencer.validate.checkpoint", "config": config, "train": stats}
        )
        stats = {**stats, "cached": str(folder)}
    return model.eval(), stats
