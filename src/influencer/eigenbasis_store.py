"""The query store of a :class:`~influencer.curvature.Curvature` built in its Kronecker eigenbases.

For a layer with eigenbases Q_S, Q_A and eigenvalues Λ, a query's measurement gradient is Σ_t g_t ā_tᵀ = Gᵀ A
(G [T, d_out], A [T, w] over its T tokens), and

    P = −(G + λ)⁻¹ Gᵀ A = −Q_S ((G Q_S)ᵀ (A Q_A) ⊙ 1/(Λ + λ)) Q_Aᵀ = −Q_S M Q_Aᵀ.

The generic path (:func:`influencer.queries.preconditioned_queries`) forms Gᵀ A densely, rotates it into the
eigenbasis and back (2 · d_out · w · (d_out + w) multiply-adds per query and layer) and then takes a truncated SVD
of P. Here the T-token factors are rotated instead (T · (d_out² + w²)), and since Q_S and Q_A are orthogonal the
rank-k SVD of P is that of M with its factors rotated back (k · (d_out² + w²)): P ≈ (−Q_S U_k S_k)(V_kᵀ Q_Aᵀ). The
dense [d_out, w] matrix is never rotated back unless the layer is kept exact. Same factors as the generic path up
to rounding (tests/test_query_store.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from influencer.curvature.core import Curvature
from influencer.curvature.linalg import from_eigenbasis, rotate
from influencer.curvature.strategies import strategy as strategy_record
from influencer.passes import batches, compute_dtype, eval_mode, layer_io
from influencer.tasks import Task


def eigenbasis_factors(
    model: nn.Module, task: Task, curv: Curvature, queries: Any, *, batch_size: int = 16
) -> dict[str, torch.Tensor]:
    """M_l = (G Q_S)ᵀ (A Q_A) ⊙ 1/(Λ + λ) per layer: name → [Q, d_out, w], P_l = −Q_S M_l Q_Aᵀ (no rotation for
    a strategy without eigenbases, no division for ``identity``)."""
    kind = strategy_record(curv.strategy)
    layers = curv.bind(model)
    dtype = compute_dtype(model)
    dataset = task.as_dataset(queries, queries=True)
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError("no queries given")
    parts: dict[str, list[torch.Tensor]] = {x.name: [] for x in layers}
    cache: dict[str, tuple[Any, Any, Any]] = {}
    with eval_mode(model):
        for idx, batch in batches(dataset, task, batch_size, desc="query gradients", progress=False):
            io = layer_io(model, task, layers, batch, idx, loss="measurement")
            for name, x in io.items():
                a, g = x.a.to(dtype), x.g.to(dtype)
                if name not in cache:
                    inv = curv.inverse_diagonal(name, dtype, a.device) if kind.curved else None
                    basis = curv.eigenbases(name, dtype, a.device) if kind.basis else (None, None)
                    cache[name] = (inv, *basis)
                inv, qs, qa = cache[name]
                if qs is not None:
                    a, g = rotate(a, qa), rotate(g, qs)
                m = torch.bmm(g.mT, a)
                parts[name].append(m * inv if inv is not None else m)
    return {name: torch.cat(p) for name, p in parts.items()}


def back_from_eigenbasis(
    curv: Curvature, name: str, left: torch.Tensor | None, right: torch.Tensor | None, dense: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(left, right, dense) of P = −Q_S M Q_Aᵀ from those of M: left → −Q_S left, right → right Q_Aᵀ, dense →
    −Q_S dense Q_Aᵀ (for a strategy without eigenbases only the sign changes)."""
    kind = strategy_record(curv.strategy)
    if not kind.basis:
        return (None if left is None else -left), right, (None if dense is None else -dense)
    ref = left if left is not None else dense
    assert ref is not None
    qs, qa = curv.eigenbases(name, ref.dtype, ref.device)
    if dense is not None:
        return None, None, -from_eigenbasis(dense, qs, qa)
    assert left is not None and right is not None
    return -rotate(left.mT, qs, transpose=True).mT, rotate(right, qa, transpose=True), None
