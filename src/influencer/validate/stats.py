"""Correlation statistics in plain torch (float64): Pearson, Spearman (average ranks for ties)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["mean_std", "pearson", "rank", "spearman"]


def pearson(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two 1-D tensors (nan if either is constant)."""
    a = a.reshape(-1).to(torch.float64)
    b = b.reshape(-1).to(torch.float64)
    if a.numel() != b.numel():
        raise ValueError(f"pearson: sizes differ ({a.numel()} vs {b.numel()})")
    a = a - a.mean()
    b = b - b.mean()
    den = float(a.norm() * b.norm())
    return float(a @ b) / den if den > 0 else math.nan


def rank(x: Tensor) -> Tensor:
    """Ranks 1..n of a 1-D tensor, ties sharing their average rank (float64)."""
    x = x.reshape(-1)
    order = torch.argsort(x, stable=True)
    _, counts = torch.unique_consecutive(x[order], return_counts=True)
    ends = counts.cumsum(0)
    average = ((ends - counts) + (ends - 1)).to(torch.float64) / 2 + 1
    ranks = torch.empty(x.numel(), dtype=torch.float64)
    ranks[order] = average.repeat_interleave(counts)
    return ranks


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation (Pearson of average ranks)."""
    return pearson(rank(a), rank(b))


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and (population) standard deviation, ignoring nans."""
    v = [x for x in values if not math.isnan(x)]
    if not v:
        return math.nan, math.nan
    m = sum(v) / len(v)
    return m, math.sqrt(sum((x - m) ** 2 for x in v) / len(v))
