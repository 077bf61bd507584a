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


def truncated_svd(p: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-k factors of p [Q, m, n]: (left [Q, m, k] = U_k S_k, right [Q, k, n] = V_kᵀ), in p's dtype.

    Uses the eigendecomposition of the smaller Gram matrix in float64 (exact top-k subspace, fast for the
    [d_out, d_in] shapes of LLM layers).
    """
    p64 = p.to(torch.float64)
    m, n = p.shape[-2:]
    if n <= m:
        _, vecs = torch.linalg.eigh(p64.mT @ p64)  # ascending
        v = vecs[..., -k:].flip(-1)  # [Q, n, k]
        left, right = p64 @ v, v.mT
    else:
        _, vecs = torch.linalg.eigh(p64 @ p64.mT)
        u = vecs[..., -k:].flip(-1)  # [Q, m, k]
        left, right = u, u.mT @ p64
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
    ) -> QueryStore:
        """Measurement gradients → ``inverse.solve`` → rank ``rank`` (None: keep every layer exact).

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
                precond = preconditioned_queries(model, task, inverse, chunk, batch_size=batch_size)
                parts.append(cls.from_preconditioned(precond, rank))
                bar.update(min(batch_size, n - lo))
        curvature = inverse.curvature
        return cls.concat(
            parts,
            meta={
                "strategy": curvature.strategy,
                "fingerprint": curvature.fingerprint.get("digest"),
                "inverse": inverse.describe(),
            },
        )

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
        cls, precond: dict[str, torch.Tensor], rank: int | None = 32, meta: dict[str, Any] | None = None
    ) -> QueryStore:
        """Compress exact P_l (name → [Q, d_out, w], from :func:`preconditioned_queries`) to rank ``rank``."""
        if rank is not None and rank < 1:
            raise ValueError(f"rank must be ≥ 1 or None, got {rank}")
        layers = {}
        for name, p in precond.items():
            d_out, w = p.shape[-2:]
            if rank is None or rank * (d_out + w) >= d_out * w:
                layers[name] = LayerQueries(name, dense=p)
            else:
                left, right = truncated_svd(p, rank)
                layers[name] = LayerQueries(name, left=left, right=right)
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
