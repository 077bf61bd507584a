"""The memory model: exact byte counts from the layer shapes (:class:`_Shapes`: factors, sums, bases, query
store), the model's bytes, the calibration examples, the activations autograd saves for one sequence (measured
with saved-tensor hooks), which layers share an input, and the scan's largest group of fused same-shape
layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from influencer.capture import Capture
from influencer.curvature.linalg import split_sizes
from influencer.layers import Layer
from influencer.passes import model_device
from influencer.tasks import CausalLM, Task


@dataclass
class _Shapes:
    layers: list[Layer]
    shared_a: dict[str, str]  # layer → the layer whose A (and Q_A) it shares
    item: int  # bytes per element of the compute dtype

    def cov(self, blocks: int) -> int:
        """Σ over layers of the A and S block sums (A once per group of layers fed the same input)."""
        total = 0
        for x in self.layers:
            if self.shared_a.get(x.name, x.name) == x.name:
                total += sum(s * s for s in split_sizes(x.width, blocks))
            total += sum(s * s for s in split_sizes(x.d_out, blocks))
        return total * self.item

    def lam(self) -> int:
        return sum(x.d_out * x.width for x in self.layers) * self.item

    def eig(self) -> int:
        return sum(x.width + x.d_out for x in self.layers) * 8

    def largest_block(self, blocks: int) -> int:
        return max(max(split_sizes(x.width, blocks)[0], split_sizes(x.d_out, blocks)[0]) for x in self.layers)

    def store(self, n_queries: int, rank: int | None) -> tuple[int, int]:
        """(bytes of the rank-k query store, bytes if every layer were exact)."""
        low, exact = 0, 0
        for x in self.layers:
            dense = x.d_out * x.width
            exact += dense
            low += dense if rank is None or rank * (x.d_out + x.width) >= dense else rank * (x.d_out + x.width)
        return n_queries * low * self.item, n_queries * exact * self.item


def _model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def _calibration_examples(model: nn.Module, task: Task, data: Any, batch_size: int, seq_len: int) -> list[Any]:
    """``batch_size`` examples (as the task's dataset yields them): from ``data``, or random tokens for an LM."""
    if data is not None:
        dataset = task.as_dataset(data)
        n = len(dataset)  # type: ignore[arg-type]
        return [dataset[i % n] for i in range(batch_size)]
    if not isinstance(task, CausalLM):
        raise ValueError(f"plan needs data= (a few training examples) to calibrate a {task.name} task")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None:
        probe = task.as_dataset(torch.zeros(1, 2, dtype=torch.long))
        with torch.no_grad():
            vocab = task.forward(model, task.to(task.collate([probe[0]]), model_device(model))).shape[-1]
    g = torch.Generator().manual_seed(0)
    dataset = task.as_dataset(torch.randint(0, int(vocab), (batch_size, seq_len), generator=g))
    return [dataset[i] for i in range(batch_size)]


def _saved_activation_bytes(model: nn.Module, task: Task, layers: list[Layer], batch: Any) -> tuple[int, int, int]:
    """(bytes autograd saves for the backward of one batch (deduplicated by storage), bytes of the captured ā
    and g, bytes of the model's outputs)."""
    storages: dict[int, int] = {}
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            s = t.untyped_storage()
            if s.data_ptr() not in weights:  # weights saved for the backward are the model's, not activations
                storages[s.data_ptr()] = s.nbytes()
        except (RuntimeError, NotImplementedError):  # e.g. sparse or meta tensors
            pass
        return t

    device = model_device(model)
    batch = task.to(batch, device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), Capture(layers) as cap:
        outputs = task.forward(model, batch)
        loss = task.train_loss(outputs, batch).sum()
    io = cap.gradients(loss, task.token_mask(batch), task.batch_size_of(batch))
    captured: dict[int, int] = {}
    for x in io.values():
        for t in (x.a, x.g):
            captured[id(t)] = t.numel() * t.element_size()
    return sum(storages.values()), sum(captured.values()), outputs.numel() * 4


def _shared_inputs(model: nn.Module, task: Task, layers: list[Layer], batch: Any) -> dict[str, str]:
    from influencer.passes import layer_io

    io = layer_io(model, task, layers, batch, torch.arange(task.batch_size_of(batch)), loss="train")
    first: dict[int, str] = {}
    return {name: first.setdefault(id(x.a), name) for name, x in io.items()}


def _fused_group(layers: list[Layer], tokens: int, item: int) -> tuple[int, int]:
    """The scan's largest group of same-shape layers when fused: (its size, the bytes of its stacked ā and g
    for ``tokens`` tokens). A single layer is not stacked (0 bytes)."""
    sizes: dict[tuple[int, int], int] = {}
    for x in layers:
        sizes[(x.d_out, x.width)] = sizes.get((x.d_out, x.width), 0) + 1
    (d_out, w), n = max(sizes.items(), key=lambda kv: kv[1] * (kv[0][0] + kv[0][1]))
    return n, (n * tokens * (d_out + w) * item if n > 1 else 0)
