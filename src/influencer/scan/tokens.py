"""The token pass: each hit's score split over its tokens (paper Eq. 31)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from influencer import distributed as dist
from influencer.layers import Layer
from influencer.passes import amp_aware, batches, compute_dtype, eval_mode, layer_io
from influencer.queries import QueryStore
from influencer.scan.contract import _LayerScorer
from influencer.scan.result import ScanResult
from influencer.scan.shard import _Subset
from influencer.tasks import Task


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
