"""Batched forward/backward passes with capture: the loop every stage (fit, scores) shares."""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

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

F = TypeVar("F", bound=Callable[..., Any])
#: the caller's autocast dtype while an entry point runs its math with autocast off (None: no autocast)
_AMP: contextvars.ContextVar[torch.dtype | None] = contextvars.ContextVar("influencer_amp", default=None)


def amp_aware(fn: F) -> F:
    """Let an entry point be called under ``torch.autocast``: forward/backward passes keep the caller's autocast,
    the math on captured activations (covariances, eigenbases, contractions) runs with autocast off, in fp32/fp64.
    The model is the first ``nn.Module`` argument.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        model = next((a for a in args if isinstance(a, nn.Module)), None)
        device = model_device(model).type if model is not None else "cpu"
        if not torch.is_autocast_enabled(device):
            return fn(*args, **kwargs)
        token = _AMP.set(torch.get_autocast_dtype(device))
        try:
            with torch.autocast(device, enabled=False):
                return fn(*args, **kwargs)
        finally:
            _AMP.reset(token)

    return wrapper  # type: ignore[return-value]


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def compute_dtype(model: nn.Module) -> torch.dtype:
    """float64 for float64 models (tests), float32 otherwise (bf16/fp16 models are upcast for the math)."""
    for p in model.parameters():
        return torch.float64 if p.dtype == torch.float64 else torch.float32
    return torch.float32


#: the precisions of the per-sequence math (scan contraction, fit Λ pass): name → dtype (None: the model's)
PRECISIONS: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16}


def work_dtype(precision: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a ``precision`` runs in, beside the compute dtype (``"float32"`` keeps ``dtype``: float64 tests)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision] or dtype


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run with dropout off; restore the previous train/eval mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def batches(
    dataset: Dataset,
    task: Task,
    batch_size: int,
    *,
    desc: str,
    progress: bool = True,
    start: int = 0,
    stop: int | None = None,
) -> Iterator[tuple[torch.Tensor, Any]]:
    """Yield (global indices [B], collated batch) over dataset[start:stop] with a progress bar."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    stop = len(dataset) if stop is None else min(stop, len(dataset))  # type: ignore[arg-type]
    with progress_bar(desc, stop - start, unit="seq", enabled=progress) as bar:
        for lo in range(start, stop, batch_size):
            idx = torch.arange(lo, min(lo + batch_size, stop))
            yield idx, task.collate([dataset[int(i)] for i in idx])
            bar.update(len(idx))


def layer_io(
    model: nn.Module,
    task: Task,
    layers: list[Layer],
    batch: Any,
    indices: torch.Tensor,
    *,
    loss: str = "train",
    seed: int = 0,
    stream: int = 0,
) -> dict[str, LayerIO]:
    """One forward + backward of the per-example ``loss`` summed over the batch; returns per-layer ā, g.

    loss: "train" (true labels), "sampled" (labels drawn from the model, keyed by (seed, stream, index)) or
    "measurement" (the query measurement f).
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    device = model_device(model)
    batch = task.to(batch, device)
    amp = _AMP.get()
    with torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext():
        with Capture(layers) as cap:
            outputs = task.forward(model, batch)
        if loss == "train":
            per_example = task.train_loss(outputs, batch)
        elif loss == "sampled":
            per_example = task.sampled_loss(outputs, batch, sampling.example_keys(seed, stream, indices))
        else:
            per_example = task.measurement(outputs, batch)
        return cap.gradients(per_example.sum(), task.token_mask(batch), task.batch_size_of(batch))
