"""Fitting passes: covariances A and S per token, eigenbases in float64, Λ per sequence.

Pass costs (B sequences of T tokens, a layer [d_out, w]): the covariance pass adds T·(w² + d_out²) per
sequence to a forward+backward; the EK-FAC Λ pass rotates tokens into the eigenbasis (or forms the per-sequence
gradient and rotates it, whichever is cheaper) and squares. Neither pass computes parameter gradients.

A fit is a sequence of *stages* (``covariance`` → eigendecomposition, then ``eigenvalues`` for EK-FAC; one
``diagonal`` stage for the diagonal strategy). Each stage only adds up per-token or per-sequence sums, so it
splits over data freely: labels are sampled by a pure function of (seed, stage, example index, position), so
every split draws the same labels, and the sums are additive.

- **Distributed** (inside a torch.distributed process group): each rank accumulates a contiguous share of the
  sequences, the sums and counts are all-reduced, and the eigendecompositions are spread over the ranks and
  broadcast. Every rank returns the same :class:`Curvature`.
- **Resumable** (``out_dir``): the running sums are checkpointed atomically every ``checkpoint_every``
  sequences and every finished stage is saved; the same call after an interruption (even SIGKILL) continues.
- **Partitions**: :func:`fit_partition` runs one stage over a data range and/or a layer group and saves the raw
  sums and counts; :func:`merge_fit` adds partitions up and finishes the stage (equal to one fit, up to float
  summation order).
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Any

from torch import nn

from influencer import distributed as dist
from influencer.curvature.checkpoint import _Checkpoint, _clear_partials
from influencer.curvature.core import (
    FISHERS,
    Curvature,
    LayerFactors,
    resolve_damping,
)
from influencer.curvature.fingerprint import model_fingerprint
from influencer.curvature.linalg import (
    split_sizes,
)
from influencer.curvature.strategies import strategy as strategy_record
from influencer.curvature.sums import (  # noqa: F401  (the stage constants and sums, as before the split)
    _STREAM_COVARIANCE,
    _STREAM_DIAGONAL,
    _STREAM_LAMBDA,
    STAGES,
    _finish_stage,
    _Fit,
    _Run,
    _Sums,
)
from influencer.layers import LayerSpec, select_layers
from influencer.ledger import Ledger, examples_digest
from influencer.passes import amp_aware, eval_mode
from influencer.tasks import Task

_FIT = "fit.json"
DEFAULT_CHECKPOINT_EVERY = 1024


def stages_of(strategy: str) -> tuple[str, ...]:
    """The fitting stages of a strategy, in order."""
    return strategy_record(strategy).stages


def _check_options(strategy: str, fisher: str, damping_factor: float = 0.1) -> None:
    strategy_record(strategy)  # a ValueError naming the choices for an unknown one
    if fisher not in FISHERS:
        raise ValueError(f"fisher must be one of {FISHERS}, got {fisher!r}")
    if not (math.isfinite(damping_factor) and damping_factor > 0):
        raise ValueError(f"damping_factor must be finite and > 0, got {damping_factor}")


@amp_aware
def fit_curvature(
    model: nn.Module,
    task: Task,
    train: Any,
    *,
    strategy: str = "ekfac",
    fisher: str = "true",
    damping: float | None = None,
    damping_factor: float = 0.1,
    layers: LayerSpec = None,
    blocks: int = 1,
    batch_size: int = 64,
    n_train: int | None = None,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    progress: bool = True,
    precision: str = "float32",
) -> Curvature:
    """Fit the damped block-diagonal curvature of the tracked layers on ``train``.

    strategy: "ekfac" (default), "kfac", "diagonal" or "identity".
    fisher: "true" (labels sampled from the model, the default) or "empirical" (the data's labels).
    damping: None → ``damping_factor`` × mean(Λ_l) per layer (paper §5), or one absolute value.
    layers: a preset ("mlp", "attention", "all"), names, a regex or a predicate; None → the task's default
        ("mlp" for Hugging Face causal LMs, "all" otherwise).
    blocks: split A and S into this many equal diagonal blocks (paper App. A); memory ÷ blocks.
    n_train: training-set size N for per-copy units (default: the number of fitting sequences).
    seed: seeds the sampled labels; results do not depend on batch size, padding or sharding.
    precision: of the per-sequence pass (EK-FAC Λ, diagonal): "float32" (default), or "bfloat16" — the rotation
        of captured activations and gradients into the eigenbases and the per-sequence products run in bf16 with
        float32 sums (≈ 4× faster matmuls on CPUs with AVX512-BF16/AMX and on GPUs). Measured on SmolLM2: Λ
        within 5e-4 of Λ + λ on average, 11 % at the worst entry (``benchmarks/bench_fit.py``); scores within 1 %
        (``tests/test_precision.py``). Covariances and eigendecompositions always run in float32/float64.
    out_dir: make the fit resumable: running sums are checkpointed every ``checkpoint_every`` sequences (per
        rank) and finished stages are saved (``basis/``, ``curvature/``); calling again continues. A lock file
        stops a second process from using the same directory.

    Inside a torch.distributed process group every rank fits its share of the sequences and returns the same
    result (see :mod:`influencer.distributed`).
    """
    _check_options(strategy, fisher, damping_factor)
    tracked = select_layers(model, layers if layers is not None else task.default_layers(model))
    dataset = task.as_dataset(train)
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("the training data is empty")
    for layer in tracked:
        split_sizes(layer.width, blocks)
        split_sizes(layer.d_out, blocks)
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be ≥ 1, got {checkpoint_every}")
    loss = "sampled" if fisher == "true" else "train"
    fit = _Fit(model, task, tracked, dataset, batch_size, loss, seed, progress, blocks, precision)
    fingerprint = model_fingerprint(tracked)
    out = Path(out_dir) if out_dir is not None else None

    def finish(curv: Curvature) -> Curvature:
        curved = strategy_record(strategy).curved
        curv = curv.with_damping(damping, damping_factor) if curved and curv.complete else curv
        curv.n_train = n if n_train is None else int(n_train)
        return curv

    def build(factors: dict[str, LayerFactors]) -> Curvature:
        for f in factors.values():
            done = f.lam is not None or not strategy_record(strategy).curved
            f.damping = resolve_damping(strategy, f.lam, damping, damping_factor) if done else 0.0
        return Curvature(
            strategy=strategy,
            fisher=fisher,
            blocks=blocks,
            n_fit=n,
            n_train=n,
            damping=damping,
            damping_factor=damping_factor,
            layers=factors,
            fingerprint=fingerprint,
            seed=seed,
            precision=precision,
        )

    factors = {x.name: LayerFactors(x.name, x.kind, x.d_out, x.d_in, x.bias) for x in tracked}
    stages = stages_of(strategy)
    if out is None:
        with eval_mode(model):
            for stage in stages:
                sums = fit.accumulate(stage, 0, n, bases=factors)
                _finish_stage(stage, sums, factors, strategy, fit.dtype, progress)
        return finish(build(factors))

    config = {
        "strategy": strategy,
        "fisher": fisher,
        "blocks": blocks,
        "seed": seed,
        "n": n,
        "layers": [x.name for x in tracked],
        "fingerprint": fingerprint["digest"],
        "data": examples_digest(task, train, queries=False),  # the same n sequences, not just as many
        "dtype": str(fit.dtype),
        "checkpoint_every": checkpoint_every,
    }
    if precision != "float32":  # absent = float32 (fit.json written before the option agrees)
        config["precision"] = precision
    with dist.locked(out, purpose="fit"):
        done = dist.run_collectively(lambda: _ledger(out, config).open())
        done = dist.broadcast_object(done)
        if "curvature" in done:
            return finish(Curvature.load(out / "curvature"))
        with eval_mode(model):
            for i, stage in enumerate(stages):
                last = i == len(stages) - 1
                if stage in done and not last:
                    factors = dict(Curvature.load(out / "basis").layers)
                    continue
                ckpt = _Checkpoint(out / "partial", stage, {**config, "stage": stage}, checkpoint_every)
                sums = fit.accumulate(stage, 0, n, bases=factors, checkpoint=ckpt)
                _finish_stage(stage, sums, factors, strategy, fit.dtype, progress)
                target = "curvature" if last else "basis"
                curv = build(factors)
                done.append(stage)
                if last:
                    done.append("curvature")
                dist.run_collectively(functools.partial(_commit_stage, out, target, curv, config, list(done)))
                ckpt.clear()
        if not stages:
            dist.run_collectively(
                functools.partial(_commit_stage, out, "curvature", build(factors), config, ["curvature"])
            )
        _clear_partials(out / "partial")
        return finish(build(factors))


def _ledger(out: Path, config: dict[str, Any]) -> Ledger:
    """``fit.json``: the fit's settings and its finished stages (the commit point of each)."""
    return Ledger(out / _FIT, "fit", config, format="influencer.fit", version=1)


def _commit_stage(out: Path, target: str, curv: Curvature, config: dict[str, Any], done: list[str]) -> None:
    """Save a finished stage's result, then record it in ``fit.json`` (the commit point)."""
    curv.save(out / target)
    _ledger(out, config).mark(done)
