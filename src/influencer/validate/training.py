"""How every validation model is trained: :class:`Recipe` (Adam, full batch by default, cosine learning-rate decay,
optional decoupled weight decay) and :func:`train_model`, which applies it in place from the model's seeded state;
also the row subsets of a data set (:func:`_subset`) that the LDS retrains on.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from influencer.tasks import CausalLM, Task

__all__ = ["Recipe", "train_model"]


@dataclass(frozen=True)
class Recipe:
    """Adam (full batch by default) with cosine learning-rate decay for ``steps`` steps from a seeded model.

    The loss is the mean over examples of L(z) (mean over target tokens for causal LMs); ``weight_decay`` is
    decoupled (AdamW) and 0 by default.
    """

    steps: int
    lr: float
    weight_decay: float = 0.0
    batch_size: int = 0  # 0 = full batch; else mini-batches drawn from a seeded generator

    def config(self) -> dict[str, Any]:
        return asdict(self)


def _subset(task: Task, data: Any, idx: Tensor) -> Any:
    """Rows ``idx`` of (X, Y) pairs or of a CausalLM dict."""
    if isinstance(data, tuple):
        return tuple(t[idx] for t in data)
    if isinstance(data, dict):
        return {k: (v[idx] if isinstance(v, Tensor) and v.dim() > 0 else v) for k, v in data.items()}
    raise TypeError(f"cannot take a subset of {type(data).__name__}")


def _batch_all(task: Task, data: Any) -> Any:
    ds = task.as_dataset(data)
    return task.collate([ds[i] for i in range(len(ds))])  # type: ignore[arg-type]


def train_model(model: nn.Module, task: Task, data: Any, recipe: Recipe, *, seed: int = 0) -> dict[str, Any]:
    """Train ``model`` in place with ``recipe`` on ``data``; returns {"loss", "seconds", "steps"}."""
    t0 = time.perf_counter()
    batch = _batch_all(task, data)
    n = task.batch_size_of(batch)
    if isinstance(task, CausalLM):
        denom_all = float(batch["target_mask"][:, 1:].sum())
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / recipe.steps)))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(recipe.steps):
        if recipe.batch_size and recipe.batch_size < n:
            idx = torch.randperm(n, generator=gen)[: recipe.batch_size]
            b = _take(batch, idx)
        else:
            b = batch
        out = task.forward(model, b)
        per = task.train_loss(out, b)
        denom = float(b["target_mask"][:, 1:].sum()) if isinstance(task, CausalLM) else len(per)
        loss = per.sum() / denom
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        out = task.forward(model, batch)
        final = float(task.train_loss(out, batch).sum()) / (denom_all if isinstance(task, CausalLM) else n)
    return {"loss": final, "seconds": time.perf_counter() - t0, "steps": recipe.steps}


def _take(batch: Any, idx: Tensor) -> Any:
    if isinstance(batch, dict):
        return {k: v[idx] for k, v in batch.items()}
    return tuple(t[idx] for t in batch)
