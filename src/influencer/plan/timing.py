"""Timing calibration: a short run of each pass (covariance, eigenvalues, diagonal, scan, queries) on a batch
on the model's device, in seconds per sequence (per query for the query store), and one eigendecomposition,
in seconds per d³; :func:`~influencer.plan.plan` scales these to the run's size."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from influencer.curvature.linalg import split_sizes
from influencer.layers import Layer
from influencer.passes import compute_dtype, eval_mode, model_device
from influencer.plan.memory import _Shapes
from influencer.progress import NoBar
from influencer.tasks import Task


def _time(fn, repeats: int = 2) -> float:
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def _calibrate_times(
    model: nn.Module,
    task: Task,
    layers: list[Layer],
    examples: list[Any],
    shapes: _Shapes,
    blocks: int,
    rank: int | None,
    n_queries: int,
) -> dict[str, float]:
    """Seconds per sequence of each pass and seconds per d³ of an eigendecomposition, measured on a batch."""
    from influencer.curvature.core import LayerFactors
    from influencer.curvature.fit import _Fit
    from influencer.queries import LayerQueries, QueryStore
    from influencer.scan.contract import _LayerScorer
    from influencer.scan.shard import _scan_shard

    b = len(examples)
    dataset = examples
    fit = _Fit(model, task, layers, dataset, b, "sampled", 0, False, blocks)
    out: dict[str, float] = {}
    out["covariance"] = _time(lambda: fit.accumulate("covariance", 0, b)) / b
    device, dtype = model_device(model), compute_dtype(model)
    factors = {}
    for x in layers:
        f = LayerFactors(x.name, x.kind, x.d_out, x.d_in, x.bias)
        f.qa = [torch.eye(s, dtype=dtype, device=device) for s in split_sizes(x.width, blocks)]
        f.qs = [torch.eye(s, dtype=dtype, device=device) for s in split_sizes(x.d_out, blocks)]
        factors[x.name] = f
    out["eigenvalues"] = _time(lambda: fit.accumulate("eigenvalues", 0, b, bases=factors)) / b
    out["diagonal"] = _time(lambda: fit.accumulate("diagonal", 0, b)) / b
    # eigh: one decomposition of the largest block size (capped), scaled by d³
    d = min(shapes.largest_block(blocks), 768)
    m = torch.randn(d, d, dtype=torch.float64, device=device)
    m = m @ m.T
    out["eigh_per_d3"] = _time(lambda: torch.linalg.eigh(m), repeats=1) / d**3
    # scan: a random rank-k store of n_queries queries (at most 64 for the timing, scaled linearly)
    q = min(n_queries, 64)
    g = torch.Generator(device="cpu").manual_seed(0)
    store_layers = {}
    for x in layers:
        if rank is None or rank * (x.d_out + x.width) >= x.d_out * x.width:
            store_layers[x.name] = LayerQueries(
                x.name, dense=torch.randn(q, x.d_out, x.width, generator=g, dtype=dtype)
            )
        else:
            store_layers[x.name] = LayerQueries(
                x.name,
                left=torch.randn(q, x.d_out, rank, generator=g, dtype=dtype),
                right=torch.randn(q, rank, x.width, generator=g, dtype=dtype),
            )
    store = QueryStore(store_layers, rank, q)
    scorers = [_LayerScorer(x, store.layers[x.name], "tokens", dtype, device) for x in layers]
    with eval_mode(model):
        out["scan"] = (
            _time(
                lambda: _scan_shard(
                    model, task, layers, scorers, dataset, torch.arange(b), None, q, 10, dtype, b, False, NoBar()
                )
            )
            / b
            * (n_queries / q)
        )
    # per query: a measurement pass (like a training pass), the rotation of its token factors into the
    # eigenbases, the rank-k SVD there and the rotation of the factors back (influencer.eigenbasis_store)
    from influencer.curvature.linalg import from_eigenbasis, rotate
    from influencer.queries import truncated_svd

    tokens = int(examples[0]["input_ids"].shape[-1]) if isinstance(examples[0], dict) else 1

    def one_query() -> None:
        for x in layers:
            f = factors[x.name]
            a = torch.randn(1, tokens, x.width, dtype=dtype, device=device)
            g = torch.randn(1, tokens, x.d_out, dtype=dtype, device=device)
            m = rotate(g, f.qs).mT @ rotate(a, f.qa)
            if rank is not None and rank * (x.d_out + x.width) < x.d_out * x.width:
                left, right = truncated_svd(m, rank)
                rotate(left.mT, f.qs, transpose=True), rotate(right, f.qa, transpose=True)
            else:
                from_eigenbasis(m, f.qs, f.qa)

    out["queries"] = out["covariance"] + _time(one_query)
    return out
