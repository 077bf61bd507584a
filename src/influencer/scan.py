"""One streaming pass over the training data for every resident query (paper §3.2–3.3).

Per query the scan keeps the top-k most positive and most negative training sequences (with their per-layer
scores), the top-k of each layer band (lower / middle / upper third of the tracked layers, §5.3.2) and running
totals (count, sum, sum of positive influence, sum of squares). No [Q, N] matrix is held unless asked for.
A second, targeted pass over the hits splits each hit's score over its tokens (Eq. 31).

With ``out_dir`` the scan is resumable: every shard of training sequences is written atomically when done and
recorded in ``scan.json``; the same call after an interruption skips finished shards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from influencer import distributed as dist
from influencer.curvature.core import Inverse
from influencer.io import atomic_save_tensors, atomic_write_json, load_tensors, read_json
from influencer.layers import Layer
from influencer.passes import amp_aware, batches, compute_dtype, eval_mode, layer_io
from influencer.progress import Bar, progress_bar
from influencer.queries import LayerQueries, QueryStore
from influencer.refine_plan import default_inverse
from influencer.tasks import Task

BANDS = ("lower", "middle", "upper")
#: candidates per kept list re-ranked by the leave-one-in correction, as a multiple of top_k
POOL = 3
SPURIOUS_RATIO = 2 / 3
#: extra memory the scan may spend on dense copies of rank-k queries to use the cheaper contraction order
DEFAULT_DENSE_BUDGET = 1 << 30
#: working memory for a chunk of materialized per-sequence gradients
_MATERIALIZE_CHUNK_BYTES = 256 << 20


# --------------------------------------------------------------------------------------------------------
# Per-layer contraction with a cost model
# --------------------------------------------------------------------------------------------------------


def contraction_costs(q: int, k: int | None, t: float, d_out: int, w: int) -> dict[str, float]:
    """Multiply-adds per training sequence for one layer.

    "tokens": never form the per-sequence gradient; Σ_t (U_kᵀ g_t)·(S_k V_kᵀ ā_t) (or g_tᵀ P ā_t if exact).
    "materialize": form Ĝ = Σ_t g_t ā_tᵀ once (T·d_out·w), then one dot product per query (Q·d_out·w).
    """
    per_token = q * (k * (d_out + w) if k is not None else d_out * w)
    return {"tokens": t * per_token, "materialize": t * d_out * w + q * d_out * w}


class _LayerScorer:
    """Scores of one layer for all queries: [Q, B] per batch, or per token [Q, B, T]."""

    def __init__(self, layer: Layer, lq: LayerQueries, mode: str, dtype: torch.dtype, device: torch.device):
        self.layer, self.mode = layer, mode
        d_out, w = layer.shape
        q = lq.n_queries
        if lq.low_rank:
            assert lq.left is not None and lq.right is not None
            k = lq.left.shape[-1]
            self.k = k
            self.left = lq.left.to(device, dtype).permute(1, 0, 2).reshape(d_out, q * k)  # [d_out, Q·k]
            self.right = lq.right.to(device, dtype).permute(2, 0, 1).reshape(w, q * k)  # [w, Q·k]
            self.p_in = None
        else:
            self.k = None
            p = lq.to_dense().to(device, dtype)
            self.p_in = p.permute(2, 0, 1).reshape(w, q * d_out)  # ā_t @ p_in → [Q, d_out] per token
        self.q = q
        # materialize mode: P in the [w, d_out] layout of per-example aᵀg products
        self.p_flat = lq.to_dense().to(device, dtype).mT.reshape(q, w * d_out) if mode == "materialize" else None

    def token_scores(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """⟨P, g_t ā_tᵀ⟩ per query and token: [Q, B, T]."""
        b, t, _ = a.shape
        if self.k is not None:
            prod = (g @ self.left) * (a @ self.right)  # [B, T, Q·k]
            per = prod.view(b, t, self.q, self.k).sum(-1)
        else:
            assert self.p_in is not None
            pa = (a @ self.p_in).view(b, t, self.q, -1)  # [B, T, Q, d_out]
            per = (pa * g.unsqueeze(2)).sum(-1)
        return per.permute(2, 0, 1)

    def scores(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """⟨P, Σ_t g_t ā_tᵀ⟩ per query and sequence: [Q, B]."""
        if self.mode == "tokens":
            return self.token_scores(a, g).sum(-1)
        assert self.p_flat is not None
        b = a.shape[0]
        out = torch.empty(self.q, b, dtype=a.dtype, device=a.device)
        # per-sequence gradients Ĝ_b = ā_bᵀ g_b for a chunk of sequences at once, then one GEMM against all queries
        chunk = max(1, _MATERIALIZE_CHUNK_BYTES // (self.p_flat.shape[1] * a.element_size()))
        for i in range(0, b, chunk):
            grads = torch.bmm(a[i : i + chunk].mT, g[i : i + chunk])  # [b', w, d_out]
            out[:, i : i + chunk] = self.p_flat @ grads.reshape(grads.shape[0], -1).T
        return out


def _choose_modes(
    layers: list[Layer], store: QueryStore, tokens_per_seq: float, dense_budget: int, force: str | None
) -> dict[str, str]:
    """Pick each layer's contraction order by the cost model, within a memory budget for dense copies."""
    modes: dict[str, str] = {}
    gains = []
    for layer in layers:
        lq = store.layers[layer.name]
        d_out, w = layer.shape
        cost = contraction_costs(lq.n_queries, lq.rank, tokens_per_seq, d_out, w)
        modes[layer.name] = "tokens"
        if force is not None:
            modes[layer.name] = force
        elif cost["materialize"] < cost["tokens"]:
            extra = lq.n_queries * d_out * w * 4 if lq.low_rank else 0
            gains.append((cost["tokens"] - cost["materialize"], extra, layer.name))
    budget = dense_budget
    for _gain, extra, name in sorted(gains, reverse=True):
        if extra <= budget:
            modes[name] = "materialize"
            budget -= extra
    return modes


# --------------------------------------------------------------------------------------------------------
# Running top-k and totals
# --------------------------------------------------------------------------------------------------------


@dataclass
class _Top:
    """Top-k per query: values [Q, K], indices [Q, K] (−1 = empty), per-layer scores [Q, K, L]."""

    values: torch.Tensor
    indices: torch.Tensor
    layers: torch.Tensor

    @classmethod
    def empty(cls, q: int, k: int, n_layers: int, largest: bool, dtype: torch.dtype) -> _Top:
        fill = float("-inf") if largest else float("inf")
        return cls(
            torch.full((q, k), fill, dtype=dtype),
            torch.full((q, k), -1, dtype=torch.long),
            torch.zeros(q, k, n_layers, dtype=dtype),
        )

    def update(self, values: torch.Tensor, indices: torch.Tensor, layers: torch.Tensor, largest: bool) -> None:
        """values [Q, B], indices [B] (or [Q, B]), layers [Q, B, L]; masked entries hold ∓inf."""
        k = self.values.shape[1]
        q = values.shape[0]
        idx = indices.expand(q, -1) if indices.dim() == 1 else indices
        all_v = torch.cat([self.values, values], 1)
        all_i = torch.cat([self.indices, idx], 1)
        all_l = torch.cat([self.layers, layers], 1)
        # deterministic: order by value, ties by smaller index (stable sort on a pre-sorted index order)
        order = torch.argsort(all_i, dim=1, stable=True)
        all_v, all_i = all_v.gather(1, order), all_i.gather(1, order)
        all_l = all_l.gather(1, order.unsqueeze(-1).expand_as(all_l))
        top = torch.argsort(all_v, dim=1, descending=largest, stable=True)[:, :k]
        self.values = all_v.gather(1, top)
        self.indices = all_i.gather(1, top)
        self.layers = all_l.gather(1, top.unsqueeze(-1).expand(-1, -1, all_l.shape[-1]))
        self.indices[~torch.isfinite(self.values)] = -1


def _band_slices(n_layers: int) -> dict[str, slice]:
    """Lower / middle / upper third of the tracked layers (in forward order)."""
    cuts = [round(i * n_layers / 3) for i in range(4)]
    return {band: slice(cuts[i], cuts[i + 1]) for i, band in enumerate(BANDS)}


@dataclass
class _State:
    """Everything a range of training sequences contributes; shards merge by :meth:`merge`."""

    top: _Top
    bottom: _Top
    bands: dict[str, _Top]
    count: torch.Tensor
    total: torch.Tensor
    positive: torch.Tensor
    squares: torch.Tensor
    scores: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (indices [B], [Q, B])

    @classmethod
    def empty(cls, q: int, k: int, n_layers: int, dtype: torch.dtype) -> _State:
        z = torch.zeros(q, dtype=torch.float64)
        return cls(
            _Top.empty(q, k, n_layers, True, dtype),
            _Top.empty(q, k, n_layers, False, dtype),
            {b: _Top.empty(q, k, n_layers, True, dtype) for b in BANDS},
            z.clone(),
            z.clone(),
            z.clone(),
            z.clone(),
        )

    def update(
        self, indices: torch.Tensor, per_layer: torch.Tensor, allowed: torch.Tensor | None, keep_scores: bool
    ) -> None:
        """per_layer [L, Q, B] scores of sequences ``indices`` [B]; allowed [Q, B] bool (prefilter) or None."""
        total = per_layer.sum(0)
        layers = per_layer.permute(1, 2, 0)  # [Q, B, L]
        valid = torch.ones_like(total, dtype=torch.bool) if allowed is None else allowed
        inf = torch.tensor(float("inf"), dtype=total.dtype)
        self.top.update(torch.where(valid, total, -inf), indices, layers, True)
        self.bottom.update(torch.where(valid, total, inf), indices, layers, False)
        for band, sl in _band_slices(per_layer.shape[0]).items():
            band_total = per_layer[sl].sum(0)
            self.bands[band].update(torch.where(valid, band_total, -inf), indices, layers, True)
        t64 = torch.where(valid, total, 0).to(torch.float64)
        self.count += valid.sum(1)
        self.total += t64.sum(1)
        self.positive += t64.clamp_min(0).sum(1)
        self.squares += t64.pow(2).sum(1)
        if keep_scores:
            self.scores.append((indices.clone(), torch.where(valid, total, torch.nan)))

    def merge(self, other: _State) -> None:
        for mine, theirs, largest in (
            (self.top, other.top, True),
            (self.bottom, other.bottom, False),
            *((self.bands[b], other.bands[b], True) for b in BANDS),
        ):
            mine.update(theirs.values, theirs.indices, theirs.layers, largest)
        self.count += other.count
        self.total += other.total
        self.positive += other.positive
        self.squares += other.squares
        self.scores.extend(other.scores)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"count": self.count, "total": self.total, "positive": self.positive, "squares": self.squares}
        for name, top in (("top", self.top), ("bottom", self.bottom), *((f"band_{b}", self.bands[b]) for b in BANDS)):
            out.update({f"{name}/values": top.values, f"{name}/indices": top.indices, f"{name}/layers": top.layers})
        if self.scores:
            out["scores/indices"] = torch.cat([i for i, _ in self.scores])
            out["scores/values"] = torch.cat([s for _, s in self.scores], 1)
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> _State:
        def top(name: str) -> _Top:
            return _Top(t[f"{name}/values"], t[f"{name}/indices"], t[f"{name}/layers"])

        state = cls(
            top("top"),
            top("bottom"),
            {b: top(f"band_{b}") for b in BANDS},
            t["count"],
            t["total"],
            t["positive"],
            t["squares"],
        )
        if "scores/indices" in t:
            state.scores.append((t["scores/indices"], t["scores/values"]))
        return state


# --------------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------------


@dataclass
class Hit:
    """One training sequence's influence on one query.

    score: raw influence I(q, z); per_copy: I / N (Δ log p in nats per added copy); layers: name → I_l.
    tokens: I_t per position [T] (Σ_t = score) once token attribution ran; the value at position t belongs to
    the token at t, whose weights were used to predict token t+1. spurious: ‖I_t‖₂ / ‖I_t‖₁ > 2/3 (§5.3).
    """

    query: int
    index: int
    score: float
    per_copy: float
    layers: dict[str, float]
    tokens: torch.Tensor | None = None
    layer_tokens: torch.Tensor | None = None

    @property
    def spurious(self) -> bool | None:
        if self.tokens is None:
            return None
        l1 = float(self.tokens.abs().sum())
        return l1 > 0 and float(self.tokens.norm()) / l1 > SPURIOUS_RATIO


@dataclass
class ScanResult:
    """What a scan returns: top hits per query, band re-rankings, totals, optional full scores."""

    state: _State
    layer_names: list[str]
    n_train: int
    n_scanned: int
    token_scores: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # (q, index) → [L, T]
    meta: dict[str, Any] = field(default_factory=dict)
    directory: Path | None = None  # the run directory of a resumable scan (full scores live in its shards)

    @property
    def n_queries(self) -> int:
        return self.state.count.shape[0]

    def top(self, query: int, k: int | None = None, *, negative: bool = False, band: str | None = None) -> list[Hit]:
        """Hits for one query, best first: most positive (default), most negative, or by a layer band's score."""
        if band is not None and band not in BANDS:
            raise ValueError(f"band must be one of {BANDS}, got {band!r}")
        src = self.state.bands[band] if band else (self.state.bottom if negative else self.state.top)
        hits = []
        for j in range(src.values.shape[1] if k is None else min(k, src.values.shape[1])):
            idx = int(src.indices[query, j])
            if idx < 0:
                break
            layers = {n: float(v) for n, v in zip(self.layer_names, src.layers[query, j], strict=True)}
            score = float(src.layers[query, j].sum())
            lt = self.token_scores.get((query, idx))
            hits.append(Hit(query, idx, score, score / self.n_train, layers, None if lt is None else lt.sum(0), lt))
        return hits

    def overlap(self, unfiltered: ScanResult, k: int | None = None) -> list[float]:
        """Per query, the share of ``unfiltered``'s top-k that this (prefiltered) scan also found.

        The paper warns that a prefilter biases results; report this whenever both runs exist.
        """
        from influencer.prefilter import overlap

        return [
            overlap([h.index for h in self.top(q, k)], [h.index for h in unfiltered.top(q, k)])
            for q in range(self.n_queries)
        ]

    def stats(self, query: int) -> dict[str, float]:
        """Running totals for one query: count, mean, std, sum and sum of positive influence."""
        n = float(self.state.count[query])
        s, sq = float(self.state.total[query]), float(self.state.squares[query])
        mean = s / max(n, 1)
        return {
            "count": n,
            "sum": s,
            "mean": mean,
            "std": max(sq / max(n, 1) - mean * mean, 0.0) ** 0.5,
            "positive_sum": float(self.state.positive[query]),
        }

    @property
    def scores(self) -> torch.Tensor | None:
        """Full scores [Q, N] (NaN where not scored) if the scan kept them (read from the shards of a run dir)."""
        if not self.meta.get("keep_scores"):
            return None
        chunks = list(self.state.scores)
        if not chunks and self.directory is not None:
            for path in sorted((self.directory / "shards").glob("*.safetensors")):
                t = load_tensors(path)
                chunks.append((t["scores/indices"], t["scores/values"]))
        idx = torch.cat([i for i, _ in chunks])
        vals = torch.cat([v for _, v in chunks], 1)
        out = torch.full(
            (vals.shape[0], int(self.meta.get("n_dataset", self.n_scanned))), float("nan"), dtype=vals.dtype
        )
        out[:, idx] = vals
        return out

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        tensors = self.state.tensors()
        for (q, i), v in self.token_scores.items():
            tensors[f"tokens/{q}/{i}"] = v
        atomic_save_tensors(path / "result.safetensors", tensors)
        atomic_write_json(
            path / "result.json",
            {
                "format": "influencer.scan",
                "version": 1,
                "layer_names": self.layer_names,
                "n_train": self.n_train,
                "n_scanned": self.n_scanned,
                "meta": self.meta,
            },
        )
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ScanResult:
        path = Path(path)
        m = read_json(path / "result.json")
        t = load_tensors(path / "result.safetensors")
        tokens = {}
        for key in [k for k in t if k.startswith("tokens/")]:
            _, q, i = key.split("/")
            tokens[(int(q), int(i))] = t.pop(key)
        return cls(_State.from_tensors(t), m["layer_names"], m["n_train"], m["n_scanned"], tokens, m["meta"], path)


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
            refine=refine,
            refine_seed=refine_seed,
            self_correct=self_correct,
            progress=progress,
        )


def _resident_store(
    model: nn.Module,
    task: Task,
    inverse: Inverse,
    queries: Any,
    store: QueryStore | None,
    rank: int | None,
    out: Path | None,
    query_digest: str,
    progress: bool,
    batch_size: int = 16,
) -> QueryStore:
    """The query store: given, loaded from the run directory, or built — once, on rank 0, then broadcast."""
    if store is not None:
        return store
    described = inverse.describe()

    def load_or_build() -> QueryStore:
        if out is not None and (out / "queries.json").is_file():
            loaded = QueryStore.load(out)
            if loaded.meta.get("queries") != query_digest:
                raise ValueError(f"'{out}' holds a scan of other queries; use another out_dir or delete it")
            if loaded.meta.get("inverse") != described:
                raise ValueError(
                    f"'{out}' holds a scan with other query refinement settings ({loaded.meta.get('inverse')} "
                    f"there, {described} now); use another out_dir or delete it"
                )
            return loaded
        built = QueryStore.build(model, task, inverse, queries, rank=rank, batch_size=batch_size, progress=progress)
        built.meta["queries"] = query_digest
        if out is not None:
            built.save(out)
        return built

    local = dist.run_collectively(load_or_build)
    if dist.world_size() == 1:
        assert local is not None
        return local
    header = dist.broadcast_object(
        None
        if local is None
        else {"rank": local.rank, "n_queries": local.n_queries, "layers": list(local.layers), "meta": local.meta}
    )
    tensors: dict[str, torch.Tensor] = {}
    if local is not None:
        for x in local.layers.values():
            tensors.update(x.tensors())
    tensors = dist.broadcast_tensors(tensors if local is not None else None)
    layers = {
        name: LayerQueries(
            name, tensors.get(f"{name}/dense"), tensors.get(f"{name}/left"), tensors.get(f"{name}/right")
        )
        for name in header["layers"]
    }
    return QueryStore(layers=layers, rank=header["rank"], n_queries=header["n_queries"], meta=header["meta"])


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
    refine: int | str,
    refine_seed: int,
    self_correct: bool | None,
    progress: bool,
) -> ScanResult:
    n = len(dataset)
    curvature = inverse.curvature
    query_digest = _digest(task, queries)
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
    scorers = [_LayerScorer(x, store.layers[x.name], modes[x.name], dtype, device) for x in layers]
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

    def open_run() -> list[int]:
        assert progress_file is not None
        if progress_file.is_file():
            saved = read_json(progress_file)
            if saved.get("config") != config:
                raise ValueError(f"'{out}' holds a scan with different settings; use another out_dir or delete it")
            return list(saved["done"])
        atomic_write_json(progress_file, {"config": config, "done": [], "shards": len(shards)})
        return []

    listed = set(dist.broadcast_object(dist.run_collectively(open_run))) if out is not None else set()
    state = _State.empty(q, top_k, len(layers), dtype)
    done = sorted(listed)
    my_total = sum(len(shards[s]) for s in mine)
    with eval_mode(model), progress_bar("scan", my_total, unit="seq", enabled=progress and dist.is_main()) as bar:
        for s in mine:
            shard = shards[s]
            path = out / "shards" / f"{s:06d}.safetensors" if out is not None else None
            if path is not None and path.is_file() and (_shard_config(path) == config_digest or s in listed):
                finished = _State.from_tensors(load_tensors(path))
                finished.scores = []
                state.merge(finished)
                bar.update(len(shard))
                continue
            shard_state = _scan_shard(
                model,
                task,
                layers,
                scorers,
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
            if path is not None and progress_file is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_save_tensors(path, shard_state.tensors(), metadata={"config": config_digest})
                if world == 1:  # in a process group the shard files themselves record progress
                    done = sorted({*done, s})
                    atomic_write_json(progress_file, {"config": config, "done": done, "shards": len(shards)})
                shard_state.scores = []  # full scores stay on disk, in the shard files
            state.merge(shard_state)
    state = _gather_state(state, q, top_k, len(layers), dtype)
    n_units = curvature.n_train if n_train is None else int(n_train)
    factors: dict[int, float] = {}
    correction = None
    if correct:
        from influencer.refine_plan import pass_flops, refinement_share, scan_pass_cost
        from influencer.self_curvature import OWN_CURVATURE_COST, hit_factors

        def distinct(k: int) -> list[int]:
            lists = (state.top, state.bottom, *state.bands.values())
            return sorted({int(i) for t in lists for i in t.indices[:, :k].flatten()} - {-1})

        # the correction costs ~OWN_CURVATURE_COST passes per distinct candidate: keep it within the share of the
        # scan's cost (in passes, as the refinement's plan counts it) that the refinement may spend — shrink the
        # pool to the kept hits, else skip it and say so
        scan_cost = scan_pass_cost(q, layers, store.rank, pass_flops(model))
        allowed = refinement_share(len(order)) * len(order) * scan_cost / OWN_CURVATURE_COST
        depth = top_k
        pool = distinct(depth)
        if len(pool) > allowed and not self_correct:
            depth = wanted_k
            pool = distinct(depth)
        if len(pool) <= allowed or self_correct:
            factors = hit_factors(model, task, inverse, train, pool, n_train=n_units, progress=progress)
            state = _rescale_hits(state, factors, wanted_k, depth)
            correction = {"pool": depth, "candidates": len(pool), "factors": factors}
        else:
            correction = {"skipped": f"{len(pool)} hits would cost more than the scan's budget for it"}
            state = _rescale_hits(state, {}, wanted_k)
    result = ScanResult(
        state,
        [x.name for x in layers],
        n_units,
        len(order),
        meta={
            "rank": store.rank,
            "modes": modes,
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
    if out is not None and progress_file is not None:
        n_shards = len(shards)

        def commit() -> None:
            atomic_write_json(progress_file, {"config": config, "done": list(range(n_shards)), "shards": n_shards})
            result.save(out)

        dist.run_collectively(commit)
    return result


def _correction_meta(correction: dict[str, Any] | None) -> dict[str, Any] | None:
    if correction is None or "factors" not in correction:
        return correction
    return {**correction, "factors": {str(i): f for i, f in correction["factors"].items()}}


def _rescale_hits(state: _State, factors: dict[int, float], k: int, depth: int | None = None) -> _State:
    """Every kept list's first ``depth`` entries with each hit's score (and its layer parts) times its factor,
    re-ranked, cut to k."""
    out = _State.empty(state.count.shape[0], k, state.top.layers.shape[-1], state.top.values.dtype)
    out.count, out.total, out.positive, out.squares = state.count, state.total, state.positive, state.squares
    out.scores = state.scores
    for mine, theirs, largest in (
        (out.top, state.top, True),
        (out.bottom, state.bottom, False),
        *((out.bands[b], state.bands[b], True) for b in BANDS),
    ):
        d = theirs.values.shape[1] if depth is None else depth
        rows = [[factors.get(int(i), 1.0) for i in row] for row in theirs.indices[:, :d].tolist()]
        f = torch.tensor(rows, dtype=torch.float64).to(theirs.values.dtype)
        mine.update(theirs.values[:, :d] * f, theirs.indices[:, :d], theirs.layers[:, :d] * f[..., None], largest)
    return out


def _digest(task: Task, data: Any, queries: bool = True) -> str:
    """sha256 of every tensor of every example (identifies a query set, or with ``queries=False`` a training set)."""
    h = hashlib.sha256()
    dataset = task.as_dataset(data, queries=queries)
    for i in range(len(dataset)):  # type: ignore[arg-type]
        ex = dataset[i]
        parts = ex.values() if isinstance(ex, dict) else ex
        for t in parts:
            h.update(torch.as_tensor(t).detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


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
    scorers: list[_LayerScorer],
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
    state = _State.empty(q, top_k, len(layers), dtype)
    subset = _Subset(dataset, shard)
    for local, batch in batches(subset, task, batch_size, desc="scan", progress=False):
        idx = shard[local]
        io = layer_io(model, task, layers, batch, idx, loss="train")
        # one device → host copy per batch (a sync per layer would stall a GPU)
        per_layer = torch.stack(
            [s.scores(io[s.layer.name].a.to(dtype), io[s.layer.name].g.to(dtype)) for s in scorers]
        ).cpu()
        state.update(idx, per_layer, None if allowed is None else allowed[:, idx], keep_scores)
        bar.update(len(idx))
    return state


@amp_aware
def attribute_tokens(
    model: nn.Module,
    task: Task,
    store: QueryStore,
    layers: list[Layer],
    dataset: Any,
    result: ScanResult,
    *,
    batch_size: int = 16,
    progress: bool = False,
) -> None:
    """Targeted second pass over the hits: per hit the layer × token matrix [L, T] (Σ = the hit's score).

    Fills ``result.token_scores`` for every hit in the top, bottom and band lists. Memory grows with the
    number of hits, not with N.
    """
    st = result.state
    wanted: dict[int, set[int]] = {}
    for top in (st.top, st.bottom, *st.bands.values()):
        for qi in range(top.indices.shape[0]):
            for idx in top.indices[qi].tolist():
                if idx >= 0:
                    wanted.setdefault(idx, set()).add(qi)
    if not wanted:
        return
    dtype = compute_dtype(model)
    device = next(model.parameters()).device
    scorers = [_LayerScorer(x, store.layers[x.name], "tokens", dtype, device) for x in layers]
    order = torch.tensor(sorted(wanted))
    order = order[slice(*dist.shard_range(0, len(order)))]  # in a process group each rank does a share
    subset = _Subset(dataset, order)
    found: dict[tuple[int, int], torch.Tensor] = {}
    with eval_mode(model):
        for local, batch in batches(subset, task, batch_size, desc="token attribution", progress=progress):
            idx = order[local]
            mask = task.token_mask(task.to(batch, device))
            io = layer_io(model, task, layers, batch, idx, loss="train")
            per = []
            for s in scorers:
                x = io[s.layer.name]
                ts = s.token_scores(x.a.to(dtype), x.g.to(dtype))  # [Q, B, uses·T]
                per.append(ts.view(ts.shape[0], ts.shape[1], x.uses, -1).sum(2))
            per_layer = torch.stack(per, 1).cpu()  # [Q, L, B, T]
            for j, i in enumerate(idx.tolist()):
                length = int(mask[j].sum()) if mask is not None else per_layer.shape[-1]
                for qi in wanted[i]:
                    found[(qi, i)] = per_layer[qi, :, j, :length].clone()
    if dist.world_size() > 1:
        for part in dist.all_gather_tensors({f"{qi}/{i}": v for (qi, i), v in found.items()}):
            for key, v in part.items():
                qi, i = map(int, key.split("/"))
                found[(qi, i)] = v
    result.token_scores.update(found)


def merge_scans(paths: Sequence[str | os.PathLike]) -> ScanResult:
    """Combine the saved results of scans over disjoint data ranges (``scan(..., data_range=..., out_dir=...)``)
    of one query set into the result of a single scan: top-k ± and bands merged, totals added, token
    attributions of the surviving hits kept, full scores (if kept) joined.

    Exact, because a sequence in the overall top-k is in its own partition's top-k. Partitions must share
    queries, layers, rank, top_k, keep_scores and the training set size.
    """
    if not paths:
        raise ValueError("merge_scans needs at least one scan result")
    parts = []
    for p in paths:
        path = Path(p)
        if not (path / "result.json").is_file():
            raise FileNotFoundError(
                f"no finished scan at '{path}' (expected result.json); run the scan (again) to finish it"
            )
        parts.append(ScanResult.load(path))
    first = parts[0]
    for r in parts[1:]:
        for key in ("query_digest", "n_dataset", "rank", "top_k", "keep_scores"):
            if r.meta.get(key) != first.meta.get(key):
                raise ValueError(
                    f"scans '{first.directory}' and '{r.directory}' differ in {key} "
                    f"({first.meta.get(key)!r} vs {r.meta.get(key)!r}); they are not parts of one scan"
                )
        if r.layer_names != first.layer_names:
            raise ValueError(f"scans '{first.directory}' and '{r.directory}' track different layers")
    n = first.meta.get("n_dataset", first.n_scanned)
    parts.sort(key=lambda r: tuple(r.meta.get("data_range", (0, n))))
    end = 0
    for r in parts:
        lo, hi = r.meta.get("data_range", (0, n))
        if lo < end:
            raise ValueError(
                f"scan '{r.directory}' covers sequences from {lo}, which an earlier part already "
                f"covers (up to {end}); each sequence must be scanned once"
            )
        end = hi
    q, k = first.state.top.values.shape
    state = _State.empty(q, k, len(first.layer_names), first.state.top.values.dtype)
    tokens: dict[tuple[int, int], torch.Tensor] = {}
    for r in parts:
        chunks = list(r.state.scores)
        if first.meta.get("keep_scores") and not chunks and r.directory is not None:
            for path in sorted((r.directory / "shards").glob("*.safetensors")):
                t = load_tensors(path)
                chunks.append((t["scores/indices"], t["scores/values"]))
        r.state.scores = chunks
        state.merge(r.state)
        tokens.update(r.token_scores)
    hits = {
        (qi, int(i))
        for top in (state.top, state.bottom, *state.bands.values())
        for qi in range(q)
        for i in top.indices[qi].tolist()
        if i >= 0
    }
    ranges = [r.meta.get("data_range", [0, n]) for r in parts]
    meta = {
        **first.meta,
        "data_range": [ranges[0][0], ranges[-1][1]],
        "partitions": ranges,
        "modes": [r.meta.get("modes") for r in parts],
    }
    return ScanResult(
        state,
        first.layer_names,
        first.n_train,
        sum(r.n_scanned for r in parts),
        {key: v for key, v in tokens.items() if key in hits},
        meta,
    )
