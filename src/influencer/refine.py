"""Full-GNH refinement of the query side: a few conjugate-gradient steps on (G + λ) x = ∇f_q, preconditioned by
the fitted block-diagonal curvature (EK-FAC, K-FAC or diagonal).

A block-diagonal curvature ignores the curvature between layers and, for (E)K-FAC, approximates each layer's
block in a Kronecker-factored eigenbasis. On models trained on few examples relative to their size this costs
much accuracy (docs/VALIDATION.md §5: Pearson 0.64 with the PBRF on UCI Concrete where LiSSA reaches 0.93).
:func:`refine_queries` starts from the curvature's answer and corrects it with products of the exact
Gauss-Newton matrix G = (1/N) Σ_n J_nᵀ H_n J_n of all tracked layers (their weights and biases; the other
parameters stay fixed), computed over ``data`` with ``torch.func`` (forward mode for J v, reverse mode for Jᵀ;
H is the output-space Hessian of the loss, so no labels are sampled). Preconditioned CG from x₀ = 0: its first
step is the best multiple of the curvature's answer, and every further step lowers the error in the
(G + λ)-norm; ten steps reach Pearson 0.97–0.99 with the exact damped influence on the validation setups
(EK-FAC alone: 0.64–0.68).

Cost: each step is one forward-mode and one reverse-mode pass over ``data`` for every query (vectorised over a
chunk of ``query_chunk`` queries), plus a preconditioning like the one of the plain query side. Memory holds
a few [chunk, P] vectors (P = tracked parameters) and the per-batch Jacobian-vector products [chunk, B, outputs].
That suits small and medium models; for billion-parameter models use a subset of the training data as ``data``
and few queries, or the plain curvature.

The damping is the curvature's own per-layer λ_l (set it with ``Curvature.with_damping``); it must be > 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from influencer.curvature import Curvature
from influencer.functional import FlatModel
from influencer.passes import amp_aware
from influencer.progress import progress_bar
from influencer.queries import _slice_rows, measurement_gradients
from influencer.tasks import Task

__all__ = [
    "UNREFINED_SCALE_NOTE",
    "conjugate_gradients",
    "curvature_preconditioner",
    "damped_gnh_operator",
    "refine_queries",
]

#: Shown with unrefined scores (CLI scan and report, demo): the measured limit of plain (E)K-FAC magnitudes.
UNREFINED_SCALE_NOTE = (
    "unrefined curvature: trust the ranking more than the size. On SmolLM2 fitted on 16-64 sequences, plain "
    "EK-FAC's influences were 585-1,600x larger than after one refinement step (docs/VALIDATION.md §5.1); "
    "--refine 1 (refine_data= in Python) rescales them"
)


def conjugate_gradients(
    apply: Callable[[Tensor], Tensor],
    v: Tensor,
    *,
    rtol: float = 1e-8,
    max_iter: int = 5000,
    precondition: Callable[[Tensor], Tensor] | None = None,
    iterations: int | None = None,
    progress: bool = False,
    desc: str = "conjugate gradients",
) -> tuple[Tensor, int, float]:
    """Solve A x = v for each row of v [K, P] by (preconditioned) conjugate gradients from x₀ = 0.

    apply: x [K, P] ↦ A x, A symmetric positive definite; precondition: r ↦ M⁻¹ r (None: none). Each row stops
    at ‖r‖ ≤ rtol ‖v‖ (at most ``max_iter`` steps), or every row takes exactly ``iterations`` steps when given.
    progress: a bar named ``desc`` over the steps (:func:`influencer.progress.progress_bar`).
    Returns (x [K, P], steps taken, the largest relative residual ‖r‖/‖v‖ over rows).
    """
    pre = precondition or (lambda r: r)
    x = torch.zeros_like(v)
    r = v.clone()
    z = pre(r)
    p = z.clone()
    rz = (r * z).sum(1)
    vn = v.norm(dim=1).clamp_min(torch.finfo(v.dtype).tiny)
    limit = iterations if iterations is not None else max_iter
    steps = 0
    with progress_bar(desc, iterations, unit="step", enabled=progress) as bar:
        while steps < limit:
            active = torch.ones_like(rz, dtype=torch.bool) if iterations is not None else r.norm(dim=1) > rtol * vn
            if not bool(active.any()):
                break
            ap = apply(p)
            tiny = torch.finfo(v.dtype).tiny
            alpha = torch.where(active, rz / (p * ap).sum(1).clamp_min(tiny), torch.zeros_like(rz))
            x += alpha[:, None] * p
            r -= alpha[:, None] * ap
            z = pre(r)
            rz_new = (r * z).sum(1)
            beta = torch.where(active, rz_new / rz.clamp_min(tiny), torch.zeros_like(rz))
            p = z + beta[:, None] * p
            rz = rz_new
            steps += 1
            bar.update()
    return x, steps, float((r.norm(dim=1) / vn).max())


def damped_gnh_operator(
    fm: FlatModel, data: Any, damping: Tensor, *, batch_size: int = 2048
) -> Callable[[Tensor], Tensor]:
    """x [K, P] ↦ (G + diag(damping)) x, G the full-batch Gauss-Newton matrix of ``fm`` over ``data``."""
    batches = fm.batches(data, batch_size)
    refs = fm.reference_outputs(batches)
    n = sum(len(i) for i, _ in batches)
    if n == 0:
        raise ValueError("no training data for the Gauss-Newton products")

    def apply(x: Tensor) -> Tensor:
        return fm.gnh_vp(x, batches, refs, n) + damping * x

    return apply


def curvature_preconditioner(fm: FlatModel, curvature: Curvature) -> Callable[[Tensor], Tensor]:
    """The curvature's block-diagonal (G_l + λ_l)⁻¹ as a map on flat vectors [K, P] of ``fm``'s layout."""
    missing = [x.name for x in fm.layers if x.name not in curvature.layers]
    if missing:
        raise ValueError(f"the curvature has no factors for tracked layers {missing}")

    def apply(v: Tensor) -> Tensor:
        mats = fm.layer_matrices(v)
        return fm.flat({name: curvature.precondition(name, m) for name, m in mats.items()})

    return apply


def _damping(curvature: Curvature) -> dict[str, float]:
    if curvature.strategy == "identity":
        raise ValueError(
            "refinement needs a fitted curvature (diagonal, kfac or ekfac) as preconditioner and its "
            "damping; the identity strategy has neither"
        )
    lam = {name: float(f.damping or 0.0) for name, f in curvature.layers.items()}
    bad = [name for name, v in lam.items() if not v > 0]
    if bad:
        raise ValueError(
            f"refinement needs damping λ_l > 0 on every layer; layers {bad} have none "
            "(use curvature.with_damping(damping=...))"
        )
    return lam


@amp_aware
def refine_queries(
    model: nn.Module,
    task: Task,
    curvature: Curvature,
    queries: Any,
    data: Any,
    *,
    iterations: int = 10,
    batch_size: int = 256,
    query_chunk: int = 16,
    progress: bool = False,
) -> dict[str, Tensor]:
    """P = −x with x ≈ (G + λ)⁻¹ ∇f_q from ``iterations`` steps of CG on the full damped GNH over ``data``,
    preconditioned by ``curvature``: name → [Q, d_out, d_in + bias], the format of
    :func:`~influencer.preconditioned_queries` (``iterations=0`` gives exactly that, through the flat path).

    data: training data in the task's format (the set the curvature describes, or a subset of it: G is
    averaged over it); batch_size: training examples per GNH pass; query_chunk: queries solved together.
    """
    if iterations < 0:
        raise ValueError(f"iterations must be ≥ 0, got {iterations}")
    layers = curvature.bind(model)
    fm = FlatModel(model, task, [x.name for x in layers])
    pre = curvature_preconditioner(fm, curvature)
    n = len(task.as_dataset(queries, queries=True))  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("no queries given")
    apply = (
        damped_gnh_operator(fm, data, fm.damping_vector(_damping(curvature)), batch_size=batch_size)
        if iterations > 0
        else None
    )
    parts: list[dict[str, Tensor]] = []
    with progress_bar("refining queries", n, unit="query", enabled=progress) as bar:
        for lo in range(0, n, query_chunk):
            chunk = _slice_rows(queries, lo, min(lo + query_chunk, n)) if query_chunk < n else queries
            v = fm.flat(measurement_gradients(model, task, layers, chunk, batch_size=query_chunk))
            with torch.no_grad():  # torch.func still differentiates; no graphs over the untracked parameters
                if apply is None:
                    x = pre(v)
                else:
                    x, _, _ = conjugate_gradients(apply, v, precondition=pre, iterations=iterations)
            parts.append({name: -m for name, m in fm.layer_matrices(x).items()})
            bar.update(len(v))
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
