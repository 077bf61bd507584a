"""Query side: measurement gradients ∇f_q per layer and their preconditioned form P = −(G + λ)⁻¹ ∇f_q."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from influencer.curvature.core import Inverse
from influencer.curvature.linalg import per_example_grads
from influencer.io import atomic_save_tensors, atomic_write_json, load_tensors, read_json
from influencer.layers import Layer
from influencer.passes import amp_aware, batches, compute_dtype, eval_mode, layer_io
from influencer.progress import progress_bar
from influencer.tasks import Task, take_rows


@amp_aware
def measurement_gradients(
    model: nn.Module, task: Task, layers: list[Layer], queries: Any, *, batch_size: int = 16, progress: bool = False
) -> dict[str, torch.Tensor]:
    """∇_θl f_q for every query and tracked layer: name → [Q, d_out, w] (compute dtype, model device)."""
    dataset = task.as_dataset(queries, queries=True)
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError("no queries given")
    dtype = compute_dtype(model)
    parts: dict[str, list[torch.Tensor]] = {x.name: [] for x in layers}
    with eval_mode(model):
        for idx, batch in batches(dataset, task, batch_size, desc="query gradients", progress=progress):
            io = layer_io(model, task, layers, batch, idx, loss="measurement")
            for name, x in io.items():
                parts[name].append(per_example_grads(x.a.to(dtype), x.g.to(dtype)))
    return {name: torch.cat(p) for name, p in parts.items()}


@amp_aware
def preconditioned_queries(
    model: nn.Module, task: Task, inverse: Inverse, queries: Any, *, batch_size: int = 16, progress: bool = False
) -> dict[str, torch.Tensor]:
    """P_l = −(G + λ)⁻¹ ∇f_q restricted to layer l: name → [Q, d_out, w]. ⟨P_l, ∇_l L(z)⟩ is the layer's
    influence on q. ``inverse``: a :class:`~influencer.curvature.Curvature` (block-diagonal) or any
    :class:`~influencer.curvature.Inverse` such as :class:`~influencer.refine.RefinedInverse`."""
    layers = inverse.curvature.bind(model)
    grads = measurement_gradients(model, task, layers, queries, batch_size=batch_size, progress=progress)
    return {name: -v for name, v in inverse.solve(grads).items()}


def _slice_rows(data: Any, lo: int, hi: int) -> Any:
    """Rows lo..hi-1 of user query data, in the same form (see :func:`influencer.tasks.take_rows`)."""
    return take_rows(data, range(lo, hi))


# --------------------------------------------------------------------------------------------------------
# Rank-k query store (paper §3.2.2)
# --------------------------------------------------------------------------------------------------------

_STORE = "queries.safetensors"
_STORE_MANIFEST = "queries.json"


@dataclass
class LayerQueries:
    """Preconditioned query gradients P of one layer for Q queries, exact or at rank k.

    Exact: ``dense`` [Q, d_out, w]. Rank k: P ≈ ``left`` [Q, d_out, k] @ ``right`` [Q, k, w] (left = U_k S_k,
    right = V_kᵀ, a truncated SVD). Kept exact when k·(d_out + w) ≥ d_out·w (low rank would not save memory).
    """

    name: str
    dense: torch.Tensor | None = None
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None

    @property
    def low_rank(self) -> bool:
        return self.left is not None

    @property
    def rank(self) -> int | None:
        return None if self.left is None else self.left.shape[-1]

    @property
    def n_queries(self) -> int:
        return (self.dense if self.dense is not None else self.left).shape[0]  # type: ignore[union-attr]

    def to_dense(self) -> torch.Tensor:
        """P [Q, d_out, w] (the rank-k product for low-rank layers)."""
        if self.dense is not None:
            return self.dense
        return self.left @ self.right  # type: ignore[operator]

    def tensors(self) -> dict[str, torch.Tensor]:
        keys = ("dense", "left", "right")
        return {f"{self.name}/{k}": getattr(self, k) for k in keys if getattr(self, k) is not None}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


SVD_METHODS = ("auto", "exact", "randomized")


def truncated_svd(
    p: torch.Tensor,
    k: int,
    *,
    method: str = "auto",
    oversample: int = 8,
    power_iterations: int = 2,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-k factors of p [B, m, n]: (left [B, m, k] = U_k S_k, right [B, k, n] = V_kᵀ), in p's dtype.

    ``exact``: the eigendecomposition of the smaller Gram matrix in float64 (the optimal rank-k factors).
    ``randomized`` (Halko, Martinsson & Tropp 2011, Alg. 4.4): a Gaussian sketch of k + ``oversample`` columns
    refined by ``power_iterations`` subspace iterations, in float32 (float64 for float64 input) on p's device;
    its error ‖p − left·right‖_F stays within 2 % of the optimal one (tests/test_query_store.py measures it on
    flat and decaying spectra) and it is exact when p has rank ≤ k + oversample. ``auto``: randomized when the
    sketch is at most a quarter of min(m, n), else exact. The sketch is one seeded matrix shared by the batch, so
    each matrix's factors do not depend on what else is in the batch.
    """
    if method not in SVD_METHODS:
        raise ValueError(f"method must be one of {SVD_METHODS}, got {method!r}")
    m, n = p.shape[-2:]
    sketch = min(k + oversample, m, n)
    if method == "exact" or (method == "auto" and 4 * sketch > min(m, n)):
        return _exact_svd(p, k)
    return _randomized_svd(p, k, sketch, power_iterations, seed)


def _exact_svd(p: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    p64 = p.to(torch.float64)
    m, n = p.shape[-2:]
    if n <= m:
        _, vecs = torch.linalg.eigh(p64.mT @ p64)  # ascending
        v = vecs[..., -k:].flip(-1)  # [B, n, k]
        left, right = p64 @ v, v.mT
    else:
        _, vecs = torch.linalg.eigh(p64 @ p64.mT)
        u = vecs[..., -k:].flip(-1)  # [B, m, k]
        left, right = u, u.mT @ p64
    return left.to(p.dtype), right.to(p.dtype)


def _randomized_svd(
    p: torch.Tensor, k: int, sketch: int, power_iterations: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    work = p if p.dtype == torch.float64 else p.float()
    transpose = work.shape[-2] < work.shape[-1]  # sketch the longer side: the QRs are of the tall matrix
    if transpose:
        work = work.mT
    gen = torch.Generator(device=work.device).manual_seed(seed)
    omega = torch.randn(work.shape[-1], sketch, generator=gen, device=work.device, dtype=work.dtype)
    basis = torch.linalg.qr(work @ omega).Q  # [B, M, s]
    for _ in range(power_iterations):  # (work workᵀ)^q sharpens the spectrum; QR keeps the basis well conditioned
        basis = torch.linalg.qr(work @ torch.linalg.qr(work.mT @ basis).Q).Q
    u, s, vh = torch.linalg.svd(basis.mT @ work, full_matrices=False)  # of the [B, s, N] projection
    top, s = basis @ u[..., :k], s[..., None, :k]  # work ≈ top · diag(s) · vh[:k]
    if transpose:  # p = workᵀ ≈ vh[:k]ᵀ · diag(s) · topᵀ
        left, right = vh[..., :k, :].mT * s, top.mT
    else:
        left, right = top * s, vh[..., :k, :]
    return left.to(p.dtype), right.to(p.dtype)


@dataclass
class QueryStore:
    """All resident queries: per tracked layer, P_l = −(G_l + λ_l)⁻¹ ∇_l f_q, exact or at rank k.

    ⟨P_l, Σ_t g_t ā_tᵀ⟩ is the influence of a training sequence on each query through layer l.
    """

    layers: dict[str, LayerQueries]
    rank: int | None
    n_queries: int
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    @amp_aware
    def build(
        cls,
        model: nn.Module,
        task: Task,
        inverse: Inverse,
        queries: Any,
        *,
        rank: int | None = 32,
        batch_size: int = 16,
        progress: bool = False,
        svd: str = "auto",
    ) -> QueryStore:
        """Measurement gradients → ``inverse.solve`` → rank ``rank`` (None: keep every layer exact; ``svd``: the
        method of :func:`truncated_svd`).

        Queries are processed ``batch_size`` at a time and compressed before the next chunk, so the dense
        [Q, d_out, w] gradients of all queries never coexist (peak memory ∝ batch_size, not Q). ``meta["inverse"]``
        records ``inverse.describe()``.
        """
        n = len(task.as_dataset(queries, queries=True))  # type: ignore[arg-type]
        if n == 0:
            raise ValueError("no queries given")
        parts = []
        with progress_bar("query gradients", n, unit="query", enabled=progress) as bar:
            for lo in range(0, n, batch_size):
                chunk = _slice_rows(queries, lo, min(lo + batch_size, n)) if batch_size < n else queries
                parts.append(cls._build_chunk(model, task, inverse, chunk, rank, batch_size, svd))
                bar.update(min(batch_size, n - lo))
        curvature = inverse.curvature
        return cls.concat(
            parts,
            meta={
                "strategy": curvature.strategy,
                "fingerprint": curvature.fingerprint.get("digest"),
                "inverse": inverse.describe(),
                "svd": svd,
            },
        )

    @classmethod
    def _build_chunk(
        cls, model: nn.Module, task: Task, inverse: Inverse, queries: Any, rank: int | None, batch_size: int, svd: str
    ) -> QueryStore:
        """The store of a few queries: a :class:`Curvature` in its eigenbases (see :mod:`influencer.eigenbasis_store`),
        any other inverse through ``solve`` and a truncated SVD of the dense result."""
        from influencer.curvature.core import Curvature

        if not isinstance(inverse, Curvature):
            precond = preconditioned_queries(model, task, inverse, queries, batch_size=batch_size)
            return cls.from_preconditioned(precond, rank, svd=svd)
        from influencer.eigenbasis_store import back_from_eigenbasis, eigenbasis_factors

        rotated = cls.from_preconditioned(
            eigenbasis_factors(model, task, inverse, queries, batch_size=batch_size), rank, svd=svd
        )
        layers = {}
        for name, x in rotated.layers.items():
            left, right, dense = back_from_eigenbasis(inverse, name, x.left, x.right, x.dense)
            layers[name] = LayerQueries(name, dense=dense, left=left, right=right)
        return cls(layers=layers, rank=rank, n_queries=rotated.n_queries)

    @classmethod
    def concat(cls, parts: list[QueryStore], meta: dict[str, Any] | None = None) -> QueryStore:
        """Stores of disjoint query sets (same layers and rank) → one store, queries in order."""
        if not parts:
            raise ValueError("nothing to concatenate")

        def cat(name: str, attr: str) -> torch.Tensor | None:
            ts = [getattr(p.layers[name], attr) for p in parts]
            return None if ts[0] is None else torch.cat(ts)

        first = parts[0]
        if any(p.rank != first.rank or list(p.layers) != list(first.layers) for p in parts):
            raise ValueError("query stores differ in rank or layers")
        layers = {n: LayerQueries(n, cat(n, "dense"), cat(n, "left"), cat(n, "right")) for n in first.layers}
        return cls(
            layers=layers,
            rank=first.rank,
            n_queries=sum(p.n_queries for p in parts),
            meta=dict(first.meta) if meta is None else meta,
        )

    @classmethod
    def from_preconditioned(
        cls,
        precond: dict[str, torch.Tensor],
        rank: int | None = 32,
        meta: dict[str, Any] | None = None,
        *,
        svd: str = "auto",
    ) -> QueryStore:
        """Compress exact P_l (name → [Q, d_out, w], from :func:`preconditioned_queries`) to rank ``rank``;
        ``svd``: the method of :func:`truncated_svd`. Layers of one shape are compressed together, in stacks of
        at most ~256 MiB (one batched call instead of one per layer)."""
        if rank is not None and rank < 1:
            raise ValueError(f"rank must be ≥ 1 or None, got {rank}")
        layers: dict[str, LayerQueries] = {}
        groups: dict[tuple[int, ...], list[str]] = {}
        for name, p in precond.items():
            d_out, w = p.shape[-2:]
            if rank is None or rank * (d_out + w) >= d_out * w:
                layers[name] = LayerQueries(name, dense=p)
            else:
                groups.setdefault((*p.shape, p.dtype.itemsize), []).append(name)
        for shape, names in groups.items():
            per_layer = max(1, shape[0] * shape[1] * shape[2] * shape[3])
            step = max(1, (256 << 20) // per_layer)
            for lo in range(0, len(names), step):
                chunk = names[lo : lo + step]
                stacked = torch.cat([precond[n] for n in chunk]) if len(chunk) > 1 else precond[chunk[0]]
                left, right = truncated_svd(stacked, rank, method=svd)  # type: ignore[arg-type]
                for i, name in enumerate(chunk):
                    rows = slice(i * shape[0], (i + 1) * shape[0])
                    layers[name] = LayerQueries(name, left=left[rows].contiguous(), right=right[rows].contiguous())
        layers = {name: layers[name] for name in precond}  # the layers' order
        n = next(iter(precond.values())).shape[0]
        return cls(layers=layers, rank=rank, n_queries=n, meta=meta or {})

    def nbytes(self) -> int:
        """Memory of the store in bytes."""
        return sum(x.nbytes() for x in self.layers.values())

    def exact_nbytes(self) -> int:
        """Memory the same queries would take with every layer exact."""
        total = 0
        for x in self.layers.values():
            p = x.dense if x.dense is not None else x.left
            assert p is not None
            d_out = p.shape[1]
            w = x.dense.shape[2] if x.dense is not None else x.right.shape[2]  # type: ignore[union-attr]
            total += x.n_queries * d_out * w * p.element_size()
        return total

    def memory_report(self) -> str:
        low = sum(x.low_rank for x in self.layers.values())
        return (
            f"{self.n_queries} queries × {len(self.layers)} layers ({low} at rank {self.rank}, "
            f"{len(self.layers) - low} exact): {self.nbytes() / 2**20:.1f} MiB "
            f"(exact would be {self.exact_nbytes() / 2**20:.1f} MiB)"
        )

    def to(self, device: torch.device | str) -> QueryStore:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        layers = {n: LayerQueries(n, mv(x.dense), mv(x.left), mv(x.right)) for n, x in self.layers.items()}
        return QueryStore(layers=layers, rank=self.rank, n_queries=self.n_queries, meta=self.meta)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        tensors: dict[str, torch.Tensor] = {}
        for x in self.layers.values():
            tensors.update(x.tensors())
        digest = atomic_save_tensors(path / _STORE, tensors)
        atomic_write_json(
            path / _STORE_MANIFEST,
            {
                "format": "influencer.queries",
                "version": 2,
                "rank": self.rank,
                "n_queries": self.n_queries,
                "layers": list(self.layers),
                "meta": self.meta,
                "sha256_tensors": digest,
            },
            seal=True,
        )
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> QueryStore:
        path = Path(path)
        m = read_json(path / _STORE_MANIFEST, sealed=True, legacy_below=2)
        t = load_tensors(path / _STORE, expect=m.get("sha256_tensors"), required=m.get("version", 0) >= 2)
        layers = {n: LayerQueries(n, t.get(f"{n}/dense"), t.get(f"{n}/left"), t.get(f"{n}/right")) for n in m["layers"]}
        return cls(layers=layers, rank=m["rank"], n_queries=m["n_queries"], meta=m.get("meta", {}))
