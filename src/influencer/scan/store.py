"""The scan's resident query store: given, loaded from the run directory (checked against the queries, rank and
inverse asked for), or built — once, on rank 0, then broadcast to every rank."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from influencer import distributed as dist
from influencer.curvature.core import Inverse
from influencer.ledger import check_resume
from influencer.queries import LayerQueries, QueryStore
from influencer.tasks import Task


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
            saved = {"queries": loaded.meta.get("queries"), "rank": loaded.rank, "inverse": loaded.meta.get("inverse")}
            check_resume(out, "scan", saved, {"queries": query_digest, "rank": rank, "inverse": described})
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
