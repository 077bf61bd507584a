"""Which completion token drives a query's score: the split of the measurement and of each hit's influence over
the completion tokens of a causal-LM query.

The measurement is a sum over completion tokens, f = Σ_c log p(y_c | y_<c), and influence is linear in the
measurement gradient, so I(q, z) = Σ_c I_c(q, z) with I_c = −∇ log p(y_c | y_<c)ᵀ (G + λ)⁻¹ ∇L(z). A trailing
token that the model finds hard (the "." of " Paris.") can dominate ∇f and hence every hit: the split shows it.
For a refined inverse the parts are solved as one linear map (:meth:`RefinedInverse.solve_parts`), so they sum
to the total exactly. The split uses exact (not rank-k) query gradients; its sum is the hit's exact influence,
which the scan's rank-k score approximates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from influencer.curvature.core import Inverse
from influencer.curvature.linalg import per_example_grads
from influencer.passes import amp_aware, compute_dtype, eval_mode, layer_io
from influencer.queries import measurement_gradients
from influencer.tasks import CausalLM, Task

__all__ = ["CompletionSplit", "completion_split"]


@dataclass
class CompletionSplit:
    """One query's completion split.

    positions: the predicted positions t of the completion tokens (token ids ``tokens``); logp [C]: log p of each
    (Σ = f); hits: training index → [C] influence of that sequence through each completion token (Σ = its exact
    influence).
    """

    query: int
    positions: list[int]
    tokens: list[int]
    logp: torch.Tensor
    hits: dict[int, torch.Tensor]
    texts: list[str] | None = None  # the tokens as text (set by a caller that holds the tokenizer)

    def shares(self, index: int) -> torch.Tensor:
        """Each completion token's share of a hit's influence (signed, Σ = 1): [C]."""
        parts = self.hits[index]
        total = float(parts.sum())
        return parts / total if total != 0 else torch.zeros_like(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "positions": self.positions,
            "tokens": self.tokens,
            "logp": self.logp.tolist(),
            "hits": {str(i): v.tolist() for i, v in self.hits.items()},
            "texts": self.texts,
        }

    @classmethod
    def from_json(cls, query: int, data: dict[str, Any]) -> CompletionSplit:
        return cls(
            query,
            list(data["positions"]),
            list(data["tokens"]),
            torch.tensor(data["logp"], dtype=torch.float64),
            {int(i): torch.tensor(v, dtype=torch.float64) for i, v in data["hits"].items()},
            data.get("texts"),
        )


@amp_aware
def completion_split(
    model: nn.Module,
    task: Task,
    inverse: Inverse,
    queries: Any,
    train: Any,
    hits: dict[int, list[int]],
    *,
    batch_size: int = 16,
) -> list[CompletionSplit]:
    """Split each query's log p and the influence of its ``hits`` (query → training indices) over its completion
    tokens. queries/train: as given to the scan (CausalLM data); inverse: the one the scan's queries used."""
    if not isinstance(task, CausalLM):
        raise TypeError("the completion split is defined for causal-LM queries (task CausalLM)")
    layers = inverse.curvature.bind(model)
    qset = task.as_dataset(queries, queries=True)
    dataset = task.as_dataset(train)
    dtype = compute_dtype(model)
    out = []
    with eval_mode(model):
        for q in sorted(hits):
            ex = qset[q]
            ids, target = ex["input_ids"], ex["target_mask"]
            positions = [int(t) for t in target.nonzero().flatten()]
            one = task.collate([ex])
            with torch.no_grad():
                logits = task.forward(model, task.to(one, next(model.parameters()).device))
                logp = torch.log_softmax(logits[0, :-1].to(torch.float64), -1)
                per_token = torch.stack([logp[t - 1, ids[t]] for t in positions]).cpu()
            parts = [{"input_ids": ids, "completion_mask": torch.arange(len(ids)) == t} for t in positions]
            total = measurement_gradients(model, task, layers, [{"input_ids": ids, "completion_mask": target}])
            part_grads = measurement_gradients(model, task, layers, parts, batch_size=batch_size)
            if hasattr(inverse, "solve_parts"):
                solved = inverse.solve_parts(total, part_grads)  # type: ignore[attr-defined]
            else:  # a linear inverse (the block-diagonal curvature): parts solve on their own
                solved = inverse.solve(part_grads)
            precond = {name: -x.to(dtype) for name, x in solved.items()}
            wanted = torch.tensor(sorted(set(hits[q])), dtype=torch.long)
            found: dict[int, torch.Tensor] = {}
            for lo in range(0, len(wanted), batch_size):
                idx = wanted[lo : lo + batch_size]
                batch = task.collate([dataset[int(i)] for i in idx])
                io = layer_io(model, task, layers, batch, idx, loss="train")
                contrib = torch.zeros(len(positions), len(idx), dtype=torch.float64)
                for layer in layers:
                    x = io[layer.name]
                    grads = per_example_grads(x.a.to(dtype), x.g.to(dtype))  # [B, d_out, w]
                    contrib += (precond[layer.name].flatten(1) @ grads.flatten(1).T).to(torch.float64).cpu()
                for j, i in enumerate(idx.tolist()):
                    found[i] = contrib[:, j].clone()
            out.append(CompletionSplit(q, positions, [int(ids[t]) for t in positions], per_token, found))
    return out
