"""The refined inverse and the default of ``scan``: conjugate-gradient steps on (G + λ) x = ∇f_q over the full
Gauss-Newton matrix, preconditioned by the fitted block-diagonal curvature (EK-FAC, K-FAC or diagonal).

A block-diagonal curvature ignores the curvature between layers and, for (E)K-FAC, approximates each layer's
block in a Kronecker-factored eigenbasis. On models trained on few examples relative to their size this costs
much accuracy (docs/VALIDATION.md §5: Pearson 0.64 with the PBRF on UCI Concrete where LiSSA reaches 0.93).
:class:`RefinedInverse` starts from the curvature's answer and corrects it with products of the exact
Gauss-Newton matrix G = (1/N) Σ_n J_nᵀ H_n J_n of all tracked layers (their weights and biases; the other
parameters stay fixed), computed over ``data`` with ``torch.func`` (forward mode for J v, reverse mode for Jᵀ;
H is the output-space Hessian of the loss, so no labels are sampled). Preconditioned CG from x₀ = 0: its first
step is the best multiple of the curvature's answer, and every further step lowers the error in the
(G + λ)-norm; ten steps reach Pearson 0.97–0.99 with the exact damped influence on the validation setups
(EK-FAC alone: 0.64–0.68).

Cost: each step is one forward-mode and one reverse-mode pass over ``data`` for every query (vectorised over a
chunk of ``query_chunk`` queries), plus a preconditioning like the one of the plain query side. Memory holds
a few [chunk, P] vectors (P = tracked parameters) and the per-batch Jacobian-vector products [chunk, B, outputs].

:func:`default_inverse` is what ``scan`` refines with by default: a seeded random sample of the scanned data, with
steps and sample size from the cost model :func:`plan_refinement`, which keeps the refinement within a share of
the scan's own cost (:func:`refinement_share`). The damping is the curvature's own per-layer λ_l (set it with
``Curvature.with_damping``); it must be > 0.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from influencer.curvature import Curvature, Inverse
from influencer.functional import FlatModel, iter_batches
from influencer.layers import Layer, as_layer
from influencer.progress import progress_bar
from influencer.tasks import Task, take_rows
from influencer.units import cg_steps

__all__ = [
    "RefinedInverse",
    "conjugate_gradients",
    "curvature_preconditioner",
    "damped_gnh_operator",
]


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
    record: list[tuple[Tensor, Tensor]] | None = None,
) -> tuple[Tensor, int, float]:
    """Solve A x = v for each row of v [K, P] by (preconditioned) conjugate gradients from x₀ = 0.

    apply: x [K, P] ↦ A x, A symmetric positive definite; precondition: r ↦ M⁻¹ r (None: none). Each row stops
    at ‖r‖ ≤ rtol ‖v‖ (at most ``max_iter`` steps), or every row takes exactly ``iterations`` steps when given.
    progress: a bar named ``desc`` over the steps (:func:`influencer.progress.progress_bar`). record: a list that
    receives each step's (α [K, 1], β [K, 1]), to replay the same linear map on other vectors.
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
            if record is not None:
                record.append((alpha[:, None].clone(), beta[:, None].clone()))
            bar.update()
    return x, steps, float((r.norm(dim=1) / vn).max())


def damped_gnh_operator(
    fm: FlatModel, data: Any, damping: Tensor, *, batch_size: int = 2048
) -> Callable[[Tensor], Tensor]:
    """x [K, P] ↦ (G + diag(damping)) x, G the full-batch Gauss-Newton matrix of ``fm`` over ``data``."""
    batches = fm.batches(data, batch_size)
    n = sum(len(i) for i, _ in batches)
    if n == 0:
        raise ValueError("no training data for the Gauss-Newton products")

    def apply(x: Tensor) -> Tensor:
        return fm.gnh_vp(x, batches, None, n) + damping * x

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
            "damping; the identity strategy has neither (use refine=0 for gradient dot products)"
        )
    lam = {name: float(f.damping or 0.0) for name, f in curvature.layers.items()}
    bad = [name for name, v in lam.items() if not v > 0]
    if bad:
        raise ValueError(
            f"refinement needs damping λ_l > 0 on every layer; layers {bad} have none "
            "(use curvature.with_damping(damping=...))"
        )
    return lam


#: memory one Gauss-Newton pass may spend on output-space tangents (vectors × examples × outputs)
_GNH_OUTPUT_BYTES = 1 << 30


class RefinedInverse:
    """(G + λ)⁻¹ refined on the full Gauss-Newton matrix: an :class:`~influencer.curvature.Inverse`.

    ``solve`` runs ``steps`` steps of conjugate gradients on (G + λ) x = v, G = the damped Gauss-Newton matrix of
    every tracked layer over ``data`` (cross-layer blocks included), preconditioned by ``curvature``'s
    block-diagonal inverse and damped by its λ_l. ``steps=0`` is the curvature's own answer. ``data``: training
    data in the task's format (the set the curvature describes, or a sample of it; G is averaged over it).
    batch_size: examples per Gauss-Newton pass (None: as many as keep the output-space tangents of one query
    chunk within 1 GiB); query_chunk: right-hand sides solved together; record: how ``data`` was chosen (kept in
    :meth:`describe`).
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        curvature: Curvature,
        data: Any,
        *,
        steps: int = 3,
        batch_size: int | None = None,
        query_chunk: int = 16,
        progress: bool = False,
        record: dict[str, Any] | None = None,
    ):
        if steps < 0:
            raise ValueError(f"steps must be ≥ 0, got {steps}")
        if query_chunk < 1:
            raise ValueError(f"query_chunk must be ≥ 1, got {query_chunk}")
        self._curvature = curvature
        self.damping = _damping(curvature)
        self.model, self.task, self.data = model, task, data
        self.steps, self.query_chunk, self.progress = int(steps), int(query_chunk), progress
        self.n_data = len(task.as_dataset(data))  # type: ignore[arg-type]
        if self.n_data == 0:
            raise ValueError("no training data for the Gauss-Newton products (refinement data is empty)")
        self.fm = FlatModel(model, task, [x.name for x in curvature.bind(model)])
        self.batch_size = batch_size
        self.record = dict(record or {})
        self._apply: Callable[[Tensor], Tensor] | None = None
        self.last_residual: float | None = None

    @property
    def curvature(self) -> Curvature:
        return self._curvature

    def describe(self) -> dict[str, Any]:
        """What this inverse is, as JSON: recorded with every query store and scan built on it."""
        return {
            "inverse": "refined",
            "strategy": self._curvature.strategy,
            "steps": self.steps,
            "data_size": self.n_data,
            **self.record,
        }

    def _operator(self) -> Callable[[Tensor], Tensor]:
        if self._apply is None:
            bs = self.batch_size or _auto_batch(self.fm, self.data, self.query_chunk)
            damping = self.fm.damping_vector(self.damping)
            self._apply = damped_gnh_operator(self.fm, self.data, damping, batch_size=bs)
        return self._apply

    def solve(self, grads: dict[str, Tensor]) -> dict[str, Tensor]:
        """x ≈ (G + λ)⁻¹ v for v = ``grads`` (name → [Q, d_out, w], every tracked layer): the same shapes."""
        missing = [n for n in self.fm.layer_names if n not in grads]
        if missing:
            raise ValueError(f"solve needs a gradient for every tracked layer; missing {missing}")
        pre = curvature_preconditioner(self.fm, self._curvature)
        v_all = self.fm.flat(grads)
        parts: list[Tensor] = []
        worst = 0.0
        with progress_bar(
            f"refining ({cg_steps(self.steps)} over {self.n_data} sequences)",
            len(v_all),
            unit="query",
            enabled=self.progress and self.steps > 0,
        ) as bar:
            for lo in range(0, len(v_all), self.query_chunk):
                v = v_all[lo : lo + self.query_chunk]
                with torch.no_grad():  # torch.func still differentiates; no graphs over the untracked parameters
                    if self.steps == 0:
                        x = pre(v)
                    else:
                        x, _, res = conjugate_gradients(self._operator(), v, precondition=pre, iterations=self.steps)
                        worst = max(worst, res)
                parts.append(x)
                bar.update(len(v))
        self.last_residual = worst if self.steps else None
        return self.fm.layer_matrices(torch.cat(parts))

    def solve_parts(self, total: dict[str, Tensor], parts: dict[str, Tensor]) -> dict[str, Tensor]:
        """The refined solve of one right-hand side ``total`` (name → [1, d_out, w]) applied to its ``parts``
        (name → [C, d_out, w], Σ_c parts = total) as one linear map: CG runs on ``total`` and its step sizes are
        replayed on every part, so the parts' solutions sum to the solution of the total exactly (CG itself is
        not linear in its right-hand side). Costs one more Gauss-Newton product per part and step."""
        pre = curvature_preconditioner(self.fm, self._curvature)
        v, w = self.fm.flat(total), self.fm.flat(parts)
        if len(v) != 1:
            raise ValueError(f"solve_parts takes one right-hand side, got {len(v)}")
        with torch.no_grad():
            if self.steps == 0:
                return self.fm.layer_matrices(pre(w))
            coeffs: list[tuple[Tensor, Tensor]] = []
            conjugate_gradients(self._operator(), v, precondition=pre, iterations=self.steps, record=coeffs)
            x = torch.zeros_like(w)
            r = w.clone()
            p = pre(r)
            for alpha, beta in coeffs:
                ap = self._operator()(p)
                x += alpha * p
                r -= alpha * ap
                p = pre(r) + beta * p
        return self.fm.layer_matrices(x)


def _auto_batch(fm: FlatModel, data: Any, vectors: int) -> int:
    """Examples per Gauss-Newton pass so that ``vectors`` output tangents take ≤ 1 GiB (3 live copies), sized on
    the first (up to 8) examples."""
    probe = fm.to(next(iter_batches(fm.task, data, 8))[1])
    with torch.no_grad():
        out = fm.outputs(fm.theta0, probe)
    per_example = out.numel() * out.element_size() / len(out)
    return max(1, int(_GNH_OUTPUT_BYTES // (3 * vectors * per_example)))


# --------------------------------------------------------------------------------------------------------
# The default: how much refinement a scan buys (cost model)
# --------------------------------------------------------------------------------------------------------

#: refinement cost of one right-hand side over one sequence, in forward+backward passes of that sequence
#: (forward-mode tangent + output-space Hessian + reverse pass; measured by benchmarks/bench_refine.py)
GNH_PASS_COST = 1.5
#: the refinement may cost up to this share of the scan on small corpora (≤ SMALL sequences) ...
SMALL, SMALL_SHARE = 4096, 1.0
#: ... and this share on large ones (≥ LARGE sequences); log-linear in between
LARGE, LARGE_SHARE = 100_000, 0.1
#: default CG steps when affordable, and the sample-size bounds
DEFAULT_STEPS, MIN_SAMPLE, MAX_SAMPLE = 3, 16, 1024


def refinement_share(n_scan: int) -> float:
    """The share of the scan's cost the default refinement may spend: 1 up to 4,096 scanned sequences, 0.1 from
    100,000, log-linear in between."""
    if n_scan <= SMALL:
        return SMALL_SHARE
    if n_scan >= LARGE:
        return LARGE_SHARE
    t = math.log(n_scan / SMALL) / math.log(LARGE / SMALL)
    return math.exp(math.log(SMALL_SHARE) + t * (math.log(LARGE_SHARE) - math.log(SMALL_SHARE)))


@dataclass(frozen=True)
class RefinePlan:
    """The refinement a scan runs: ``steps`` CG steps over ``sample`` training sequences, its predicted cost as a
    share of the scan's (``predicted``) and the share allowed (``share``); ``reason`` says how it was chosen."""

    steps: int
    sample: int
    predicted: float
    share: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def scan_pass_cost(n_queries: int, layers: list[Layer], rank: int | None, model_flops: float) -> float:
    """The scan's cost per token in forward+backward passes: 1 (the pass) + scoring every resident query
    (rank-k contraction per tracked layer, 2·k·(d_out + w) flops per query and token; exact layers 2·d_out·w)."""
    score = 0.0
    for x in layers:
        d_out, w = x.shape
        per = d_out * w if rank is None or rank * (d_out + w) >= d_out * w else rank * (d_out + w)
        score += 2.0 * per
    return 1.0 + n_queries * score / max(model_flops, 1.0)


def plan_refinement(
    n_queries: int,
    n_scan: int,
    n_data: int,
    *,
    scan_cost: float = 1.0,
    steps: int | None = None,
    share: float | None = None,
) -> RefinePlan:
    """Steps and sample size of the default refinement, within ``share`` (default :func:`refinement_share`) of the
    scan's cost.

    Costs per token in forward+backward passes: the scan ``scan_cost`` per scanned sequence (see
    :func:`scan_pass_cost`), the refinement :data:`GNH_PASS_COST` per query, step and sampled sequence. With
    ``steps`` None the plan takes :data:`DEFAULT_STEPS` steps over as many sequences as the budget buys (at most
    :data:`MAX_SAMPLE` and ``n_data``); when that is under :data:`MIN_SAMPLE` it takes fewer steps (1 step only
    rescales the curvature's answer to the best multiple), and none when even one step over MIN_SAMPLE
    sequences does not fit. With ``steps`` given only the sample size is chosen (at least MIN_SAMPLE).
    """
    share = refinement_share(n_scan) if share is None else share
    budget = share * n_scan * scan_cost / (GNH_PASS_COST * max(n_queries, 1))  # steps × sequences affordable
    cap = min(MAX_SAMPLE, n_data)
    floor = min(MIN_SAMPLE, n_data)

    def cost(k: int, m: int) -> float:
        return k * m * GNH_PASS_COST * n_queries / max(n_scan * scan_cost, 1e-12)

    if steps is not None:
        m = max(floor, min(cap, int(budget // max(steps, 1))))
        return RefinePlan(steps, m, cost(steps, m), share, f"{steps} steps as asked, sample within the budget")
    for k in range(DEFAULT_STEPS, 0, -1):
        m = min(cap, int(budget // k))
        if m >= floor:
            why = "within the budget" if k == DEFAULT_STEPS else f"budget too small for {DEFAULT_STEPS} steps"
            return RefinePlan(k, m, cost(k, m), share, why)
    return RefinePlan(0, 0, 0.0, share, f"budget too small for one step over {floor} sequences")


def pass_flops(model: nn.Module) -> float:
    """Forward+backward flops per token: 6 × the weights of every linear layer (the output head included)."""
    total = 0
    for module in model.modules():
        layer = as_layer("", module)
        if layer is not None:
            total += layer.d_out * layer.d_in
    return 6.0 * total


def sample_rows(n: int, m: int, seed: int) -> torch.Tensor:
    """A seeded random sample of ``m`` of ``n`` row indices, sorted (the same for every partition of a scan)."""
    if m >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:m].sort().values


def default_inverse(
    model: nn.Module,
    task: Task,
    inverse: Inverse,
    train: Any,
    *,
    refine: int | str,
    n_queries: int,
    n_scan: int,
    rank: int | None,
    sample: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> tuple[Inverse, RefinePlan | None]:
    """The inverse a scan uses: ``inverse`` itself when it is already refined, when ``refine=0`` or for the
    identity strategy under ``refine="auto"``; otherwise a :class:`RefinedInverse` over a seeded random sample of
    ``train`` with steps (``refine`` when an int, else chosen) and sample size from :func:`plan_refinement`.
    ``sample``: refine over this many sequences instead of the planned number. Returns (inverse, the plan or None
    when nothing was planned)."""
    if refine != "auto" and not (isinstance(refine, int) and refine >= 0):
        raise ValueError(f"refine must be 'auto' or a number of CG steps ≥ 0, got {refine!r}")
    if not isinstance(inverse, Curvature):
        if refine not in ("auto", 0) and refine != inverse.describe().get("steps"):
            raise ValueError(
                f"refine={refine!r} asks to refine, but the inverse given is already refined "
                f"({inverse.describe()}); pass its curvature instead, or leave refine='auto'"
            )
        return inverse, None
    if refine == 0 or (refine == "auto" and inverse.strategy == "identity"):
        return inverse, None
    n_data = len(task.as_dataset(train))  # type: ignore[arg-type]
    layers = inverse.bind(model, check_weights=False)
    scan_cost = scan_pass_cost(n_queries, layers, rank, pass_flops(model))
    steps = None if refine == "auto" else int(refine)
    plan = plan_refinement(n_queries, n_scan, n_data, scan_cost=scan_cost, steps=steps)
    if sample is not None:
        if sample < 1:
            raise ValueError(f"sample must be ≥ 1, got {sample}")
        m = min(sample, n_data)
        k = (plan.steps or 1) if refine == "auto" else int(refine)
        predicted = k * m * GNH_PASS_COST * n_queries / max(n_scan * scan_cost, 1e-12)
        plan = RefinePlan(k, m, predicted, plan.share, f"sample of {m} as asked")
    if plan.steps == 0:
        return inverse, plan
    rows = sample_rows(n_data, plan.sample, seed)
    record = {"sample_of": n_data, "seed": seed, "sample_digest": _rows_digest(rows), "plan": plan.to_dict()}
    refined = RefinedInverse(
        model, task, inverse, take_rows(train, rows), steps=plan.steps, progress=progress, record=record
    )
    return refined, plan


def _rows_digest(rows: torch.Tensor) -> str:
    return hashlib.sha256(rows.to(torch.int64).numpy().tobytes()).hexdigest()[:16]
