"""What is measured: training loss, sampled-label loss (true Fisher), measurement and token masks.

A :class:`Task` turns user data into batches, runs the model and computes, per example:

- ``train_loss``     L(z) = −log p(y | x) summed over the example's targets (a sum, never a mean);
- ``sampled_loss``   the same loss with labels drawn from the model (for the true Fisher);
- ``measurement``    f = log p(query outcome) — positive influence means "more likely".

Built-ins: :class:`Regression` (Gaussian, unit variance), :class:`Classification` (softmax cross-entropy) and
:class:`CausalLM` (next-token prediction; queries score the completion given the prompt).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from influencer import sampling

Batch = Any


class ListDataset(Dataset):
    """A map-style dataset over an indexable of examples, optionally transformed lazily."""

    def __init__(self, items: Sequence[Any] | Dataset, transform: Callable[[Any], Any] | None = None):
        self.items = items
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        item = self.items[i]
        return self.transform(item) if self.transform is not None else item


def take_rows(data: Any, indices: Sequence[int] | torch.Tensor) -> Any:
    """Rows ``indices`` of user data (a tensor, a dict of per-row tensors/lists with optional scalars, a tuple
    (X, Y), a list or a Dataset), in the same form: a sample of training data that keeps every field."""
    idx = torch.as_tensor(indices, dtype=torch.long)
    if isinstance(data, torch.Tensor):
        return data[idx]
    if isinstance(data, list):
        return [data[int(i)] for i in idx]
    if isinstance(data, dict):
        scalar = lambda v: isinstance(v, int) or (isinstance(v, torch.Tensor) and v.ndim == 0)  # noqa: E731
        return {k: v if scalar(v) else take_rows(v, idx) for k, v in data.items()}
    if isinstance(data, tuple):
        return tuple(take_rows(x, idx) for x in data)
    if isinstance(data, Dataset):
        return torch.utils.data.Subset(data, idx.tolist())
    raise TypeError(f"cannot take rows of data of type {type(data).__name__}")


def _unwrap_logits(out: Any) -> torch.Tensor:
    """Model outputs → a tensor (accepts HF ModelOutput with .logits, tuples, tensors)."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot read model output of type {type(out).__name__}: return a tensor or an object with .logits")


class Task:
    """Interface every task implements. Subclass it to measure something else (override ``measurement``)."""

    #: data format names for error messages
    name = "task"

    def as_dataset(self, data: Any, *, queries: bool = False) -> Dataset:
        """User data → a map-style Dataset of single examples."""
        raise NotImplementedError

    def collate(self, examples: list[Any]) -> Batch:
        """A list of examples → one batch."""
        raise NotImplementedError

    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Run the model; returns the outputs the losses read."""
        raise NotImplementedError

    def log_likelihood(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        """log p(targets | inputs) per example, summed over the example's targets: [B]."""
        raise NotImplementedError

    def sampled_loss(self, outputs: torch.Tensor, batch: Batch, keys: torch.Tensor) -> torch.Tensor:
        """−log p(ŷ | x) with ŷ drawn from the model; ``keys`` [B] seed each example's draws. Returns [B]."""
        raise NotImplementedError

    def token_mask(self, batch: Batch) -> torch.Tensor | None:
        """Which positions are real tokens, [B, T] (None: one position per example, all real)."""
        return None

    def batch_size_of(self, batch: Batch) -> int:
        raise NotImplementedError

    def to(self, batch: Batch, device: torch.device) -> Batch:
        return _to_device(batch, device)

    # Derived quantities -------------------------------------------------------------------------------
    def train_loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        """L(z) = −log p(y | x), summed over targets: [B]."""
        return -self.log_likelihood(outputs, batch)

    def measurement(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        """f(θ) for each query: log p(outcome | input) by default: [B]."""
        return self.log_likelihood(outputs, batch)

    def default_layers(self, model: nn.Module) -> str:
        """Layer preset used when the user names none."""
        return "all"


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half/bfloat16 → float32 for losses; float32/float64 unchanged."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_to_device(v, device) for v in x)
    return x


# --------------------------------------------------------------------------------------------------------
# Supervised tasks: data is (X, Y) tensors or a Dataset of (x, y)
# --------------------------------------------------------------------------------------------------------


class _Supervised(Task):
    def as_dataset(self, data: Any, *, queries: bool = False) -> Dataset:
        if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
            x, y = data
            if len(x) != len(y):
                raise ValueError(f"{self.name}: X has {len(x)} rows but Y has {len(y)}; pass (X, Y) of equal length")
            return ListDataset(_PairRows(x, y))
        if isinstance(data, Dataset):
            return data
        raise TypeError(
            f"{self.name}: pass a pair of tensors (X, Y) or a torch Dataset of (x, y), not {type(data).__name__}"
        )

    def collate(self, examples: list[Any]) -> Batch:
        xs, ys = zip(*examples, strict=True)
        return torch.stack([torch.as_tensor(x) for x in xs]), torch.stack([torch.as_tensor(y) for y in ys])

    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return _unwrap_logits(model(batch[0]))

    def batch_size_of(self, batch: Batch) -> int:
        return len(batch[0])


@dataclass
class _PairRows:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


class Regression(_Supervised):
    """Gaussian likelihood with unit variance: L = ½‖y − ŷ‖² per example; f = −½‖y_q − ŷ_q‖².

    The model maps x [B, ...] to outputs [B, D] (or [B]); targets have the same shape.
    """

    name = "Regression"

    def log_likelihood(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        y = batch[1].to(outputs.dtype).reshape(outputs.shape)
        return -0.5 * (y - outputs).pow(2).reshape(len(outputs), -1).sum(1)

    def sampled_loss(self, outputs: torch.Tensor, batch: Batch, keys: torch.Tensor) -> torch.Tensor:
        flat = outputs.reshape(len(outputs), -1)
        noise = sampling.normal(keys, flat.shape[1]).to(flat.device, flat.dtype)
        y_hat = (flat + noise).detach()
        return 0.5 * (y_hat - flat).pow(2).sum(1)


class Classification(_Supervised):
    """Softmax cross-entropy: L = −log p(y | x); f = log p(y_q | x_q). Outputs are logits [B, C]."""

    name = "Classification"

    def log_likelihood(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        y = batch[1].to(device=outputs.device, dtype=torch.long).reshape(-1)
        return -F.cross_entropy(outputs, y, reduction="none")

    def sampled_loss(self, outputs: torch.Tensor, batch: Batch, keys: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            probs = torch.softmax(_upcast(outputs), -1)
            u = sampling.uniform(keys, 1)[:, 0].to(probs.device)
            y_hat = sampling.categorical(probs, u)
        return F.cross_entropy(outputs, y_hat, reduction="none")


# --------------------------------------------------------------------------------------------------------
# Causal language modelling
# --------------------------------------------------------------------------------------------------------


class CausalLM(Task):
    """Next-token prediction for causal LMs (Hugging Face or any module mapping ids [B, T] → logits [B, T, V]).

    Every example is a token sequence with a *target mask*: the positions whose token is predicted and counted.

    - Training data: all real tokens after the first are targets, so L(z) = Σ_t −log p(z_t | z_<t).
    - Queries: the completion tokens are the targets, so f = log p(completion | prompt).

    Accepted formats (ids are int tensors; rows are right-padded; ``attention_mask`` 1 = real token):

    - a tensor ``[N, T]`` of ids (no padding) — training data only;
    - a dict with ``input_ids`` [N, T] (tensor or list of lists), optional ``attention_mask`` [N, T],
      optional ``loss_mask`` [N, T] (training: 1 = count this token as a target), and for queries either
      ``prompt_length`` (int or [Q]: the completion starts at that position) or ``completion_mask`` [Q, T];
    - a Dataset / list of such dicts with 1-D entries (variable lengths are padded per batch).
    """

    name = "CausalLM"

    def __init__(self, pad_token_id: int = 0):
        self.pad_token_id = pad_token_id

    # data -------------------------------------------------------------------------------------------
    def as_dataset(self, data: Any, *, queries: bool = False) -> Dataset:
        if isinstance(data, torch.Tensor):
            data = {"input_ids": data}
        if isinstance(data, dict):
            return ListDataset(_DictRows(data), lambda ex: self._example(ex, queries))
        if isinstance(data, (Dataset, list, tuple)):
            return ListDataset(data, lambda ex: self._example(ex, queries))
        raise TypeError(
            f"CausalLM: unsupported data of type {type(data).__name__}; pass a token-id tensor "
            "[N, T], a dict with 'input_ids' (and 'prompt_length' for queries), or a Dataset of dicts"
        )

    def _example(self, ex: Any, queries: bool) -> dict[str, torch.Tensor]:
        if isinstance(ex, torch.Tensor):
            ex = {"input_ids": ex}
        if not isinstance(ex, dict) or "input_ids" not in ex:
            raise TypeError("CausalLM: each example must be a dict with 'input_ids'")
        ids = torch.as_tensor(ex["input_ids"], dtype=torch.long).reshape(-1)
        mask = ex.get("attention_mask")
        length = len(ids)
        if mask is not None:
            mask = torch.as_tensor(mask).reshape(-1).bool()
            length = int(mask.sum())
            if not bool(mask[:length].all()):
                raise ValueError(
                    "CausalLM: attention_mask is not right-padded (real tokens first, padding last); "
                    "re-tokenize with padding_side='right'"
                )
        ids = ids[:length]
        if length == 0:
            raise ValueError("CausalLM: an example has no tokens")
        positions = torch.arange(length)
        if queries:
            if "completion_mask" in ex:
                target = torch.as_tensor(ex["completion_mask"]).reshape(-1)[:length].bool().clone()
            elif "prompt_length" in ex:
                target = positions >= int(ex["prompt_length"])
            else:
                raise ValueError(
                    "CausalLM queries need 'prompt_length' (int or [Q]) or 'completion_mask' [Q, T] "
                    "to mark the completion tokens"
                )
            target[0] = False  # the first token has no context to be predicted from
            if not bool(target.any()):
                raise ValueError("CausalLM: a query has an empty completion (no target tokens after the prompt)")
        else:
            target = positions >= 1
            if "loss_mask" in ex:
                target &= torch.as_tensor(ex["loss_mask"]).reshape(-1)[:length].bool()
        return {"input_ids": ids, "target_mask": target}

    def collate(self, examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        t_max = max(len(ex["input_ids"]) for ex in examples)
        b = len(examples)
        ids = torch.full((b, t_max), self.pad_token_id, dtype=torch.long)
        attn = torch.zeros((b, t_max), dtype=torch.long)
        target = torch.zeros((b, t_max), dtype=torch.bool)
        for i, ex in enumerate(examples):
            n = len(ex["input_ids"])
            ids[i, :n] = ex["input_ids"]
            attn[i, :n] = 1
            target[i, :n] = ex["target_mask"]
        return {"input_ids": ids, "attention_mask": attn, "target_mask": target}

    def batch_size_of(self, batch: Batch) -> int:
        return len(batch["input_ids"])

    def token_mask(self, batch: Batch) -> torch.Tensor:
        return batch["attention_mask"].bool()

    # model ------------------------------------------------------------------------------------------
    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        if hasattr(model, "config") and hasattr(model, "get_output_embeddings"):  # Hugging Face
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        else:
            out = model(batch["input_ids"])
        return _unwrap_logits(out)

    def log_likelihood(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        logits = outputs[:, :-1]
        targets = batch["input_ids"][:, 1:].to(logits.device)
        mask = batch["target_mask"][:, 1:].to(logits.device)
        nll = F.cross_entropy(_upcast(logits.flatten(0, 1)), targets.flatten(), reduction="none")
        return -(nll.view_as(targets) * mask).sum(1).to(outputs.dtype)

    def sampled_loss(self, outputs: torch.Tensor, batch: Batch, keys: torch.Tensor) -> torch.Tensor:
        logits = outputs[:, :-1]
        mask = batch["target_mask"][:, 1:].to(logits.device)
        with torch.no_grad():
            probs = torch.softmax(_upcast(logits), -1)
            u = sampling.uniform(keys, logits.shape[1]).to(probs.device)
            y_hat = sampling.categorical(probs, u)
        nll = F.cross_entropy(_upcast(logits.flatten(0, 1)), y_hat.flatten(), reduction="none")
        return (nll.view_as(y_hat) * mask).sum(1).to(outputs.dtype)

    def default_layers(self, model: nn.Module) -> str:
        return "mlp" if hasattr(model, "config") else "all"


class _DictRows:
    """Row view of a dict of row-aligned tensors/lists (scalars broadcast); rows are built on access, so a
    large corpus costs no per-row Python objects."""

    def __init__(self, data: dict[str, Any]):
        if "input_ids" not in data:
            raise ValueError(f"CausalLM: dict data needs 'input_ids' (got keys {sorted(data)})")
        self.n = len(data["input_ids"])
        self.scalars: dict[str, int] = {}
        self.columns: dict[str, Any] = {}
        for key, value in data.items():
            if isinstance(value, int) or (isinstance(value, torch.Tensor) and value.ndim == 0):
                self.scalars[key] = int(value)
            elif len(value) != self.n:
                raise ValueError(f"CausalLM: '{key}' has {len(value)} rows but 'input_ids' has {self.n}")
            else:
                self.columns[key] = value

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.scalars, **{k: v[i] for k, v in self.columns.items()}}
