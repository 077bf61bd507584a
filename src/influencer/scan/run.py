"""The streaming scan itself: the resident query store, resumable shards, the correction of the kept hits."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from influencer import distributed as dist
from influencer.curvature.core import Inverse
from influencer.io import atomic_save_tensors, load_tensors
from influencer.layers import Layer
from influencer.ledger import Ledger, examples_digest
from influencer.passes import PRECISIONS, amp_aware, compute_dtype, eval_mode, work_dtype
from influencer.progress import progress_bar
from influencer.queries import QueryStore
from influencer.refine_plan import default_inverse
from influencer.scan.contract import DEFAULT_DENSE_BUDGET, _choose_modes, _LayerScorer, _Scoring
from influencer.scan.result import ScanResult
from influencer.scan.shard import (
    _candidates,
    _correct_hits,
    _correction_meta,
    _scan_shard,
)
from influencer.scan.store import _resident_store
from influencer.scan.tokens import attribute_tokens
from influencer.scan.topk import _State
from influencer.tasks import Task

#: candidates per kept list re-ranked by the leave-one-in correction, as a multiple of top_k
POOL = 3


# --------------------------------------------------------------------------------------------------------
# The scan
# --------------------------------------------------------------------------------------------------------


@amp_aware
def scan(
    model: nn.Module,
    task: Task,
    inverse: Inverse,
    queries: Any,
    train: Any,
    *,
    store: QueryStore | None = None,
    rank: int | None = 32,
    top_k: int = 10,
    batch_size: int = 16,
    candidates: Sequence[torch.Tensor] | torch.Tensor | None = None,
    keep_scores: bool = False,
    tokens: bool = True,
    out_dir: str | os.PathLike | None = None,
    shard_size: int = 1024,
    data_range: tuple[int, int] | None = None,
    n_train: int | None = None,
    contraction: str | None = None,
    dense_budget: int = DEFAULT_DENSE_BUDGET,
    precision: str = "float32",
    fuse_layers: bool | None = None,
    refine: int | str = "auto",
    refine_seed: int = 0,
    self_correct: bool | None = None,
    progress: bool = True,
) -> ScanResult:
    """Score every training sequence against every query in one pass; returns a :class:`ScanResult`.

    inverse: a fitted :class:`~influencer.curvature.Curvature` or any :class:`~influencer.curvature.Inverse`.
    refine: how the queries are preconditioned when ``inverse`` is a curvature. ``"auto"`` (default): refined on
    the full damped Gauss-Newton matrix (:class:`~influencer.refine.RefinedInverse`) over a seeded random sample
    of ``train``, with CG steps and sample size chosen by :func:`~influencer.refine_plan.plan_refinement` so that the
    refinement costs at most the scan itself on small corpora and ≤ 10 % of it from 100k scanned sequences;
    an int: that many CG steps (sample size still from the cost model); 0: the curvature's own answer (the
    paper's plain EK-FAC). What was used is in ``result.meta["inverse"]`` and ``result.meta["refine_plan"]``.
    rank: rank of the stored queries (None = exact). top_k: hits kept per query (positive, negative, per band).
    candidates: a prefilter — one index tensor per query (or one shared tensor); other pairs are not scored.
    keep_scores: also keep the full score matrix (in shards when ``out_dir`` is given).
    tokens: run the targeted second pass that splits every top hit over its tokens and layers.
    out_dir: make the scan resumable (shards + ``scan.json``); the same call continues an interrupted run. A lock
        file stops a second process from using the same directory.
    data_range: scan only training sequences [start, stop) — a partition; :func:`merge_scans` combines the
        partitions of a training set into the result of one scan (every partition refines on the same sample).
    contraction: force "tokens" or "materialize" (default: the cost model decides per layer).
    precision: of the per-layer contraction of queries with training gradients: "float32" (default: the model's
    compute dtype) or "bfloat16" (bf16 products with float32 accumulation inside each, scores summed in float32:
    within ~0.5 % of float32 — far below the rank-32 compression's error — and several times faster on GPUs and
    on CPUs with AVX512-BF16 or AMX; recorded in ``meta["precision"]``).
    fuse_layers: score layers of one shape together, one batched product per batch instead of one per layer (same
    numbers up to rounding); default: on CUDA, where kernel launches cost, not on the CPU, where stacking costs.
    store: a ready :class:`~influencer.queries.QueryStore`, used as built (``refine`` does not apply).
    self_correct: rescale the hits by their leave-one-in factor (:mod:`influencer.self_curvature`: each hit's own
        curvature, which an inverse refined over a sample misses), re-ranking a pool of :data:`POOL` × ``top_k``
        candidates per list. None (default): on for a refined inverse, off for the plain curvature. The running
        totals and ``result.scores`` stay uncorrected; ``meta["self_correction"]`` holds the factors.

    Inside a torch.distributed process group rank 0 builds the query store and broadcasts it, the shards are
    spread over the ranks, and every rank returns the same merged result (rank 0 writes ``out_dir``).
    """
    if top_k < 1:
        raise ValueError(f"top_k must be ≥ 1, got {top_k}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    if contraction not in (None, "tokens", "materialize"):
        raise ValueError(f"contraction must be None, 'tokens' or 'materialize', got {contraction!r}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be ≥ 1, got {shard_size}")
    if refine != "auto" and not (isinstance(refine, int) and refine >= 0):
        raise ValueError(f"refine must be 'auto' or a number of CG steps ≥ 0, got {refine!r}")
    if store is not None and refine not in ("auto", 0):
        raise ValueError(
            "a given store is used as it was built; refine applies when the scan builds its own store "
            "(build the store from a RefinedInverse instead)"
        )
    curvature = inverse.curvature
    layers = curvature.bind(model)
    dataset = task.as_dataset(train)
    n = len(dataset)  # type: ignore[arg-type]
    lo, hi = (0, n) if data_range is None else (int(data_range[0]), int(data_range[1]))
    if not 0 <= lo < hi <= n:
        raise ValueError(f"data_range {data_range} is not a non-empty range within the {n} training sequences")
    out = Path(out_dir) if out_dir is not None else None
    with dist.locked(out, purpose="scan") if out is not None else contextlib.nullcontext():
        return _scan(
            model,
            task,
            inverse,
            layers,
            queries,
            train,
            dataset,
            store=store,
            rank=rank,
            top_k=top_k,
            batch_size=batch_size,
            candidates=candidates,
            keep_scores=keep_scores,
            tokens=tokens,
            out=out,
            shard_size=shard_size,
            data_range=(lo, hi),
            n_train=n_train,
            contraction=contraction,
            dense_budget=dense_budget,
            precision=precision,
            fuse_layers=fuse_layers,
            refine=refine,
            refine_seed=refine_seed,
            self_correct=self_correct,
            progress=progress,
        )


def _shard_config(path: Path) -> str | None:
    """The scan-config digest a finished shard file was written under (None if absent or unreadable)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return (fh.metadata() or {}).get("config")
    except (OSError, ValueError, RuntimeError):
        return None


def _gather_state(state: _State, q: int, top_k: int, n_layers: int, dtype: torch.dtype) -> _State:
    """Every rank's state merged in rank order (the same result on every rank); the state itself in one process."""
    if dist.world_size() == 1:
        return state
    merged = _State.empty(q, top_k, n_layers, dtype)
    for tensors in dist.all_gather_tensors(state.tensors()):
        merged.merge(_State.from_tensors(tensors))
    return merged


def _scan(
    model: nn.Module,
    task: Task,
    inverse: Inverse,
    layers: list[Layer],
    queries: Any,
    train: Any,
    dataset: Any,
    *,
    store: QueryStore | None,
    rank: int | None,
    top_k: int,
    batch_size: int,
    candidates: Sequence[torch.Tensor] | torch.Tensor | None,
    keep_scores: bool,
    tokens: bool,
    out: Path | None,
    shard_size: int,
    data_range: tuple[int, int],
    n_train: int | None,
    contraction: str | None,
    dense_budget: int,
    precision: str,
    fuse_layers: bool | None,
    refine: int | str,
    refine_seed: int,
    self_correct: bool | None,
    progress: bool,
) -> ScanResult:
    n = len(dataset)
    curvature = inverse.curvature
    query_digest = examples_digest(task, queries)
    n_queries = store.n_queries if store is not None else len(task.as_dataset(queries, queries=True))  # type: ignore[arg-type]
    allowed_mask, order = _candidates(candidates, n_queries, n)
    plan = None
    if store is None:
        inverse, plan = default_inverse(
            model,
            task,
            inverse,
            train,
            refine=refine,
            n_queries=n_queries,
            n_scan=len(order),
            rank=rank,
            seed=refine_seed,
            progress=progress and dist.is_main(),
        )
    store = _resident_store(
        model, task, inverse, queries, store, rank, out, query_digest, progress, batch_size=batch_size
    )
    described = store.meta.get("inverse") or {}
    correct = described.get("inverse") == "refined" if self_correct is None else bool(self_correct)
    wanted_k, top_k = top_k, (POOL * top_k if correct else top_k)  # a pool to re-rank after the correction
    q = store.n_queries
    lo, hi = data_range
    order = order[(order >= lo) & (order < hi)]
    dtype = compute_dtype(model)
    device = next(model.parameters()).device
    t_mean = max(
        1.0, sum(f.tokens for f in curvature.layers.values()) / max(1, len(curvature.layers)) / max(1, curvature.n_fit)
    )
    modes = _choose_modes(layers, store, t_mean, dense_budget, contraction)
    work = work_dtype(precision, dtype)
    scorers = [_LayerScorer(x, store.layers[x.name], modes[x.name], work, device, out_dtype=dtype) for x in layers]
    fuse = device.type == "cuda" if fuse_layers is None else fuse_layers
    scoring = _Scoring(scorers, fuse=fuse)
    config = {
        "n": n,
        "queries": q,
        "query_digest": query_digest,
        "rank": store.rank,
        "top_k": top_k,
        "shard_size": shard_size,
        "keep_scores": keep_scores,
        "layers": [x.name for x in layers],
        "curvature": curvature.fingerprint.get("digest"),
        "strategy": curvature.strategy,
        "damping": [f.damping for f in curvature.layers.values()],
        "candidates": hashlib.sha256(order.numpy().tobytes()).hexdigest(),
        "inverse": store.meta.get("inverse"),
        "self_correct": top_k if correct else None,
    }
    if precision != "float32":
        config["precision"] = precision
    if data_range != (0, n):
        config["data_range"] = list(data_range)
    config_digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    progress_file = out / "scan.json" if out is not None else None

    world, me = dist.world_size(), dist.rank()
    if out is not None:
        shards = [order[i : i + shard_size] for i in range(0, len(order), shard_size)]
        mine = [s for s in range(len(shards)) if s % world == me]
    else:  # one shard per rank: a contiguous share of the order
        shards = [order[slice(*dist.shard_range(0, len(order), rank_=r))] for r in range(world)]
        mine = [me]

    ledger = Ledger(progress_file, "scan", config, shards=len(shards)) if progress_file is not None else None
    listed = set(dist.broadcast_object(dist.run_collectively(ledger.open))) if ledger is not None else set()
    state = _State.empty(q, top_k, len(layers), dtype)
    done = sorted(listed)
    my_total = sum(len(shards[s]) for s in mine)
    with eval_mode(model), progress_bar("scan", my_total, unit="seq", enabled=progress and dist.is_main()) as bar:
        for s in mine:
            shard = shards[s]
            path = out / "shards" / f"{s:06d}.safetensors" if out is not None else None
            if path is not None and path.is_file() and (_shard_config(path) == config_digest or s in listed):
                finished = _State.from_tensors(load_tensors(path, required=True))
                finished.scores = []
                state.merge(finished)
                bar.update(len(shard))
                continue
            shard_state = _scan_shard(
                model,
                task,
                layers,
                scoring,
                dataset,
                shard,
                allowed_mask,
                q,
                top_k,
                dtype,
                batch_size,
                keep_scores,
                bar,
            )
            if path is not None and ledger is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_save_tensors(path, shard_state.tensors(), metadata={"config": config_digest})
                if world == 1:  # in a process group the shard files themselves record progress
                    done = sorted({*done, s})
                    ledger.mark(done)
                shard_state.scores = []  # full scores stay on disk, in the shard files
            state.merge(shard_state)
    state = _gather_state(state, q, top_k, len(layers), dtype)
    n_units = curvature.n_train if n_train is None else int(n_train)
    factors: dict[int, float] = {}
    correction = None
    if correct:
        state, factors, correction = _correct_hits(
            state,
            model,
            task,
            inverse,
            train,
            layers,
            store.rank,
            len(order),
            top_k,
            wanted_k,
            forced=bool(self_correct),
            n_train=n_units,
            progress=progress,
        )
    result = ScanResult(
        state,
        [x.name for x in layers],
        n_units,
        len(order),
        meta={
            "rank": store.rank,
            "modes": modes,
            "precision": precision,
            "fused_layers": scoring.fused,
            "n_dataset": n,
            "prefiltered": candidates is not None,
            "keep_scores": keep_scores,
            "store": store.memory_report(),
            "query_digest": query_digest,
            "top_k": wanted_k,
            "data_range": list(data_range),
            "inverse": store.meta.get("inverse"),
            "refine_plan": None if plan is None else plan.to_dict(),
            "self_correction": _correction_meta(correction),
        },
    )
    result.directory = out
    if tokens:
        attribute_tokens(
            model, task, store, layers, dataset, result, batch_size=batch_size, progress=progress and dist.is_main()
        )
        for (qi, i), v in result.token_scores.items():  # tokens still sum to the (corrected) score
            result.token_scores[(qi, i)] = v * factors.get(i, 1.0)
    if out is not None and ledger is not None:
        n_shards = len(shards)

        def commit() -> None:
            ledger.mark(list(range(n_shards)))
            result.save(out)

        dist.run_collectively(commit)
    return result
