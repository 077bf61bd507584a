"""One shard of training sequences through the scorers, and the re-ranking of hits by their own curvature."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from influencer.layers import Layer
from influencer.passes import batches, layer_io
from influencer.progress import Bar
from influencer.scan.contract import _LayerScorer, _Scoring
from influencer.scan.topk import BANDS, _State
from influencer.tasks import Task


def _correction_meta(correction: dict[str, Any] | None) -> dict[str, Any] | None:
    if correction is None or "factors" not in correction:
        return correction
    return {**correction, "factors": {str(i): f for i, f in correction["factors"].items()}}


def _distinct(state: _State, k: int, *, bands: bool = True) -> list[int]:
    """The distinct training sequences among the first k entries of every kept list (the layer bands' too)."""
    lists = (state.top, state.bottom, *(state.bands.values() if bands else ()))
    return sorted({int(i) for t in lists for i in t.indices[:, :k].flatten()} - {-1})


def _correction_pool(state: _State, top_k: int, wanted_k: int, allowed: float) -> tuple[int, list[int], str] | None:
    """Which kept hits the leave-one-in correction can afford, as (depth, sequences, lists), or None.

    In order: every list's pool of ``top_k`` candidates (re-ranking can then bring in a hit from below the cut);
    every list's ``wanted_k`` kept hits; the top and bottom lists' kept hits only — what a user reads; the
    layer-band lists then keep their uncorrected values — so a budget that cannot cover everything still corrects
    the answer rather than nothing. ``allowed``: candidates the budget pays for."""
    for depth, lists in ((top_k, "all"), (wanted_k, "all"), (wanted_k, "top and bottom")):
        pool = _distinct(state, depth, bands=lists == "all")
        if len(pool) <= allowed:
            return depth, pool, lists
    return None


def _correct_hits(
    state: _State,
    model: nn.Module,
    task: Task,
    inverse: Any,
    train: Any,
    layers: list[Layer],
    rank: int | None,
    n_scanned: int,
    top_k: int,
    wanted_k: int,
    *,
    forced: bool,
    n_train: int,
    progress: bool,
) -> tuple[_State, dict[int, float], dict[str, Any]]:
    """The kept hits corrected for their own curvature (leave-one-in factors), within the budget: the correction
    costs ~OWN_CURVATURE_COST passes per distinct candidate and may spend the share of the scan's cost (in passes,
    as the refinement's plan counts it) that the refinement may; ``forced`` corrects the whole pool.
    Returns (the state cut to ``wanted_k``, the factors, the record for ``meta["self_correction"]``)."""
    from influencer.refine_plan import pass_flops, refinement_share, scan_pass_cost
    from influencer.self_curvature import OWN_CURVATURE_COST, hit_factors

    q = state.count.shape[0]
    scan_cost = scan_pass_cost(q, layers, rank, pass_flops(model))
    allowed = refinement_share(n_scanned) * n_scanned * scan_cost / OWN_CURVATURE_COST
    chosen = _correction_pool(state, top_k, wanted_k, float("inf") if forced else allowed)
    if chosen is None:
        n_read = len(_distinct(state, wanted_k, bands=False))
        skipped = {"skipped": f"{n_read} hits would cost more than the scan's budget for it"}
        return _rescale_hits(state, {}, wanted_k), {}, skipped
    depth, pool, lists = chosen
    factors = hit_factors(model, task, inverse, train, pool, n_train=n_train, progress=progress)
    state = _rescale_hits(state, factors, wanted_k, depth, bands=lists == "all")
    return state, factors, {"pool": depth, "candidates": len(pool), "lists": lists, "factors": factors}


def _rescale_hits(
    state: _State, factors: dict[int, float], k: int, depth: int | None = None, *, bands: bool = True
) -> _State:
    """Every kept list's first ``depth`` entries with each hit's score (and its layer parts) times its factor,
    re-ranked, cut to k (``bands=False``: the layer-band lists are only cut, their values left as they were)."""
    out = _State.empty(state.count.shape[0], k, state.top.layers.shape[-1], state.top.values.dtype)
    out.count, out.total, out.positive, out.squares = state.count, state.total, state.positive, state.squares
    out.scores = state.scores
    for mine, theirs, largest in (
        (out.top, state.top, True),
        (out.bottom, state.bottom, False),
        *((out.bands[b], state.bands[b], True) for b in BANDS),
    ):
        d = theirs.values.shape[1] if depth is None else depth
        if not bands and mine is not out.top and mine is not out.bottom:
            d = min(k, theirs.values.shape[1])  # uncorrected: the kept hits as they were
            mine.update(theirs.values[:, :d], theirs.indices[:, :d], theirs.layers[:, :d], largest)
            continue
        rows = [[factors.get(int(i), 1.0) for i in row] for row in theirs.indices[:, :d].tolist()]
        f = torch.tensor(rows, dtype=torch.float64).to(theirs.values.dtype)
        mine.update(theirs.values[:, :d] * f, theirs.indices[:, :d], theirs.layers[:, :d] * f[..., None], largest)
    return out


def _candidates(
    candidates: Sequence[torch.Tensor] | torch.Tensor | None, q: int, n: int
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(allowed [Q, N] bool or None, the sorted training indices to scan)."""
    if candidates is None:
        return None, torch.arange(n)
    if isinstance(candidates, torch.Tensor) and candidates.dim() == 1:
        candidates = [candidates] * q
    if len(candidates) != q:
        raise ValueError(f"candidates: got {len(candidates)} index lists for {q} queries")
    allowed = torch.zeros(q, n, dtype=torch.bool)
    for i, c in enumerate(candidates):
        c = torch.as_tensor(c, dtype=torch.long)
        if len(c) and (int(c.min()) < 0 or int(c.max()) >= n):
            raise ValueError(f"candidates for query {i} index outside the {n} training sequences")
        allowed[i, c] = True
    return allowed, allowed.any(0).nonzero().flatten()


class _Subset:
    def __init__(self, dataset: Any, indices: torch.Tensor):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[int(self.indices[i])]


def _scan_shard(
    model: nn.Module,
    task: Task,
    layers: list[Layer],
    scorers: list[_LayerScorer] | _Scoring,
    dataset: Any,
    shard: torch.Tensor,
    allowed: torch.Tensor | None,
    q: int,
    top_k: int,
    dtype: torch.dtype,
    batch_size: int,
    keep_scores: bool,
    bar: Bar,
) -> _State:
    device = next(model.parameters()).device
    state = _State.empty(q, top_k, len(layers), dtype, device)  # on the model's device: no host sync per batch
    subset = _Subset(dataset, shard)
    scoring = scorers if isinstance(scorers, _Scoring) else _Scoring(scorers, fuse=False)
    names = [x.name for x in layers]
    for local, batch in batches(subset, task, batch_size, desc="scan", progress=False):
        idx = shard[local]
        io = layer_io(model, task, layers, batch, idx, loss="train")
        mask = None if allowed is None else allowed[:, idx].to(device, non_blocking=True)
        state.update(idx.to(device, non_blocking=True), scoring(io, names), mask, keep_scores)
        bar.update(len(idx))
    return state.to("cpu")
