"""Partitions: one fitting stage over a data range and/or a layer group, saved as raw sums (``fit_partition``);
:func:`merge_fit` adds partitions up and finishes the stage (equal to one fit, up to float summation order)."""

from __future__ import annotations

import hashlib
import math
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from influencer import distributed as dist
from influencer.curvature.checkpoint import _Checkpoint, _clear_partials
from influencer.curvature.core import Curvature, LayerFactors, resolve_damping
from influencer.curvature.fingerprint import fingerprint_from_samples, weight_sample
from influencer.curvature.fit import DEFAULT_CHECKPOINT_EVERY, _check_options
from influencer.curvature.linalg import (
    split_sizes,
)
from influencer.curvature.strategies import strategy as strategy_record
from influencer.curvature.sums import _finish_stage, _Fit, _Shape, _Sums, agree_owners
from influencer.io import atomic_save_tensors, load_tensors, tensors_metadata
from influencer.layers import LayerSpec, candidate_layers, select_layers
from influencer.ledger import Ledger
from influencer.passes import eval_mode
from influencer.tasks import Task

_PARTITION = "partition.json"
_SUMS_DONE = "sums"
_SUMS = "sums.safetensors"


# --------------------------------------------------------------------------------------------------------
# Partitions: one stage over a data range and/or a layer group; merge
# --------------------------------------------------------------------------------------------------------


def basis_digest(factors: dict[str, LayerFactors], names: Sequence[str]) -> str:
    """Identifies the eigenbases (through their eigenvalues) a Λ partition was fitted in."""
    h = hashlib.sha256()
    for name in names:
        f = factors[name]
        if f.eig_a is None or f.eig_s is None:
            raise ValueError(f"the basis has no eigenbasis for layer '{name}'")
        h.update(name.encode())
        h.update(f.eig_a.to(torch.float64).numpy().tobytes())
        h.update(f.eig_s.to(torch.float64).numpy().tobytes())
    return h.hexdigest()


def fit_partition(
    model: nn.Module,
    task: Task,
    train: Any,
    out_dir: str | os.PathLike,
    *,
    strategy: str = "ekfac",
    fisher: str = "true",
    layers: LayerSpec = None,
    blocks: int = 1,
    data_range: tuple[int, int] | None = None,
    basis: Curvature | str | os.PathLike | None = None,
    batch_size: int = 64,
    seed: int = 0,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    progress: bool = True,
    precision: str = "float32",
) -> Path:
    """One fitting stage over sequences ``data_range`` = (start, stop) of ``train`` and the layers ``layers``;
    saves the raw sums and counts in ``out_dir`` (``partition.json`` + ``sums.safetensors``) and returns it.

    The stage follows from the strategy: ``diagonal`` → Λ in the standard basis; ``kfac`` → covariances;
    ``ekfac`` → covariances, or, with ``basis`` (the eigenbases-only :class:`Curvature` that :func:`merge_fit` of
    the covariance partitions returns, or its directory), the eigenvalues Λ in that basis. Every partition of
    one fit must use the same strategy, fisher, blocks, seed, precision and training set. Partitions can run as separate
    jobs (and each under torchrun); the call is resumable like ``fit_curvature(out_dir=...)`` and returns at once
    when the partition is already complete.
    """
    _check_options(strategy, fisher)
    kind = strategy_record(strategy)
    if not kind.stages:
        raise ValueError("the identity strategy has nothing to fit; use fit_curvature(strategy='identity')")
    tracked = select_layers(model, layers if layers is not None else task.default_layers(model))
    dataset = task.as_dataset(train)
    n = len(dataset)  # type: ignore[arg-type]
    lo, hi = (0, n) if data_range is None else (int(data_range[0]), int(data_range[1]))
    if not 0 <= lo < hi <= n:
        raise ValueError(f"data_range {data_range} is not a non-empty range within the {n} training sequences")
    for layer in tracked:
        split_sizes(layer.width, blocks)
        split_sizes(layer.d_out, blocks)
    if basis is not None and not isinstance(basis, Curvature):
        basis = Curvature.load(basis)
    if kind.basis_stage is not None and basis is not None:
        stage = kind.basis_stage
        missing = [x.name for x in tracked if x.name not in basis.layers]
        if missing:
            raise ValueError(
                f"the basis has no eigenbasis for layers {missing}; pass the merged covariance stage of the same layers"
            )
        if basis.strategy != strategy or basis.blocks != blocks or basis.seed != seed or basis.fisher != fisher:
            raise ValueError("the basis was fitted with other settings (strategy/blocks/seed/fisher)")
        basis_id: str | None = basis_digest(basis.layers, [x.name for x in tracked])
    elif basis is not None:
        raise ValueError(f"basis= is only used by the second (eigenvalue) stage of strategy 'ekfac', not {strategy!r}")
    else:
        stage = kind.first_stage
        basis_id = None
    loss = "sampled" if fisher == "true" else "train"
    fit = _Fit(model, task, tracked, dataset, batch_size, loss, seed, progress, blocks, precision)
    module_index = {x.name: i for i, x in enumerate(candidate_layers(model))}
    samples = {x.name: weight_sample(x) for x in tracked}
    config = {
        "format": "influencer.fit_partition",
        "version": 2,
        "stage": stage,
        "strategy": strategy,
        "fisher": fisher,
        "blocks": blocks,
        "seed": seed,
        "n_dataset": n,
        "data_range": [lo, hi],
        "dtype": str(fit.dtype),
        "basis": basis_id,
        "layer_order": [x.name for x in tracked],
        "layers": {
            x.name: {
                "kind": x.kind,
                "d_out": x.d_out,
                "d_in": x.d_in,
                "bias": x.bias,
                "module_index": module_index[x.name],
                "weights": hashlib.sha256(samples[x.name].numpy().tobytes()).hexdigest(),
            }
            for x in tracked
        },
    }
    if precision != "float32":  # absent = float32 (partitions written before the option agree)
        config["precision"] = precision
    out = Path(out_dir)
    ledger = Ledger(out / _PARTITION, "fit partition", config, format="influencer.fit_partition", version=2)
    with dist.locked(out, purpose="fit_partition"):
        # the ledger: this partition's settings (another partition here is refused naming the setting) and, once
        # its sums are saved, done = ["sums"] with their checksum (the commit point)
        if dist.broadcast_object(dist.run_collectively(lambda: _SUMS_DONE in ledger.open())):
            return out
        ckpt = _Checkpoint(out / "partial", stage, config, checkpoint_every)
        with eval_mode(model):
            sums = fit.accumulate(stage, lo, hi, bases=basis.layers if basis is not None else None, checkpoint=ckpt)

        def commit() -> None:
            tensors, meta = sums.state()
            tensors.update({f"weights/{name}": s for name, s in samples.items()})
            token = uuid.uuid4().hex
            digest = atomic_save_tensors(out / _SUMS, tensors, metadata={"save_token": token})
            ledger.mark([_SUMS_DONE], sums=meta, save_token=token, sha256_tensors=digest)

        dist.run_collectively(commit)
        ckpt.clear()
        _clear_partials(out / "partial")
    return out


@dataclass
class _Partition:
    path: Path
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def range(self) -> tuple[int, int]:
        return tuple(self.meta["data_range"])  # type: ignore[return-value]


def _load_partition(path: Path) -> _Partition:

    if not (path / _PARTITION).is_file() or not (path / _SUMS).is_file():
        raise FileNotFoundError(
            f"no finished partition at '{path}' (expected {_PARTITION} and {_SUMS}); run "
            "fit_partition for it (again) to finish it"
        )
    record = Ledger.read(path / _PARTITION)
    if record.get("format") != "influencer.fit_partition":
        raise ValueError(f"'{path / _PARTITION}' is not an influencer fit partition")
    if "config" not in record:  # version 1: settings and sums in one record, written once finished
        meta = record
    elif _SUMS_DONE not in record.get("done", []):
        raise FileNotFoundError(f"the partition at '{path}' is unfinished; run fit_partition for it again to finish it")
    else:
        meta = {**record["config"], **{k: v for k, v in record.items() if k not in ("config", "done")}}
    if tensors_metadata(path / _SUMS).get("save_token") != meta.get("save_token"):
        raise ValueError(f"'{path}' holds sums and a manifest from different saves; run fit_partition again")
    return _Partition(path, meta, load_tensors(path / _SUMS, expect=meta.get("sha256_tensors"), required=True))


def merge_fit(
    paths: Sequence[str | os.PathLike],
    *,
    basis: Curvature | str | os.PathLike | None = None,
    damping: float | None = None,
    damping_factor: float = 0.1,
    n_train: int | None = None,
) -> Curvature:
    """Add up partitions of one fitting stage (:func:`fit_partition`) and finish it: a :class:`Curvature`.

    For every layer the data ranges of the partitions holding it must be disjoint and cover the training set.
    ``diagonal`` and ``kfac`` partitions give the finished curvature. EK-FAC covariance partitions give the
    eigenbases only (``curv.complete`` is False): save it, run ``fit_partition(..., basis=it)`` per partition
    and merge those with ``basis=it``. Layers come out in the model's module order. Equal to one
    :func:`fit_curvature` up to float summation order.
    """
    if not (math.isfinite(damping_factor) and damping_factor > 0):
        raise ValueError(f"damping_factor must be finite and > 0, got {damping_factor}")
    if not paths:
        raise ValueError("merge_fit needs at least one partition")
    parts = [_load_partition(Path(p)) for p in paths]
    first = parts[0].meta
    for p in parts:
        p.meta.setdefault("precision", "float32")  # partitions written before the option
    for p in parts[1:]:
        for key in ("stage", "strategy", "fisher", "blocks", "seed", "n_dataset", "dtype", "precision"):
            if p.meta[key] != first[key]:
                raise ValueError(
                    f"partitions '{parts[0].path}' and '{p.path}' differ in {key} "
                    f"({first[key]!r} vs {p.meta[key]!r}); they are not parts of one fit"
                )
    stage, strategy, n = first["stage"], first["strategy"], first["n_dataset"]
    dtype = getattr(torch, first["dtype"].removeprefix("torch."))
    if basis is not None and not isinstance(basis, Curvature):
        basis = Curvature.load(basis)
    if stage == "eigenvalues":
        if basis is None:
            raise ValueError(
                "these are EK-FAC eigenvalue partitions: pass the basis they were fitted in "
                "(merge_fit(paths, basis=...))"
            )
        for p in parts:
            if basis_digest(basis.layers, p.meta["layer_order"]) != p.meta["basis"]:
                raise ValueError(f"partition '{p.path}' was fitted in another basis than the one given")
    # every layer: partitions holding it, disjoint ranges covering [0, n), consistent weights
    holders: dict[str, list[_Partition]] = {}
    info: dict[str, dict[str, Any]] = {}
    for p in parts:
        for name in p.meta["layer_order"]:
            holders.setdefault(name, []).append(p)
            li = p.meta["layers"][name]
            if name in info and info[name]["weights"] != li["weights"]:
                raise ValueError(
                    f"layer '{name}' has different weights in '{p.path}' than in another partition: "
                    "the partitions were fitted on different models"
                )
            info.setdefault(name, li)
    for name, hs in holders.items():
        hs.sort(key=lambda p: p.range)
        end = 0
        for p in hs:
            lo, hi = p.range
            if lo < end:
                raise ValueError(
                    f"layer '{name}': data ranges overlap ({p.path} starts at {lo}, before {end}); "
                    "each sequence must be fitted once"
                )
            if lo > end:
                raise ValueError(f"layer '{name}': sequences [{end}, {lo}) are in no partition")
            end = hi
        if end != n:
            raise ValueError(f"layer '{name}': sequences [{end}, {n}) are in no partition")
    names = sorted(holders, key=lambda name: info[name]["module_index"])
    shapes = [_Shape(name, info[name]["d_out"], info[name]["d_in"] + int(info[name]["bias"])) for name in names]
    total = _Sums(stage, shapes, first["blocks"], dtype, torch.device("cpu"))
    if stage == "covariance":
        maps = [{name: p.meta["sums"]["a_owner"][name] for name in p.meta["layer_order"]} for p in parts]
        owners = {}
        for name in names:
            owners.update(agree_owners([m for m in maps if name in m], [name]))
        total.set_owners(owners)
    for name in names:
        for p in holders[name]:
            t, local_owner = p.tensors, (p.meta["sums"].get("a_owner") or {}).get(name, name)
            for key in [k for k in total.t if k.startswith(f"{name}/")]:
                src = key if not key.startswith(f"{name}/a.") else key.replace(name, local_owner, 1)
                total.t[key] += t[src].to(dtype)
            total.tokens[name] += int(p.meta["sums"]["tokens"][name])
    total.sequences = n
    factors = {
        name: LayerFactors(name, info[name]["kind"], info[name]["d_out"], info[name]["d_in"], info[name]["bias"])
        for name in names
    }
    if stage == "eigenvalues":
        assert basis is not None
        for name, f in factors.items():
            b = basis.layers[name]
            f.tokens, f.qa, f.qs, f.eig_a, f.eig_s = b.tokens, b.qa, b.qs, b.eig_a, b.eig_s
    _finish_stage(stage, total, factors, strategy, dtype)
    complete = all(f.lam is not None for f in factors.values())
    for f in factors.values():
        f.damping = resolve_damping(strategy, f.lam, damping, damping_factor) if complete else 0.0
    fingerprint = fingerprint_from_samples(
        {name: [info[name]["d_out"], info[name]["d_in"], info[name]["bias"]] for name in names},
        {name: holders[name][0].tensors[f"weights/{name}"] for name in names},
    )
    return Curvature(
        strategy=strategy,
        fisher=first["fisher"],
        blocks=first["blocks"],
        n_fit=n,
        n_train=n if n_train is None else int(n_train),
        damping=damping,
        damping_factor=damping_factor,
        layers=factors,
        fingerprint=fingerprint,
        seed=first["seed"],
        precision=first["precision"],
    )
