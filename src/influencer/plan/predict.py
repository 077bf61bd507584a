"""The plan itself: :func:`plan` predicts the peak memory and the time of each stage of a fit + scan from the
layer shapes, the settings and one measured forward + backward (and, optionally, a short timing calibration),
and suggests settings that fit a memory budget."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from influencer.curvature.fit import stages_of
from influencer.curvature.linalg import split_sizes
from influencer.layers import LayerSpec, select_layers
from influencer.passes import compute_dtype, eval_mode, model_device
from influencer.plan.measure import _rss
from influencer.plan.memory import (
    _calibration_examples,
    _fused_group,
    _model_bytes,
    _saved_activation_bytes,
    _Shapes,
    _shared_inputs,
)
from influencer.plan.result import Plan, Stage
from influencer.plan.suggest import _suggest
from influencer.plan.timing import _calibrate_times
from influencer.scan import DEFAULT_DENSE_BUDGET, contraction_costs
from influencer.scan.contract import _MATERIALIZE_CHUNK_BYTES
from influencer.tasks import CausalLM, Task


def plan(
    model: nn.Module,
    task: Task | None = None,
    layers: LayerSpec = None,
    *,
    strategy: str = "ekfac",
    blocks: int = 1,
    rank: int | None = 32,
    n_queries: int = 16,
    batch_size: int = 8,
    seq_len: int = 512,
    n_train: int = 10_000,
    top_k: int = 10,
    data: Any = None,
    dense_budget: int = DEFAULT_DENSE_BUDGET,
    memory_budget: int | None = None,
    fisher: str = "true",
    runtime: int | None = None,
    calibrate: bool = True,
    fuse_layers: bool | None = None,
) -> Plan:
    """Predict peak memory and time of each stage of a fit + scan with these settings; suggest settings that fit
    ``memory_budget`` bytes.

    Stages: ``covariance`` (the A/S pass), ``eigh`` (eigendecompositions), ``eigenvalues`` (the EK-FAC Λ pass;
    ``diagonal`` for that strategy), ``queries`` (building the rank-k query store) and ``scan`` (the streaming
    pass with the store resident). ``data``: a few training examples for calibration (required for
    non-language-model tasks; for :class:`CausalLM` random tokens of ``seq_len`` are used otherwise).
    ``runtime``: bytes the process holds besides the model (measured now when None: this process's RSS minus
    the model on the CPU; 0 on CUDA). ``calibrate=False`` skips the timing (memory still needs one forward +
    backward of one sequence). ``fuse_layers``: as :func:`influencer.scan` (None: on CUDA), whose stacked copies
    of a group's captured ā, g and its products are counted.
    """
    task = task if task is not None else CausalLM()
    tracked = select_layers(model, layers if layers is not None else task.default_layers(model))
    for x in tracked:
        split_sizes(x.width, blocks)
        split_sizes(x.d_out, blocks)
    device = model_device(model)
    cuda = device.type == "cuda"
    model_bytes = _model_bytes(model)
    dtype = compute_dtype(model)
    item = torch.finfo(dtype).bits // 8
    model_item = next(model.parameters()).element_size()
    one = task.collate(_calibration_examples(model, task, data, 1, seq_len))
    with eval_mode(model):
        saved1, captured1, logits1 = _saved_activation_bytes(model, task, tracked, one)
        shared = _shared_inputs(model, task, tracked, one)
    shapes = _Shapes(tracked, shared, item)
    # measured after one pass, so that memory-mapped weights are resident, as they are once a run starts
    baseline = int(torch.cuda.memory_allocated(device)) if cuda else _rss()
    if runtime is None:
        runtime = 0 if cuda else max(0, baseline - (model_bytes if device.type == "cpu" else 0))

    def activations(b: int, sampled: bool = False) -> int:
        # saved tensors for the backward and the gradients flowing back (about as large at their peak), the
        # captured ā/g (+ a compute-dtype copy when the model is not in it), and for sampled labels the
        # probabilities and their running sum over the vocabulary
        cast = captured1 if model_item != item else 0
        return b * (2 * saved1 + captured1 + cast + (2 * logits1 if sampled else 0))

    sampled = fisher == "true"
    tokens = batch_size * seq_len
    widest = max(x.width for x in tracked)
    outs = max(x.d_out for x in tracked)
    base = {"runtime": runtime, "model": model_bytes}
    cov = shapes.cov(blocks)
    lam = shapes.lam()
    eig = shapes.eig()
    factors_bytes = {"identity": 0, "diagonal": lam, "kfac": cov + lam + eig, "ekfac": cov + lam + eig}[strategy]
    stages: list[Stage] = []
    fit_stages = stages_of(strategy)
    if "covariance" in fit_stages:
        stages.append(
            Stage(
                "covariance",
                {
                    **base,
                    "activations": activations(batch_size, sampled),
                    "A/S sums": cov,
                    "casts": tokens * widest * item,
                },
            )
        )
        d = shapes.largest_block(blocks)
        stages.append(
            Stage(
                "eigh",
                {**base, "A/S sums": cov, "eigenbases": cov, "workspace": d * d * (item + 40)},
                note=f"largest block {d}",
            )
        )
    if "eigenvalues" in fit_stages or "diagonal" in fit_stages:
        name = "eigenvalues" if "eigenvalues" in fit_stages else "diagonal"
        parts = {
            **base,
            "activations": activations(batch_size, sampled),
            "Λ sums": lam,
            "rotations": tokens * (widest + outs) * item,
            "per-sequence gradient": widest * outs * item,
        }
        if name == "eigenvalues":
            parts["eigenbases"] = cov
        stages.append(Stage(name, parts))
    q_batch = min(n_queries, 16)  # QueryStore.build compresses 16 queries at a time
    store_bytes, exact_bytes = shapes.store(n_queries, rank)[0], shapes.store(q_batch, rank)[1]
    largest_layer = max(x.d_out * x.width for x in tracked) * q_batch
    stages.append(
        Stage(
            "queries",
            {
                **base,
                "factors": factors_bytes,
                "activations": activations(q_batch),
                "query gradients": 2 * exact_bytes,
                "rank-k SVD": largest_layer * 8 * 2 if rank is not None else 0,
                "query store": store_bytes,
            },
            note=f"{n_queries} queries",
        )
    )
    dense_extra = 0
    if rank is not None:
        for x in tracked:
            low = rank * (x.d_out + x.width) < x.d_out * x.width
            costs = contraction_costs(n_queries, rank if low else None, seq_len, x.d_out, x.width)
            if costs["materialize"] < costs["tokens"] and low:
                extra = n_queries * x.d_out * x.width * 4
                if dense_extra + extra <= dense_budget:
                    dense_extra += extra
    k_cols = n_queries * (rank if rank is not None else outs)
    fuse = cuda if fuse_layers is None else fuse_layers
    group, stacks = _fused_group(tracked, tokens, item) if fuse else (1, 0)
    stages.append(
        Stage(
            "scan",
            {
                **base,
                "factors": factors_bytes,
                "query store": store_bytes,
                "scorer copies": store_bytes + dense_extra,
                "activations": activations(batch_size),
                "token products": 2 * tokens * k_cols * item * group,
                "fused stacks": stacks,
                "per-sequence gradients": min(_MATERIALIZE_CHUNK_BYTES, batch_size * widest * outs * item * group),
                "top-k state": n_queries * top_k * 5 * (len(tracked) + 2) * 8,
            },
            note=f"store {store_bytes / max(1, shapes.store(n_queries, rank)[1]):.0%} of exact",
        )
    )
    if not cuda:
        # the CPU allocator keeps memory freed by an earlier pass (its activations); a later stage that allocates
        # less of that kind does not reuse all of it, so the process's RSS stays that much higher
        earlier = 0
        for st in stages:
            own = st.parts.get("activations", 0)
            st.parts["retained by the allocator"] = max(0, earlier - own)
            earlier = max(earlier, own)
    calibration: dict[str, float] = {
        "saved_bytes_per_sequence": saved1,
        "captured_bytes_per_sequence": captured1,
        "output_bytes_per_sequence": logits1,
        "baseline": baseline,
    }
    if calibrate:
        examples = _calibration_examples(model, task, data, batch_size, seq_len)
        with eval_mode(model):
            times = _calibrate_times(model, task, tracked, examples, shapes, blocks, rank, n_queries)
        calibration.update(times)
        for s in stages:
            if s.name in ("covariance", "eigenvalues", "diagonal", "scan"):
                s.seconds = times[s.name] * n_train
            elif s.name == "queries":
                s.seconds = times["queries"] * n_queries
            elif s.name == "eigh":
                s.seconds = times["eigh_per_d3"] * sum(
                    sum(b**3 for b in split_sizes(x.width, blocks)) * (shared.get(x.name, x.name) == x.name)
                    + sum(b**3 for b in split_sizes(x.d_out, blocks))
                    for x in tracked
                )
    settings = {
        "strategy": strategy,
        "layers": len(tracked),
        "blocks": blocks,
        "rank": rank,
        "n_queries": n_queries,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "n_train": n_train,
    }
    result = Plan(settings, stages, str(device), "device memory" if cuda else "peak RSS", calibration=calibration)
    if memory_budget is not None:
        result.suggestions = _suggest(
            result,
            shapes,
            memory_budget,
            blocks,
            rank,
            n_queries,
            batch_size,
            lambda b: activations(b, sampled),
            strategy,
        )
    return result
