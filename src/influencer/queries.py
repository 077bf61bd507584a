"""Query side: measurement gradients ∇f_q per layer and their preconditioned form P = −(G + λ)⁻¹ ∇f_q."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from influencer.curvature.core import Curvature
from influencer.curvature.linalg import per_example_grads
from influencer.layers import Layer
from influencer.passes import batches, compute_dtype, eval_mode, layer_io
from influencer.tasks import Task


def measurement_gradients(model: nn.Module, task: Task, layers: list[Layer], queries: Any, *,
                          batch_size: int = 16, progress: bool = False) -> dict[str, torch.Tensor]:
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


def preconditioned_queries(model: nn.Module, task: Task, curvature: Curvature, queries: Any, *,
                           batch_size: int = 16, progress: bool = False) -> dict[str, torch.Tensor]:
    """P_l = −(G_l + λ_l)⁻¹ ∇_l f_q: name → [Q, d_out, w]. ⟨P_l, ∇_l L(z)⟩ is the layer's influence on q."""
    layers = curvature.bind(model)
    grads = measurement_gradients(model, task, layers, queries, batch_size=batch_size, progress=progress)
    return {name: -curvature.precondition(name, v) for name, v in grads.items()}
