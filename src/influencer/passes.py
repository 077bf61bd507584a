"""Batched forward/backward passes with capture: the loop every stage (fit, scores) shares."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from influencer import sampling
from influencer.capture import Capture, LayerIO
from influencer.layers import Layer
from influencer.progress import progress_bar
from influencer.tasks import Task

#: which loss a pass differentiates
LOSSES = ("train", "sampled", "measurement")


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def compute_dtype(model: nn.Module) -> torch.dtype:
    """float64 for float64 models (tests), float32 otherwise (bf16/fp16 models are upcast for the math)."""
    for p in model.parameters():
        return torch.float64 if p.dtype == torch.float64 else torch.float32
    return torch.float32


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run with dropout off; restore the previous train/eval mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def batches(dataset: Dataset, task: Task, batch_size: int, *, desc: str, progress: bool = True,
            start: int = 0, stop: int | None = None) -> Iterator[tuple[torch.Tensor, Any]]:
    """Yield (global indices [B], collated batch) over dataset[start:stop] with a progress bar."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    stop = len(dataset) if stop is None else min(stop, len(dataset))  # type: ignore[arg-type]
    with progress_bar(desc, stop - start, unit="seq", enabled=progress) as bar:
        for lo in range(start, stop, batch_size):
            idx = torch.arange(lo, min(lo + batch_size, stop))
            yield idx, task.collate([dataset[int(i)] for i in idx])
            bar.update(len(idx))


def layer_io(model: nn.Module, task: Task, layers: list[Layer], batch: Any, indices: torch.Tensor, *,
             loss: str = "train", seed: int = 0, stream: int = 0) -> dict[str, LayerIO]:
    """One forward + backward of the per-example ``loss`` summed over the batch; returns per-layer ā, g.

    loss: "train" (true labels), "sampled" (labels drawn from the model, keyed by (seed, stream, index)) or
    "measurement" (the query measurement f).
    """
    device = model_device(model)
    batch = task.to(batch, device)
    with Capture(layers) as cap:
        outputs = task.forward(model, batch)
    if loss == "train":
        per_example = task.train_loss(outputs, batch)
    elif loss == "sampled":
        per_example = task.sampled_loss(outputs, batch, sampling.example_keys(seed, stream, indices))
    elif loss == "measurement":
        per_example = task.measurement(outputs, batch)
    else:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    return cap.gradients(per_example.sum(), task.token_mask(batch), task.batch_size_of(batch))
