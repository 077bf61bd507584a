"""Pairwise influence scores [Q, N] (total and per layer) and self-influence [N].

I(q, z) = −∇f_qᵀ (G + λ)⁻¹ ∇L(z) = Σ_l ⟨P_l, Σ_t g_{l,t} ā_{l,t}ᵀ⟩. Positive: adding z makes the query's
completion more likely. ``per_copy`` = I / N predicts the change of log p (nats) from one added copy of z.
The training data streams through once; per-example gradients exist only one batch (chunk) at a time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from influencer.curvature.core import Curvature, Inverse
from influencer.curvature.linalg import chunk_rows, per_example_grads
from influencer.io import atomic_save_tensors, atomic_write_json, load_tensors, read_json
from influencer.passes import amp_aware, batches, compute_dtype, eval_mode, layer_io
from influencer.queries import preconditioned_queries
from influencer.tasks import Task

_SCORES = "scores.safetensors"
_MANIFEST = "scores.json"


@dataclass
class Scores:
    """Influence of N training sequences on Q queries.

    total: [Q, N] raw scores I(q, z) (summed over layers).
    per_layer: layer name → [Q, N]; Σ over layers = total (empty if not requested).
    n_train: N used for per-copy units.
    """

    total: torch.Tensor
    per_layer: dict[str, torch.Tensor] = field(default_factory=dict)
    n_train: int = 1
    strategy: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def per_copy(self) -> torch.Tensor:
        """total / N: predicted change of log p(completion) in nats from adding one copy: [Q, N]."""
        return self.total / self.n_train

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.total.shape)  # type: ignore[return-value]

    def top(self, query: int, k: int = 10, *, largest: bool = True) -> list[tuple[int, float]]:
        """The k most positive (or most negative) training indices for one query: [(index, score), …]."""
        row = self.total[query]
        k = min(k, row.numel())
        values, idx = torch.topk(row, k, largest=largest)
        return [(int(i), float(v)) for i, v in zip(idx, values, strict=True)]

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``scores.safetensors`` + ``scores.json`` into directory ``path`` (atomically)."""
        path = Path(path)
        tensors = {"total": self.total, **{f"per_layer/{n}": v for n, v in self.per_layer.items()}}
        digest = atomic_save_tensors(path / _SCORES, tensors)
        atomic_write_json(
            path / _MANIFEST,
            {
                "format": "influencer.scores",
                "version": 2,
                "sha256_tensors": digest,
                "n_train": self.n_train,
                "strategy": self.strategy,
                "layers": list(self.per_layer),
                "shape": list(self.total.shape),
                "meta": self.meta,
            },
            seal=True,
        )
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Scores:
        path = Path(path)
        if not (path / _MANIFEST).is_file():
            raise FileNotFoundError(f"no scores at '{path}' (expected {_MANIFEST})")
        m = read_json(path / _MANIFEST, sealed=True, legacy_below=2)
        t = load_tensors(path / _SCORES, expect=m.get("sha256_tensors"), required=m.get("version", 0) >= 2)
        return cls(
            total=t["total"],
            per_layer={n: t[f"per_layer/{n}"] for n in m["layers"]},
            n_train=m["n_train"],
            strategy=m["strategy"],
            meta=m.get("meta", {}),
        )


@amp_aware
def pairwise_scores(
    model: nn.Module,
    task: Task,
    inverse: Inverse,
    queries: Any,
    train: Any,
    *,
    batch_size: int = 64,
    query_batch_size: int = 16,
    per_layer: bool = True,
    n_train: int | None = None,
    progress: bool = True,
) -> Scores:
    """Influence of every training example on every query: a :class:`Scores` with total [Q, N].

    inverse: a :class:`~influencer.curvature.Curvature` (the paper's block-diagonal estimate) or any
    :class:`~influencer.curvature.Inverse`, such as :class:`~influencer.refine.RefinedInverse` (refined on the
    full Gauss-Newton matrix). Unlike :func:`~influencer.scan`, nothing is refined unless you pass a refined
    inverse: this is the simple reference engine.
    """
    precond = preconditioned_queries(model, task, inverse, queries, batch_size=query_batch_size)
    curvature = inverse.curvature
    layers = curvature.bind(model, check_weights=False)
    dataset = task.as_dataset(train)
    n = len(dataset)  # type: ignore[arg-type]
    q = next(iter(precond.values())).shape[0]
    dtype = compute_dtype(model)
    flat = {name: p.flatten(1) for name, p in precond.items()}
    out = {name: torch.zeros(q, n, dtype=dtype) for name in precond}
    with eval_mode(model):
        for idx, batch in batches(dataset, task, batch_size, desc="scores", progress=progress):
            io = layer_io(model, task, layers, batch, idx, loss="train")
            for layer in layers:
                x = io[layer.name]
                a, g = x.a.to(dtype), x.g.to(dtype)
                step = chunk_rows(len(a), *layer.shape)
                for lo in range(0, len(a), step):
                    grads = per_example_grads(a[lo : lo + step], g[lo : lo + step]).flatten(1)
                    out[layer.name][:, idx[lo : lo + step]] = (flat[layer.name] @ grads.T).cpu()
    total = torch.stack(list(out.values())).sum(0)
    return Scores(
        total=total,
        per_layer=out if per_layer else {},
        n_train=curvature.n_train if n_train is None else int(n_train),
        strategy=curvature.strategy,
        meta={"inverse": inverse.describe()},
    )


@amp_aware
def self_scores(
    model: nn.Module, task: Task, curvature: Curvature, train: Any, *, batch_size: int = 64, progress: bool = True
) -> torch.Tensor:
    """Self-influence ∇L(z)ᵀ (G + λ)⁻¹ ∇L(z) for each training example (≥ 0): [N].

    This is the influence of z on its own log-likelihood (measurement f = −L(z)).
    """
    layers = curvature.bind(model)
    dataset = task.as_dataset(train)
    dtype = compute_dtype(model)
    out = torch.zeros(len(dataset), dtype=dtype)  # type: ignore[arg-type]
    with eval_mode(model):
        for idx, batch in batches(dataset, task, batch_size, desc="self-influence", progress=progress):
            io = layer_io(model, task, layers, batch, idx, loss="train")
            for layer in layers:
                x = io[layer.name]
                a, g = x.a.to(dtype), x.g.to(dtype)
                step = chunk_rows(len(a), *layer.shape)
                for lo in range(0, len(a), step):
                    grads = per_example_grads(a[lo : lo + step], g[lo : lo + step])
                    out[idx[lo : lo + step]] += curvature.quadratic_form(layer.name, grads).cpu()
    return out
