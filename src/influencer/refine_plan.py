"""The default refinement of ``scan``: how much refinement a scan buys (the cost model) and the inverse it builds.

:func:`plan_refinement` chooses CG steps and a sample size so that the refinement costs at most
:func:`refinement_share` of the scan (1× up to 4,096 scanned sequences, 10 % from 100,000, log-linear in between),
counting both in forward+backward passes (:func:`scan_pass_cost`, :data:`GNH_PASS_COST`).
:func:`default_inverse` builds that :class:`~influencer.refine.RefinedInverse` over a seeded random sample of
the scanned data (:func:`sample_rows`, the same for every partition of a scan).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from influencer.curvature import Curvature, Inverse
from influencer.curvature.strategies import strategy as strategy_record
from influencer.layers import Layer, as_layer
from influencer.refine import RefinedInverse
from influencer.tasks import Task, take_rows

__all__ = [
    "GNH_PASS_COST",
    "RefinePlan",
    "default_inverse",
    "pass_flops",
    "plan_refinement",
    "refinement_share",
    "sample_rows",
    "scan_pass_cost",
]


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
    if refine == 0 or (refine == "auto" and not strategy_record(inverse.strategy).curved):
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
