"""Reference inverse-curvature methods on the flat θ of a :class:`FlatModel`: exact damped GNH and LiSSA.

Both compute x = (G + λI)⁻¹ v for measurement gradients v = ∇f_q (a batch of queries at once), with
G = (1/N) Σ_n J_nᵀ H_n J_n the full (not block-diagonal) Gauss-Newton matrix over all tracked parameters, then
score I(q, z) = −xᵀ ∇L(z) (DESIGN.md §1 sign: positive = adding z makes f larger).

- :func:`exact_ihvp`: dense G (built from GNH-vector products, P up to a few thousand) solved by Cholesky, or
  conjugate gradients with full-batch GNH-vector products to a relative residual ``rtol`` (any P).
- :func:`lissa_ihvp`: the stochastic Neumann series of Agarwal et al. (2017) as in Koh & Liang (2017):
  x_{j+1} = v + x_j − (G_B + λ) x_j / s on random mini-batches B, x = x_depth / s, averaged over ``repeats``.
  It converges when s > λ_max(G_B) + λ; the divergence guard stops with :class:`LiSSADivergenceError` as soon as
  an iterate leaves the bound ‖x‖ ≤ s ‖v‖ / λ that every convergent run satisfies.
- :func:`~influencer.refine.conjugate_gradients` with :func:`~influencer.refine.curvature_preconditioner`
  (re-exported here): a few steps of CG on the full damped GNH, preconditioned by the engine's block-diagonal
  EK-FAC inverse (the idea of Wang et al. 2025, "ASTRA", with CG in place of their Neumann series): it starts
  from the EK-FAC answer and corrects it with full-GNH products. The engine offers it as
  :class:`~influencer.refine.RefinedInverse`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from influencer.functional import FlatModel, take
from influencer.progress import progress_bar
from influencer.refine import conjugate_gradients, curvature_preconditioner, damped_gnh_operator

Damping = float | dict[str, float]

__all__ = [
    "LiSSADivergenceError",
    "LiSSAInfo",
    "conjugate_gradients",
    "curvature_preconditioner",
    "damped_gnh_operator",
    "dense_gnh",
    "exact_ihvp",
    "lissa_ihvp",
    "scores_from_ihvp",
    "top_eigenvalue",
    "train_gradients",
]


class LiSSADivergenceError(RuntimeError):
    """The LiSSA recursion diverged (scale too small for the curvature)."""


@torch.no_grad()  # torch.func transforms still differentiate; no graph over untracked params
def dense_gnh(fm: FlatModel, train: Any, *, batch_size: int = 512, chunk: int = 256) -> Tensor:
    """The dense Gauss-Newton matrix G [P, P] of the tracked parameters over ``train`` (small P only)."""
    batches = fm.batches(train, batch_size)
    refs = fm.reference_outputs(batches)
    n = sum(len(i) for i, _ in batches)
    eye = torch.eye(fm.P, dtype=fm.dtype, device=fm.device)
    cols = [fm.gnh_vp(eye[lo : lo + chunk], batches, refs, n) for lo in range(0, fm.P, chunk)]
    g = torch.cat(cols)
    return 0.5 * (g + g.T)


@torch.no_grad()  # torch.func transforms still differentiate; no graph over untracked params
def exact_ihvp(
    fm: FlatModel,
    train: Any,
    v: Tensor,
    damping: Damping,
    *,
    method: str = "auto",
    rtol: float = 1e-8,
    max_iter: int = 5000,
    batch_size: int = 2048,
    dense_max_params: int = 4096,
    progress: bool = False,
) -> tuple[Tensor, dict[str, Any]]:
    """(G + λI)⁻¹ v for v [K, P] with the exact full GNH over ``train``; returns (x [K, P], info).

    damping: one λ > 0, or a dict layer name → λ_l (then λI is the diagonal of per-parameter values).

    method: "dense" (build G, Cholesky), "cg" (block conjugate gradients, each column to ‖r‖ ≤ rtol‖v‖) or
    "auto" (dense when P ≤ ``dense_max_params``). progress: a bar over the CG steps (total unknown).
    """
    d = _damping(fm, damping)
    if method == "auto":
        method = "dense" if fm.P <= dense_max_params else "cg"  # noqa: SIM300
    if method == "dense":
        g = dense_gnh(fm, train, batch_size=batch_size)
        g.diagonal().add_(d)
        chol = torch.linalg.cholesky(g)
        x = torch.cholesky_solve(v.T.to(g.dtype), chol).T
        return x, {"method": "dense", "P": fm.P}
    if method != "cg":
        raise ValueError(f"method must be 'auto', 'dense' or 'cg', got {method!r}")
    apply = damped_gnh_operator(fm, train, d, batch_size=batch_size)
    x, it, rel = conjugate_gradients(
        apply, v, rtol=rtol, max_iter=max_iter, progress=progress, desc="exact damped GNH (CG)"
    )
    return x, {
        "method": "cg",
        "P": fm.P,
        "iterations": it,
        "relative_residual": rel,
        "converged": rel <= rtol * (1 + 1e-9),
    }


@torch.no_grad()  # torch.func transforms still differentiate; no graph over untracked params
def top_eigenvalue(fm: FlatModel, train: Any, *, iters: int = 30, batch_size: int = 2048, seed: int = 0) -> float:
    """λ_max of the full-batch G by power iteration."""
    batches = fm.batches(train, batch_size)
    refs = fm.reference_outputs(batches)
    n = sum(len(i) for i, _ in batches)
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(fm.P, generator=g, dtype=fm.dtype).to(fm.device)
    v /= v.norm()
    lam = 0.0
    for _ in range(iters):
        w = fm.gnh_vp(v, batches, refs, n)
        lam = float(w @ v)
        v = w / w.norm().clamp_min(1e-300)
    return lam


@dataclass
class LiSSAInfo:
    depth: int
    repeats: int
    batch_size: int
    scale: float
    damping: float | dict[str, float]
    max_norm_ratio: float = 0.0  # max over iterates of ‖x_j‖ / (s‖v‖/λ) (< 1 for every convergent run)
    notes: list[str] = field(default_factory=list)


@torch.no_grad()  # torch.func transforms still differentiate; no graph over untracked params
def lissa_ihvp(
    fm: FlatModel,
    train: Any,
    v: Tensor,
    damping: Damping,
    *,
    depth: int = 1000,
    repeats: int = 1,
    batch_size: int = 128,
    scale: float | None = None,
    scale_factor: float = 2.0,
    seed: int = 0,
    progress: bool = False,
) -> tuple[Tensor, LiSSAInfo]:
    """LiSSA estimate of (G + λI)⁻¹ v for v [K, P] (all K vectors share the mini-batches).

    scale: s; None → ``scale_factor`` × (λ_max(G) + λ) with λ_max from power iteration on the full data.
    Each step draws ``batch_size`` training examples (without replacement within a step) from a generator seeded
    by (seed, repeat). Raises :class:`LiSSADivergenceError` if an iterate leaves ‖x‖ ≤ s‖v‖/λ or is not finite.
    progress: a bar over the depth × repeats steps (:func:`influencer.progress.progress_bar`).
    """
    d = _damping(fm, damping)
    if depth < 1 or repeats < 1:
        raise ValueError("depth and repeats must be ≥ 1")
    if scale is None:
        scale = scale_factor * (top_eigenvalue(fm, train, seed=seed) + float(d.max()))
    everything = fm.collate_all(train)
    n = fm.task.batch_size_of(everything)
    h_s = fm.reference_outputs([(torch.arange(n), everything)])[0]
    bs = min(batch_size, n)
    info = LiSSAInfo(
        depth=depth,
        repeats=repeats,
        batch_size=bs,
        scale=float(scale),
        damping=damping if isinstance(damping, dict) else float(damping),
    )
    bound = scale * v.norm(dim=1) / float(d.min())  # [K]
    total = torch.zeros_like(v)
    with progress_bar("LiSSA", depth * repeats, unit="step", enabled=progress) as bar:
        for rep in range(repeats):
            g = torch.Generator().manual_seed(seed * 1_000_003 + rep)
            x = v.clone()
            for step in range(depth):
                idx = torch.randperm(n, generator=g)[:bs]
                gx = fm.gnh_vp(x, [(idx, take(everything, idx))], [take(h_s, idx)], bs)
                x = v + x - (gx + d * x) / scale
                ratio = (x.norm(dim=1) / bound).max().item()
                info.max_norm_ratio = max(info.max_norm_ratio, ratio)
                if not math.isfinite(ratio) or ratio > 1.0:
                    raise LiSSADivergenceError(
                        f"LiSSA diverged at step {step + 1} of repeat {rep + 1} (‖x‖ reached {ratio:.3g}× the bound "
                        f"s‖v‖/λ): the scale s = {scale:.4g} is below λ_max(G_B) + λ; raise scale (or scale_factor)"
                    )
                bar.update()
            total += x / scale
    return total / repeats, info


def _damping(fm: FlatModel, damping: Damping) -> Tensor:
    d = fm.damping_vector(damping)
    if not bool((d > 0).all()):
        raise ValueError(f"damped influence needs damping > 0 on every layer, got {damping}")
    return d


@torch.no_grad()  # torch.func transforms still differentiate; no graph over untracked params
def train_gradients(fm: FlatModel, train: Any, indices: Tensor, *, batch_size: int = 256) -> Tensor:
    """Per-example ∇L(z) [len(indices), P] for the given training indices."""
    parts = [fm.per_example_grads(b) for _, b in fm.batches(train, batch_size, indices=indices)]
    return torch.cat(parts)


def scores_from_ihvp(x: Tensor, grads: Tensor) -> Tensor:
    """I = −xᵀ ∇L(z): x [Q, P] (preconditioned measurement gradients), grads [N, P] → [Q, N]."""
    return -(x @ grads.T)
