"""Fitting passes: covariances A and S per token, eigenbases in float64, Λ per sequence.

Pass costs (B sequences of T tokens, a layer [d_out, w]): the covariance pass adds T·(w² + d_out²) per
sequence to a forward+backward; the EK-FAC Λ pass rotates tokens into the eigenbasis (or forms the per-sequence
gradient and rotates it, whichever is cheaper) and squares. Neither pass computes parameter gradients.

A fit is a sequence of *stages* (``covariance`` → eigendecomposition, then ``eigenvalues`` for EK-FAC; one
``diagonal`` stage for the diagonal strategy). Each stage only adds up per-token or per-sequence sums, so it
splits over data freely: labels are sampled by a pure function of (seed, stage, example index, position), so
every split draws the same labels, and the sums are additive.

- **Distributed** (inside a torch.distributed process group): each rank accumulates a contiguous share of the
  sequences, the sums and counts are all-reduced, and the eigendecompositions are spread over the ranks and
  broadcast. Every rank returns the same :class:`Curvature`.
- **Resumable** (``out_dir``): the running sums are checkpointed atomically every ``checkpoint_every``
  sequences and every finished stage is saved; the same call after an interruption (even SIGKILL) continues.
- **Partitions**: :func:`fit_partition` runs one stage over a data range and/or a layer group and saves the raw
  sums and counts; :func:`merge_fit` adds partitions up and finishes the stage (equal to one fit, up to float
  summation order).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from influencer import distributed as dist
from influencer.curvature.core import (
    FISHERS,
    STRATEGIES,
    Curvature,
    LayerFactors,
    fingerprint_from_samples,
    model_fingerprint,
    resolve_damping,
    weight_sample,
)
from influencer.curvature.linalg import (
    accumulate_squared_grads,
    block_covariance,
    eigh_blocks,
    rotate,
    rotate_tokens_first,
    split_sizes,
)
from influencer.io import atomic_save_tensors, atomic_write_json, load_tensors, read_json
from influencer.layers import Layer, LayerSpec, candidate_layers, select_layers
from influencer.passes import amp_aware, batches, compute_dtype, eval_mode, layer_io, model_device
from influencer.progress import progress_bar
from influencer.tasks import Task

#: the passes of a fit; each draws its own sampled labels (its stream)
STAGES = ("covariance", "eigenvalues", "diagonal")
_STREAM = {"covariance": 1, "eigenvalues": 2, "diagonal": 3}
_TITLES = {"covariance": "covariance", "eigenvalues": "eigenvalue correction", "diagonal": "diagonal"}
_STREAM_COVARIANCE, _STREAM_LAMBDA, _STREAM_DIAGONAL = 1, 2, 3  # = _STREAM (kept for callers)
_PARTITION = "partition.json"
_SUMS = "sums.safetensors"
_FIT = "fit.json"
DEFAULT_CHECKPOINT_EVERY = 1024


def stages_of(strategy: str) -> tuple[str, ...]:
    """The fitting stages of a strategy, in order."""
    return {"identity": (), "diagonal": ("diagonal",), "kfac": ("covariance",), "ekfac": ("covariance", "eigenvalues")}[
        strategy
    ]


def _check_options(strategy: str, fisher: str, damping_factor: float = 0.1) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if fisher not in FISHERS:
        raise ValueError(f"fisher must be one of {FISHERS}, got {fisher!r}")
    if damping_factor <= 0:
        raise ValueError(f"damping_factor must be > 0, got {damping_factor}")


@amp_aware
def fit_curvature(
    model: nn.Module,
    task: Task,
    train: Any,
    *,
    strategy: str = "ekfac",
    fisher: str = "true",
    damping: float | None = None,
    damping_factor: float = 0.1,
    layers: LayerSpec = None,
    blocks: int = 1,
    batch_size: int = 64,
    n_train: int | None = None,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    progress: bool = True,
) -> Curvature:
    """Fit the damped block-diagonal curvature of the tracked layers on ``train``.

    strategy: "ekfac" (default), "kfac", "diagonal" or "identity".
    fisher: "true" (labels sampled from the model, the default) or "empirical" (the data's labels).
    damping: None → ``damping_factor`` × mean(Λ_l) per layer (paper §5), or one absolute value.
    layers: a preset ("mlp", "attention", "all"), names, a regex or a predicate; None → the task's default
        ("mlp" for Hugging Face causal LMs, "all" otherwise).
    blocks: split A and S into this many equal diagonal blocks (paper App. A); memory ÷ blocks.
    n_train: training-set size N for per-copy units (default: the number of fitting sequences).
    seed: seeds the sampled labels; results do not depend on batch size, padding or sharding.
    out_dir: make the fit resumable: running sums are checkpointed every ``checkpoint_every`` sequences (per
        rank) and finished stages are saved (``basis/``, ``curvature/``); calling again continues. A lock file
        stops a second process from using the same directory.

    Inside a torch.distributed process group every rank fits its share of the sequences and returns the same
    result (see :mod:`influencer.distributed`).
    """
    _check_options(strategy, fisher, damping_factor)
    tracked = select_layers(model, layers if layers is not None else task.default_layers(model))
    dataset = task.as_dataset(train)
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("the training data is empty")
    for layer in tracked:
        split_sizes(layer.width, blocks)
        split_sizes(layer.d_out, blocks)
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be ≥ 1, got {checkpoint_every}")
    fit = _Fit(
        model, task, tracked, dataset, batch_size, "sampled" if fisher == "true" else "train", seed, progress, blocks
    )
    fingerprint = model_fingerprint(tracked)
    out = Path(out_dir) if out_dir is not None else None

    def finish(curv: Curvature) -> Curvature:
        curv = curv.with_damping(damping, damping_factor) if strategy != "identity" and curv.complete else curv
        curv.n_train = n if n_train is None else int(n_train)
        return curv

    def build(factors: dict[str, LayerFactors]) -> Curvature:
        for f in factors.values():
            done = f.lam is not None or strategy == "identity"
            f.damping = resolve_damping(strategy, f.lam, damping, damping_factor) if done else 0.0
        return Curvature(
            strategy=strategy,
            fisher=fisher,
            blocks=blocks,
            n_fit=n,
            n_train=n,
            damping=damping,
            damping_factor=damping_factor,
            layers=factors,
            fingerprint=fingerprint,
            seed=seed,
        )

    factors = {x.name: LayerFactors(x.name, x.kind, x.d_out, x.d_in, x.bias) for x in tracked}
    stages = stages_of(strategy)
    if out is None:
        with eval_mode(model):
            for stage in stages:
                sums = fit.accumulate(stage, 0, n, bases=factors)
                _finish_stage(stage, sums, factors, strategy, fit.dtype, progress)
        return finish(build(factors))

    config = {
        "strategy": strategy,
        "fisher": fisher,
        "blocks": blocks,
        "seed": seed,
        "n": n,
        "layers": [x.name for x in tracked],
        "fingerprint": fingerprint["digest"],
        "dtype": str(fit.dtype),
        "checkpoint_every": checkpoint_every,
    }
    with dist.locked(out, purpose="fit"):
        done = dist.run_collectively(lambda: _open_fit_dir(out, config))
        done = dist.broadcast_object(done)
        if "curvature" in done:
            return finish(Curvature.load(out / "curvature"))
        with eval_mode(model):
            for i, stage in enumerate(stages):
                last = i == len(stages) - 1
                if stage in done and not last:
                    factors = dict(Curvature.load(out / "basis").layers)
                    continue
                ckpt = _Checkpoint(out / "partial", stage, {**config, "stage": stage}, checkpoint_every)
                sums = fit.accumulate(stage, 0, n, bases=factors, checkpoint=ckpt)
                _finish_stage(stage, sums, factors, strategy, fit.dtype, progress)
                target = "curvature" if last else "basis"
                curv = build(factors)
                done.append(stage)
                if last:
                    done.append("curvature")
                dist.run_collectively(functools.partial(_commit_stage, out, target, curv, config, list(done)))
                ckpt.clear()
        if not stages:
            dist.run_collectively(
                functools.partial(_commit_stage, out, "curvature", build(factors), config, ["curvature"])
            )
        _clear_partials(out / "partial")
        return finish(build(factors))


def _commit_stage(out: Path, target: str, curv: Curvature, config: dict[str, Any], done: list[str]) -> None:
    """Save a finished stage's result, then record it in ``fit.json`` (the commit point)."""
    curv.save(out / target)
    atomic_write_json(out / _FIT, {"format": "influencer.fit", "version": 1, "config": config, "done": done})


def _open_fit_dir(out: Path, config: dict[str, Any]) -> list[str]:
    """Create or check ``fit.json``; returns the finished stages."""
    path = out / _FIT
    if path.is_file():
        saved = read_json(path)
        if saved.get("config") != config:
            raise ValueError(f"'{out}' holds a fit with different settings; use another out_dir or delete it")
        return list(saved.get("done", []))
    atomic_write_json(path, {"format": "influencer.fit", "version": 1, "config": config, "done": []})
    return []


# --------------------------------------------------------------------------------------------------------
# Running sums of one stage
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shape:
    name: str
    d_out: int
    width: int


class _Sums:
    """Sums of one stage over the sequences seen so far, on the model's device.

    covariance: per layer the blocks of Σ_t ā ā ᵀ (``<name>/a.<i>``) and Σ_t g gᵀ (``<name>/s.<i>``); layers fed
    the very same input (gate_proj and up_proj) share one A sum, held by the layer ``a_owner`` names.
    eigenvalues / diagonal: per layer Σ_n (per-sequence gradient, in the eigenbasis or not)ᵀ⊙² [w, d_out]
    (``<name>/sq``). Counts: unmasked tokens per layer and sequences.
    """

    def __init__(self, stage: str, shapes: list[_Shape], blocks: int, dtype: torch.dtype, device: torch.device):
        self.stage, self.shapes, self.blocks, self.dtype, self.device = stage, shapes, blocks, dtype, device
        self.sizes = {x.name: (split_sizes(x.width, blocks), split_sizes(x.d_out, blocks)) for x in shapes}
        self.tokens = {x.name: 0 for x in shapes}
        self.sequences = 0
        self.a_owner: dict[str, str] | None = None  # covariance: decided by the first batch
        self.t: dict[str, torch.Tensor] = {}
        self.bases: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self._qa_ids: dict[str, int] = {}
        for x in shapes:
            if stage == "covariance":
                for i, size in enumerate(self.sizes[x.name][1]):
                    self.t[f"{x.name}/s.{i}"] = self._zeros(size, size)
            else:
                self.t[f"{x.name}/sq"] = self._zeros(x.width, x.d_out)

    def _zeros(self, *shape: int) -> torch.Tensor:
        return torch.zeros(*shape, dtype=self.dtype, device=self.device)

    def _blocks(self, name: str, kind: str) -> list[torch.Tensor]:
        return [self.t[f"{name}/{kind}.{i}"] for i in range(self.blocks)]

    def set_bases(self, factors: dict[str, LayerFactors]) -> None:
        """Eigenbases for the ``eigenvalues`` stage (moved to the device once)."""
        for x in self.shapes:
            f = factors[x.name]
            if f.qa is None or f.qs is None:
                raise ValueError(f"layer '{x.name}' has no eigenbasis: fit the covariance stage first")
            self.bases[x.name] = (
                [q.to(self.device, self.dtype) for q in f.qs],
                [q.to(self.device, self.dtype) for q in f.qa],
            )
            self._qa_ids[x.name] = id(f.qa[0])

    # --- ownership of shared A sums -------------------------------------------------------------------
    def set_owners(self, owners: dict[str, str]) -> None:
        """Adopt an A-sharing map: allocate the A sums a fresh accumulator needs, or privatise shared ones."""
        if self.a_owner is None:
            self.a_owner = dict(owners)
            for name, owner in owners.items():
                if owner == name:
                    for i, size in enumerate(self.sizes[name][0]):
                        self.t[f"{name}/a.{i}"] = self._zeros(size, size)
            return
        for name, owner in owners.items():
            if owner == name and self.a_owner[name] != name:
                self._privatise(name)

    def _privatise(self, name: str) -> None:
        assert self.a_owner is not None
        for i, c in enumerate(self._blocks(self.a_owner[name], "a")):
            self.t[f"{name}/a.{i}"] = c.clone()
        self.a_owner[name] = name

    # --- accumulation ---------------------------------------------------------------------------------
    def add(self, io: dict[str, Any], sequences: int) -> None:
        if self.stage == "covariance":
            self._add_covariance(io)
        else:
            self._add_squared(io)
        self.sequences += sequences

    def _add_covariance(self, io: dict[str, Any]) -> None:
        if self.a_owner is None:
            first_seen: dict[int, str] = {}
            self.set_owners({name: first_seen.setdefault(id(x.a), name) for name, x in io.items()})
        assert self.a_owner is not None
        for name, owner in list(self.a_owner.items()):
            if owner != name and io[name].a is not io[owner].a:  # sharing broke: take a private copy
                self._privatise(name)
        for name, x in io.items():
            a_sizes, s_sizes = self.sizes[name]
            if self.a_owner[name] == name:
                block_covariance(x.a.reshape(-1, x.a.shape[-1]), a_sizes, self.dtype, self._blocks(name, "a"))
            block_covariance(x.g.reshape(-1, x.g.shape[-1]), s_sizes, self.dtype, self._blocks(name, "s"))
            self.tokens[name] += x.tokens

    def _add_squared(self, io: dict[str, Any]) -> None:
        rotated = self.stage == "eigenvalues"
        rotated_inputs: dict[tuple[int, int], torch.Tensor] = {}  # (id ā, id Q_A) → ā Q_A, shared inputs
        for name, x in io.items():
            a, g = x.a.to(self.dtype), x.g.to(self.dtype)
            qs, qa = self.bases[name] if rotated else (None, None)
            rotated_a = None
            if rotated and rotate_tokens_first(a.shape[1], g.shape[2], a.shape[2]):
                key = (id(x.a), self._qa_ids[name])
                if key not in rotated_inputs:
                    rotated_inputs[key] = rotate(a, qa)  # type: ignore[arg-type]
                rotated_a = rotated_inputs[key]
            accumulate_squared_grads(self.t[f"{name}/sq"], a, g, qs, qa, rotated_a)
            self.tokens[name] += x.tokens

    # --- state: checkpoints, collectives, partitions -------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors on the CPU, JSON counts) — everything needed to continue later."""
        return (
            {k: v.detach().cpu() for k, v in self.t.items()},
            {"stage": self.stage, "tokens": self.tokens, "sequences": self.sequences, "a_owner": self.a_owner},
        )

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if meta["stage"] != self.stage:
            raise ValueError(f"sums of stage '{meta['stage']}' cannot continue stage '{self.stage}'")
        if meta.get("a_owner") is not None:
            self.a_owner = None
            self.set_owners(meta["a_owner"])
        for key, value in tensors.items():
            if key not in self.t or self.t[key].shape != value.shape:
                raise ValueError(f"saved sums do not match the tracked layers ('{key}')")
            self.t[key].copy_(value)
        self.tokens = {x.name: int(meta["tokens"][x.name]) for x in self.shapes}
        self.sequences = int(meta["sequences"])

    def all_reduce_(self) -> None:
        """Sum over ranks (no-op in one process); afterwards every rank holds the same sums."""
        if dist.world_size() == 1:
            if self.stage == "covariance" and self.a_owner is None:
                self.set_owners({x.name: x.name for x in self.shapes})
            return
        if self.stage == "covariance":
            maps = [m for m in dist.all_gather_object(self.a_owner) if m is not None]
            self.set_owners(agree_owners(maps, [x.name for x in self.shapes]))
        counts = torch.tensor([self.sequences, *self.tokens.values()], dtype=torch.int64)
        dist.all_reduce_sum_(counts)
        self.sequences = int(counts[0])
        self.tokens = {x.name: int(c) for x, c in zip(self.shapes, counts[1:], strict=True)}
        for key in sorted(self.t):
            dist.all_reduce_sum_(self.t[key])


def agree_owners(maps: list[dict[str, str]], names: list[str]) -> dict[str, str]:
    """One A-sharing map from several: a layer shares its owner's A only where every map agrees."""
    out = {}
    for name in names:
        owners = {m[name] for m in maps}
        out[name] = owners.pop() if len(owners) == 1 else name
    return out


# --------------------------------------------------------------------------------------------------------
# Passes and stage results
# --------------------------------------------------------------------------------------------------------


class _Fit:
    """What the passes of one fit share: model, data, loss, seed."""

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        layers: list[Layer],
        dataset: Any,
        batch_size: int,
        loss: str,
        seed: int,
        progress: bool,
        blocks: int,
    ):
        self.model, self.task, self.layers, self.dataset = model, task, layers, dataset
        self.batch_size, self.loss, self.seed, self.progress, self.blocks = batch_size, loss, seed, progress, blocks
        self.dtype = compute_dtype(model)
        self.device = model_device(model)
        self.shapes = [_Shape(x.name, x.d_out, x.width) for x in layers]

    def accumulate(
        self,
        stage: str,
        lo: int,
        hi: int,
        *,
        bases: dict[str, LayerFactors] | None = None,
        checkpoint: _Checkpoint | None = None,
    ) -> _Sums:
        """Sums of ``stage`` over sequences [lo, hi) — this rank's share of them, then all-reduced."""
        sums = _Sums(stage, self.shapes, self.blocks, self.dtype, self.device)
        if stage == "eigenvalues":
            assert bases is not None
            sums.set_bases(bases)
        r_lo, r_hi = dist.shard_range(lo, hi)
        start = checkpoint.restore(sums, r_lo) if checkpoint is not None else r_lo
        step = checkpoint.every if checkpoint is not None else max(1, r_hi - r_lo)
        title = _TITLES[stage]
        with progress_bar(title, r_hi - start, unit="seq", enabled=self.progress and dist.is_main()) as bar:
            for c_lo in range(start, r_hi, step):
                c_hi = min(c_lo + step, r_hi)
                for idx, batch in batches(
                    self.dataset, self.task, self.batch_size, desc=title, progress=False, start=c_lo, stop=c_hi
                ):
                    io = layer_io(
                        self.model,
                        self.task,
                        self.layers,
                        batch,
                        idx,
                        loss=self.loss,
                        seed=self.seed,
                        stream=_STREAM[stage],
                    )
                    sums.add(io, len(idx))
                    bar.update(len(idx))
                if checkpoint is not None:
                    checkpoint.save(sums, c_hi)
        sums.all_reduce_()
        return sums


class _Run:
    """The passes of a single-process fit one by one (the benchmarks time them apart)."""

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        layers: list[Layer],
        dataset: Any,
        batch_size: int,
        loss: str,
        seed: int,
        progress: bool,
    ):
        self.args = (model, task, layers, dataset, batch_size, loss, seed, progress)
        self.dtype = compute_dtype(model)
        self.n = len(dataset)

    def _accumulate(self, stage: str, blocks: int, factors: dict[str, LayerFactors]) -> _Sums:
        return _Fit(*self.args, blocks).accumulate(stage, 0, self.n, bases=factors)

    def covariance(self, factors: dict[str, LayerFactors], blocks: int) -> None:
        _finish_stage("covariance", self._accumulate("covariance", blocks, factors), factors, "ekfac", self.dtype)

    def kfac_eigenvalues(self, factors: dict[str, LayerFactors]) -> None:
        for f in factors.values():
            assert f.eig_a is not None and f.eig_s is not None
            f.lam = ((f.tokens / self.n) * torch.outer(f.eig_s.clamp_min(0), f.eig_a.clamp_min(0))).to(self.dtype)

    def ekfac_eigenvalues(self, factors: dict[str, LayerFactors]) -> None:
        blocks = len(next(iter(factors.values())).qa or [1])
        _finish_stage("eigenvalues", self._accumulate("eigenvalues", blocks, factors), factors, "ekfac", self.dtype)

    def diagonal(self, factors: dict[str, LayerFactors]) -> None:
        _finish_stage("diagonal", self._accumulate("diagonal", 1, factors), factors, "diagonal", self.dtype)


def _finish_stage(
    stage: str, sums: _Sums, factors: dict[str, LayerFactors], strategy: str, dtype: torch.dtype, progress: bool = False
) -> None:
    """Turn a stage's (all-reduced) sums into factors: eigenbases (+ K-FAC Λ), or Λ."""
    n = sums.sequences
    if n == 0:
        raise ValueError("no training sequences were fitted")
    if stage == "covariance":
        _eigenbases(sums, factors, dtype, progress)
        if strategy == "kfac":
            for f in factors.values():
                assert f.eig_a is not None and f.eig_s is not None
                f.lam = ((f.tokens / n) * torch.outer(f.eig_s.clamp_min(0), f.eig_a.clamp_min(0))).to(dtype)
    else:
        for f in factors.values():
            f.lam = (sums.t[f"{f.name}/sq"].T / n).contiguous().cpu()
            if stage == "diagonal":
                f.tokens = sums.tokens[f.name]


def _eigenbases(sums: _Sums, factors: dict[str, LayerFactors], dtype: torch.dtype, progress: bool = False) -> None:
    """Eigendecompose A/count and S/count block by block in float64; in a process group each decomposition runs
    on one rank (spread by cost) and is broadcast. Layers sharing an A sum share one eigenbasis."""
    assert sums.a_owner is not None
    jobs: list[tuple[str, str]] = []
    for name in factors:
        if sums.a_owner[name] == name:
            jobs.append(("a", name))
        jobs.append(("s", name))
    mats = [sums._blocks(name, kind) for kind, name in jobs]
    owners = dist.assign([float(sum(c.shape[0] ** 3 for c in m)) for m in mats])
    results: dict[tuple[str, str], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    with progress_bar("eigendecomposition", len(jobs), unit="matrices", enabled=progress and dist.is_main()) as bar:
        for (kind, name), blocks, owner in zip(jobs, mats, owners, strict=True):
            count = max(1, sums.tokens[name])
            if owner == dist.rank():
                vals, vecs = eigh_blocks([c / count for c in blocks])
            else:
                vals = [torch.empty(c.shape[0], dtype=torch.float64, device=c.device) for c in blocks]
                vecs = [torch.empty(c.shape, dtype=torch.float64, device=c.device) for c in blocks]
            for v, q in zip(vals, vecs, strict=True):
                dist.broadcast_(v, owner)
                dist.broadcast_(q, owner)
            results[(kind, name)] = (vals, [q.to(dtype).cpu() for q in vecs])
            bar.update(1)
    for name, f in factors.items():
        eig_a, qa = results[("a", sums.a_owner[name])]
        eig_s, qs = results[("s", name)]
        f.tokens = sums.tokens[name]
        f.qa, f.qs = qa, qs
        f.eig_a = torch.cat(eig_a).cpu()
        f.eig_s = torch.cat(eig_s).cpu()


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

    def restore(self, sums: _Sums, default: int) -> int:
        """Load the saved sums into ``sums``; returns the first sequence still to do."""
        m = read_json(self.manifest) if self.manifest.is_file() else None
        if m is not None and (m.get("config") != self.digest or not (self.dir / m["file"]).is_file()):
            warnings.warn(
                f"ignoring the checkpoint '{self.manifest}' (other settings); this stage starts over", stacklevel=3
            )
            m = None
        self.file = None if m is None else m["file"]
        self._remove_strays()
        if m is None:
            return default
        sums.load_state(load_tensors(self.dir / m["file"]), m["sums"])
        return int(m["next"])

    def save(self, sums: _Sums, next_: int) -> None:
        tensors, meta = sums.state()
        name = f"{self.stem}.{next_:012d}.safetensors"
        atomic_save_tensors(self.dir / name, tensors)
        atomic_write_json(self.manifest, {"config": self.digest, "next": next_, "file": name, "sums": meta})
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
) -> Path:
    """One fitting stage over sequences ``data_range`` = (start, stop) of ``train`` and the layers ``layers``;
    saves the raw sums and counts in ``out_dir`` (``partition.json`` + ``sums.safetensors``) and returns it.

    The stage follows from the strategy: ``diagonal`` → Λ in the standard basis; ``kfac`` → covariances;
    ``ekfac`` → covariances, or, with ``basis`` (the eigenbases-only :class:`Curvature` that :func:`merge_fit` of
    the covariance partitions returns, or its directory), the eigenvalues Λ in that basis. Every partition of
    one fit must use the same strategy, fisher, blocks, seed and training set. Partitions can run as separate
    jobs (and each under torchrun); the call is resumable like ``fit_curvature(out_dir=...)`` and returns at once
    when the partition is already complete.
    """
    _check_options(strategy, fisher)
    if strategy == "identity":
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
    if strategy == "ekfac" and basis is not None:
        stage = "eigenvalues"
        missing = [x.name for x in tracked if x.name not in basis.layers]
        if missing:
            raise ValueError(
                f"the basis has no eigenbasis for layers {missing}; pass the merged covariance stage of the same layers"
            )
        if basis.strategy != "ekfac" or basis.blocks != blocks or basis.seed != seed or basis.fisher != fisher:
            raise ValueError("the basis was fitted with other settings (strategy/blocks/seed/fisher)")
        basis_id: str | None = basis_digest(basis.layers, [x.name for x in tracked])
    elif basis is not None:
        raise ValueError(f"basis= is only used by the second (eigenvalue) stage of strategy 'ekfac', not {strategy!r}")
    else:
        stage = "diagonal" if strategy == "diagonal" else "covariance"
        basis_id = None
    fit = _Fit(
        model, task, tracked, dataset, batch_size, "sampled" if fisher == "true" else "train", seed, progress, blocks
    )
    module_index = {x.name: i for i, x in enumerate(candidate_layers(model))}
    samples = {x.name: weight_sample(x) for x in tracked}
    config = {
        "format": "influencer.fit_partition",
        "version": 1,
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
    out = Path(out_dir)
    with dist.locked(out, purpose="fit_partition"):

        def check() -> bool:
            if not (out / _PARTITION).is_file():
                return False
            saved = read_json(out / _PARTITION)
            if {k: saved.get(k) for k in config} != config:
                raise ValueError(f"'{out}' holds a partition with different settings; use another out_dir or delete it")
            return True

        if dist.broadcast_object(dist.run_collectively(check)):
            return out
        ckpt = _Checkpoint(out / "partial", stage, config, checkpoint_every)
        with eval_mode(model):
            sums = fit.accumulate(stage, lo, hi, bases=basis.layers if basis is not None else None, checkpoint=ckpt)

        def commit() -> None:
            tensors, meta = sums.state()
            tensors.update({f"weights/{name}": s for name, s in samples.items()})
            token = uuid.uuid4().hex
            atomic_save_tensors(out / _SUMS, tensors, metadata={"save_token": token})
            atomic_write_json(out / _PARTITION, {**config, "sums": meta, "save_token": token})

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
    from safetensors import safe_open

    if not (path / _PARTITION).is_file() or not (path / _SUMS).is_file():
        raise FileNotFoundError(
            f"no finished partition at '{path}' (expected {_PARTITION} and {_SUMS}); run "
            "fit_partition for it (again) to finish it"
        )
    meta = read_json(path / _PARTITION)
    if meta.get("format") != "influencer.fit_partition":
        raise ValueError(f"'{path / _PARTITION}' is not an influencer fit partition")
    with safe_open(str(path / _SUMS), framework="pt") as fh:
        token = (fh.metadata() or {}).get("save_token")
    if token != meta.get("save_token"):
        raise ValueError(f"'{path}' holds sums and a manifest from different saves; run fit_partition again")
    return _Partition(path, meta, load_tensors(path / _SUMS))


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
    if damping_factor <= 0:
        raise ValueError(f"damping_factor must be > 0, got {damping_factor}")
    if not paths:
        raise ValueError("merge_fit needs at least one partition")
    parts = [_load_partition(Path(p)) for p in paths]
    first = parts[0].meta
    for p in parts[1:]:
        for key in ("stage", "strategy", "fisher", "blocks", "seed", "n_dataset", "dtype"):
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
    )
