"""Running sums of one fitting stage (covariances A and S per token, Λ per sequence) and the passes that fill
them; finishing a stage (eigenbases in float64, Λ). Pure accumulation: additive over data and layer splits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from influencer import distributed as dist
from influencer.curvature.core import (
    LayerFactors,
)
from influencer.curvature.linalg import (
    accumulate_squared_grads,
    block_covariance,
    eigh_blocks,
    rotate,
    rotate_tokens_first,
    split_sizes,
)
from influencer.curvature.strategies import strategy as strategy_record
from influencer.layers import Layer
from influencer.passes import batches, compute_dtype, layer_io, model_device, work_dtype
from influencer.progress import progress_bar
from influencer.tasks import Task

if TYPE_CHECKING:
    from influencer.curvature.checkpoint import _Checkpoint

#: the passes of a fit; each draws its own sampled labels (its stream)
STAGES = ("covariance", "eigenvalues", "diagonal")
_STREAM = {"covariance": 1, "eigenvalues": 2, "diagonal": 3}
_TITLES = {"covariance": "covariance", "eigenvalues": "eigenvalue correction", "diagonal": "diagonal"}
_STREAM_COVARIANCE, _STREAM_LAMBDA, _STREAM_DIAGONAL = 1, 2, 3  # = _STREAM (kept for callers)


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

    def __init__(
        self,
        stage: str,
        shapes: list[_Shape],
        blocks: int,
        dtype: torch.dtype,
        device: torch.device,
        work: torch.dtype | None = None,
    ):
        self.stage, self.shapes, self.blocks, self.dtype, self.device = stage, shapes, blocks, dtype, device
        self.work = work or dtype  # per-sequence stages: rotations and products in this dtype, sums in ``dtype``
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
                [q.to(self.device, self.work) for q in f.qs],
                [q.to(self.device, self.work) for q in f.qa],
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
            a, g = x.a.to(self.work), x.g.to(self.work)
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
        precision: str = "float32",
    ):
        self.model, self.task, self.layers, self.dataset = model, task, layers, dataset
        self.batch_size, self.loss, self.seed, self.progress, self.blocks = batch_size, loss, seed, progress, blocks
        self.dtype = compute_dtype(model)
        self.work = work_dtype(precision, self.dtype)
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
        work = self.work if stage != "covariance" else None
        sums = _Sums(stage, self.shapes, self.blocks, self.dtype, self.device, work)
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
        precision: str = "float32",
    ):
        self.args = (model, task, layers, dataset, batch_size, loss, seed, progress)
        self.precision = precision
        self.dtype = compute_dtype(model)
        self.n = len(dataset)

    def _accumulate(self, stage: str, blocks: int, factors: dict[str, LayerFactors]) -> _Sums:
        return _Fit(*self.args, blocks, self.precision).accumulate(stage, 0, self.n, bases=factors)

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
        if strategy_record(strategy).kronecker_lambda:
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
