"""What a scan returns: hits and the ScanResult (saved and loaded), and merging scans of disjoint ranges."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from influencer.io import atomic_save_tensors, atomic_write_json, load_tensors, read_json
from influencer.scan.topk import BANDS, _State

SPURIOUS_RATIO = 2 / 3


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
                t = load_tensors(path, required=True)
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
        digest = atomic_save_tensors(path / "result.safetensors", tensors)
        atomic_write_json(
            path / "result.json",
            {
                "format": "influencer.scan",
                "version": 2,
                "layer_names": self.layer_names,
                "n_train": self.n_train,
                "n_scanned": self.n_scanned,
                "meta": self.meta,
                "sha256_tensors": digest,
            },
            seal=True,
        )
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ScanResult:
        path = Path(path)
        m = read_json(path / "result.json", sealed=True, legacy_below=2)
        t = load_tensors(path / "result.safetensors", expect=m.get("sha256_tensors"), required=m.get("version", 0) >= 2)
        tokens = {}
        for key in [k for k in t if k.startswith("tokens/")]:
            _, q, i = key.split("/")
            tokens[(int(q), int(i))] = t.pop(key)
        return cls(_State.from_tensors(t), m["layer_names"], m["n_train"], m["n_scanned"], tokens, m["meta"], path)


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
                t = load_tensors(path, required=True)
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
