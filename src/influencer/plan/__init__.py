"""Plan a run before starting it: predicted peak memory and time per stage, and settings that fit a budget.

Memory comes from the layer shapes and the settings (exact byte counts of every factor, sum, basis and query
the engine holds) plus two measured quantities: the process's resident memory before the run (the runtime and
the model) and the activations one forward + backward of one sequence keeps for the backward pass (counted with
autograd's saved-tensor hooks on a calibration batch). Time comes from a short calibration run of each pass on
the same device (a few batches), scaled by the number of sequences, and from timing one eigendecomposition,
scaled by d³.

    p = influencer.plan.plan(model, task, layers="mlp", n_train=100_000, n_queries=64, memory_budget=16 * 2**30)
    print(p.report())          # per stage: peak memory, breakdown, time
    p.suggestions              # blocks / rank / batch size / resident queries within the budget

On the CPU memory means the process's peak resident set (RSS); on CUDA it means device memory (the CUDA context
and allocator slack excluded). The model and the runtime are counted once, in every stage.

Modules: ``result`` (:class:`Plan`, :class:`Stage`), ``memory`` (byte counts and the measured activations),
``timing`` (the calibration run), ``suggest`` (settings within a budget), ``measure`` (RSS now and at its peak)
and ``predict`` (:func:`plan`); the public names are importable from ``influencer.plan``.
"""

from __future__ import annotations

from influencer.plan.measure import _rss as _rss  # the guard and scripts/plan_check.py read RSS with it
from influencer.plan.measure import measure_peak_rss
from influencer.plan.predict import plan
from influencer.plan.result import Plan, Stage

__all__ = ["Plan", "Stage", "measure_peak_rss", "plan"]
