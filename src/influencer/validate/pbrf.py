"""The proximal Bregman response function (PBRF), solved by Adam: the ground truth of damped GNH influence.

For a training example z_m (DESIGN.md §1, Grosse et al. 2023 Eq. 7–9):

    θ(ε) = argmin_θ  B(θ) + ε L(z_m, θ) + (λ/2) ‖θ − θ_s‖²,   B(θ) = (1/N) Σ_i D_L(h(θ, x_i), h(θ_s, x_i)),

over the tracked parameters (the others stay at θ_s; for the MLP setups the tracked layers are all parameters).
The PBRF influence of z_m on a measurement f is the symmetric difference (f(θ(ε)) − f(θ(−ε))) / (2ε), which
damped Gauss-Newton influence I = −∇fᵀ(G + λ)⁻¹∇L(z_m) linearises exactly (Eq. 9). One pair of solves per
training example serves every measurement.

**Solver.** Both solves start at θ_s. The problem is rescaled (not changed) by writing θ = θ_s + ε u and
minimising J(u) = [B(θ_s + εu) + σ ε L(z_m, θ_s + εu) + (λ/2) ε² ‖u‖²] / ε² (σ = ±1), whose minimiser
u* ≈ −σ(G + λ)⁻¹∇L(z_m) is O(1) whatever ε: Adam's step size then does not depend on ε. Adam runs on the full
training set (deterministic gradients) until the **stated tolerance** ‖∇J(u)‖ ≤ ``tol`` · ‖∇J(0)‖ =
``tol`` · ‖∇L(z_m, θ_s)‖ holds (at most ``max_steps``). Since J is (G + λ)-strongly convex near θ_s this bounds
‖u − u*‖ ≤ tol ‖∇L‖ / λ. The learning rate starts at ``lr`` (None: ``lr_scale`` × the RMS coordinate of the
Cauchy point of the quadratic model, i.e. the step that minimises J along −∇J(0), found with one GNH-vector
product) and is halved whenever the gradient norm has not reached a new minimum for ``patience`` steps. A solve
that has not met the tolerance when the learning rate falls below ``min_lr`` × its initial value stops there and
is reported as not converged (with the gradient ratio it reached): with ReLU networks J is only piecewise smooth
(activation patterns flip as θ moves), so its gradient norm can have a floor above the tolerance, and further
steps at a vanishing learning rate would only cost time.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from influencer.functional import FlatModel

__all__ = ["PBRF", "PBRFConfig", "PBRFSolve"]


@dataclass
class PBRFConfig:
    """Solver settings. ``epsilon`` None → 1/N (one added copy of z_m)."""

    epsilon: float | None = None
    tol: float = 3e-3
    max_steps: int = 3000
    lr: float | None = None
    lr_scale: float = 30.0
    betas: tuple[float, float] = (0.9, 0.99)
    patience: int = 50
    min_lr: float = 1e-3
    batch_size: int = 4096


@dataclass
class PBRFSolve:
    """One PBRF solve: the steps taken, the reached relative gradient norm ‖∇J(u)‖/‖∇J(0)‖, whether it met the
    tolerance, and the initial and final Adam learning rates."""

    sign: int
    steps: int
    grad_ratio: float
    converged: bool
    final_lr: float
    initial_lr: float = 0.0


class PBRF:
    """PBRF solver for one model state θ_s, one damping λ and one training set (reused across z_m)."""

    def __init__(self, fm: FlatModel, train: Any, damping: float | dict[str, float], config: PBRFConfig | None = None):
        self.fm, self.train, self.damping = fm, train, damping
        self.d = fm.damping_vector(damping)
        if not bool((self.d > 0).all()):
            raise ValueError(f"the PBRF needs damping λ > 0 on every tracked layer, got {damping}")
        self.config = config or PBRFConfig()
        self.batches = fm.batches(train, self.config.batch_size)
        self.refs = fm.reference_outputs(self.batches)
        self.n = sum(len(i) for i, _ in self.batches)
        self.epsilon = float(self.config.epsilon) if self.config.epsilon is not None else 1.0 / self.n
        self.dataset = fm.task.as_dataset(train)

    # --- objective ------------------------------------------------------------------------------------
    def _objective_grad(self, u: Tensor, sign: int, example: Any) -> Tensor:
        """∇_u J(u) for one sign and training example (a collated batch of one)."""
        eps = self.epsilon
        u = u.detach().requires_grad_(True)
        theta = self.fm.theta0 + eps * u
        total = 0.5 * (self.d * u.pow(2)).sum()
        total = total + sign * self.fm.train_loss(theta, example).sum() / eps
        for (_, b), ref in zip(self.batches, self.refs, strict=True):
            total = total + self.fm.bregman(self.fm.outputs(theta, b), ref, b).sum() / (self.n * eps * eps)
        (g,) = torch.autograd.grad(total, u)
        return g.detach()

    def _gnh_vp(self, v: Tensor) -> Tensor:
        return self.fm.gnh_vp(v, self.batches, self.refs, self.n)

    def _example(self, index: int) -> Any:
        return self.fm.to(self.fm.task.collate([self.dataset[int(index)]]))

    # --- solver ---------------------------------------------------------------------------------------
    def solve(self, index: int, sign: int) -> tuple[Tensor, PBRFSolve]:
        """Minimise J for training example ``index`` at +ε (sign=1) or −ε (sign=−1): (u, info)."""
        cfg = self.config
        example = self._example(index)
        u = torch.zeros_like(self.fm.theta0)
        g = self._objective_grad(u, sign, example)
        g0 = float(g.norm())
        if g0 == 0.0:
            return u, PBRFSolve(sign, 0, 0.0, True, 0.0, 0.0)
        if cfg.lr is not None:
            lr = float(cfg.lr)
        else:  # Cauchy point of the quadratic model ½uᵀ(G+λ)u + gᵀu along −g
            curv = float(g @ (self._gnh_vp(g) + self.d * g))
            alpha = float(g @ g) / max(curv, 1e-300)
            lr = cfg.lr_scale * alpha * g0 / math.sqrt(g.numel())
        lr0 = lr
        b1, b2 = cfg.betas
        m = torch.zeros_like(u)
        v = torch.zeros_like(u)
        best, since = g0, 0
        adam_eps = 1e-12 * g0 / math.sqrt(g.numel())
        steps, ratio = 0, 1.0
        while steps < cfg.max_steps:
            steps += 1
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            mhat = m / (1 - b1**steps)
            vhat = v / (1 - b2**steps)
            u = u - lr * mhat / (vhat.sqrt() + adam_eps)
            g = self._objective_grad(u, sign, example)
            gn = float(g.norm())
            if not math.isfinite(gn):
                raise FloatingPointError(f"PBRF solve for example {index} diverged (lr {lr:.3g}); lower lr_scale")
            ratio = gn / g0
            if ratio <= cfg.tol:
                break
            if gn < best * (1 - 1e-3):
                best, since = gn, 0
            else:
                since += 1
                if since >= cfg.patience:
                    lr *= 0.5
                    since = 0
                    if lr < cfg.min_lr * lr0:
                        break
        return u.detach(), PBRFSolve(sign, steps, ratio, ratio <= cfg.tol, lr, lr0)

    def influence(self, index: int, queries_batches: list[tuple[Tensor, Any]]) -> tuple[Tensor, dict[str, Any]]:
        """PBRF influence of training example ``index`` on every query: ([Q], info)."""
        t0 = time.perf_counter()
        u_plus, info_p = self.solve(index, +1)
        u_minus, info_m = self.solve(index, -1)
        eps = self.epsilon
        with torch.no_grad():
            f_p = torch.cat([self.fm.measurement(self.fm.theta0 + eps * u_plus, b) for _, b in queries_batches])
            f_m = torch.cat([self.fm.measurement(self.fm.theta0 + eps * u_minus, b) for _, b in queries_batches])
        infl = (f_p - f_m) / (2 * eps)
        return infl, {
            "index": int(index),
            "plus": asdict(info_p),
            "minus": asdict(info_m),
            "seconds": time.perf_counter() - t0,
        }
