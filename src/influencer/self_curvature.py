"""The leave-one-in correction: a training sequence's influence, damped by its own curvature.

The damped curvature of influence, G + λ with G = (1/N) Σ_n G_n, contains every training sequence's own
Gauss-Newton term G_z = J_zᵀ H_z J_z at weight 1/N. For a sequence that is the only source of its features (a
fact stated once, an outlier), that term is most of the curvature along its own gradient g = ∇L(z), and an
inverse that misses it — a refinement over a random sample that does not contain z, or EK-FAC, whose
Kronecker eigenbasis spreads it thin — overstates z's influence by orders of magnitude (docs/VALIDATION.md §9).

Writing A = R + G_z/N and keeping only z's own term along g (G_z ≈ c_z u uᵀ, u = g/‖g‖), Sherman–Morrison gives

    I(q, z) = −∇f_qᵀ A⁻¹ g ≈ I_R(q, z) / (1 + (c_z / N) · s_z),

c_z = gᵀ G_z g / ‖g‖² (z's own curvature along its gradient: one forward-mode pass over z) and
s_z = gᵀ R⁻¹ g / ‖g‖², here with R⁻¹ ≈ the curvature's block-diagonal inverse (its self-influence quadratic form).
The factor depends on z only, so it rescales a hit's score for every query, and its per-layer and per-token
parts alike (they still sum to the total).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from influencer.curvature.core import Curvature, Inverse
from influencer.curvature.linalg import per_example_grads
from influencer.functional import FlatModel, output_hessian_product
from influencer.passes import amp_aware, compute_dtype, eval_mode, layer_io
from influencer.tasks import Task

__all__ = ["OWN_CURVATURE_COST", "hit_factors", "own_curvature", "self_correction"]

#: cost of one sequence's factor in forward+backward passes (its gradients, the tokens-first quadratic form and a
#: forward-mode pass; measured ~4 on SmolLM2 with 30 tracked MLP linears, benchmarks/bench_refine.py)
OWN_CURVATURE_COST = 4.0


@torch.no_grad()
def own_curvature(fm: FlatModel, example: Any, g: torch.Tensor) -> float:
    """c = gᵀ G_z g / ‖g‖² for one collated example z and a flat direction g [P] (forward mode, closed-form H)."""
    theta = fm.theta0

    def f(th: torch.Tensor) -> torch.Tensor:
        return fm.outputs(th, example)

    with sdpa_kernel(SDPBackend.MATH):
        out, jg = jvp(f, (theta,), (g.to(theta.dtype),))
    hjg = output_hessian_product(fm.task, out.detach(), example, jg[None])[0]
    gg = float((g.to(torch.float64) ** 2).sum())
    return float((jg.to(torch.float64) * hjg.to(torch.float64)).sum()) / gg if gg > 0 else 0.0


@amp_aware
def self_correction(
    model: nn.Module,
    task: Task,
    curvature: Curvature,
    train: Any,
    indices: list[int],
    *,
    n_train: int,
    batch_size: int = 16,
    progress: bool = False,
) -> dict[int, dict[str, float]]:
    """For each training index: ``c`` (own curvature along its gradient), ``s`` (gᵀK⁻¹g/‖g‖² with the curvature's
    inverse K⁻¹) and ``factor`` = 1 / (1 + c·s / n_train), the leave-one-in rescaling of its influence.

    Batched: per batch one forward + backward (the gradients g, tokens first) and one forward-mode pass that
    carries each example's own gradient as its weight tangent (:class:`~influencer.capture.WeightTangents`).
    """
    import torch.autograd.forward_ad as fwad

    from influencer.capture import WeightTangents
    from influencer.progress import progress_bar

    layers = curvature.bind(model, check_weights=False)
    dataset = task.as_dataset(train)
    dtype = compute_dtype(model)
    device = next(model.parameters()).device
    order = torch.as_tensor(sorted({int(i) for i in indices}), dtype=torch.long)
    out: dict[int, dict[str, float]] = {}
    with eval_mode(model), progress_bar("own curvature", len(order), unit="seq", enabled=progress) as bar:
        for lo in range(0, len(order), batch_size):
            idx = order[lo : lo + batch_size]
            batch = task.to(task.collate([dataset[int(i)] for i in idx]), device)
            io = layer_io(model, task, layers, batch, idx, loss="train")
            grads = {name: per_example_grads(x.a.to(dtype), x.g.to(dtype)) for name, x in io.items()}
            gg = sum(m.to(torch.float64).pow(2).flatten(1).sum(1) for m in grads.values())
            quad = sum(
                curvature.quadratic_form_tokens(name, x.a.to(dtype), x.g.to(dtype)).to(torch.float64)
                for name, x in io.items()
            )
            with torch.no_grad(), fwad.dual_level(), WeightTangents(layers, grads), sdpa_kernel(SDPBackend.MATH):
                outputs = task.forward(model, batch)
                primal, tangent = fwad.unpack_dual(outputs)
                h_t = output_hessian_product(task, primal, batch, tangent[None])[0]
                curv = (tangent.to(torch.float64) * h_t.to(torch.float64)).flatten(1).sum(1)
            for j, i in enumerate(idx.tolist()):
                if float(gg[j]) == 0.0:
                    out[i] = {"c": 0.0, "s": 0.0, "factor": 1.0}
                    continue
                c, s_ = float(curv[j] / gg[j]), float(quad[j] / gg[j])
                out[i] = {"c": c, "s": s_, "factor": 1.0 / (1.0 + c * s_ / n_train)}
            bar.update(len(idx))
    return out


def hit_factors(
    model: nn.Module,
    task: Task,
    inverse: Inverse,
    train: Any,
    indices: list[int],
    *,
    n_train: int,
    progress: bool = False,
) -> dict[int, float]:
    """The leave-one-in factor 1 / (1 + c s / N) of each training index for scores made with ``inverse`` (a
    curvature or one refined over a sample): it restores the sequence's own curvature at its weight 1/N.

    A member of a refined inverse's sample also gets this factor. Its own term sits in the sample's Gauss-Newton
    matrix at weight 1/M, but a few CG steps act on it only through the directions the query's Krylov space
    reaches: one step is a single scalar per query, so a member's unrelated score is not damped at all. Boosting
    members by (1 + c s / M) put all 19 members of a 1-step sample above every planted fact on the fine-tuned
    SmolLM2 (recall@1 0.0, docs/VALIDATION.md §9); treating them like the rest can at worst understate a member
    that the refinement already damped."""
    raw = self_correction(model, task, inverse.curvature, train, indices, n_train=n_train, progress=progress)
    return {i: 1.0 / (1.0 + r["c"] * r["s"] / n_train) for i, r in raw.items()}
