"""What the numbers of a result mean: per-copy values in nats or a score, and the notes that say so.

Influence / N predicts the change of log p(completion) in nats from one added copy only where the inverse is
close to the exact damped one. The plain block-diagonal estimate's sizes were far off on language models
(docs/VALIDATION.md §9), so per-copy values count as nats only for a refined inverse; the CLI, the report, the
probe and the demo label them accordingly.
"""

from __future__ import annotations

from typing import Any

__all__ = ["calibrated", "cg_steps", "correction_note", "units_note"]


def cg_steps(k: int) -> str:
    """'1 CG step', '3 CG steps'."""
    return f"{k} CG step" + ("" if k == 1 else "s")


def calibrated(described: dict[str, Any] | None) -> bool:
    """Whether influence / N of an inverse (its ``describe()``) may be read as nats of Δ log p per added copy: only
    a refined inverse (≥ 1 CG step on the full Gauss-Newton matrix), whose first step already takes the best
    multiple of the curvature's answer. The plain block-diagonal estimate's sizes are off by orders of magnitude
    on language models (docs/VALIDATION.md §9), so its values are a score."""
    return bool(described) and described.get("inverse") == "refined" and int(described.get("steps", 0)) >= 1  # type: ignore[union-attr]


def correction_note(meta: dict[str, Any]) -> str | None:
    """One line on the leave-one-in correction of a scan's hits (None when it did not run)."""
    sc = meta.get("self_correction")
    if not sc:
        return None
    if "skipped" in sc:
        return f"hits not corrected for their own curvature: {sc['skipped']} (self_correct=True forces it)"
    f = [float(v) for v in sc["factors"].values()]
    span = f" (factors {min(f):.2g}-{max(f):.2g})" if f else ""
    return (
        f"hits rescaled by their own curvature (leave-one-in, re-ranked among {sc['pool']} candidates per list)"
        f"{span}; full scores and totals are not"
    )


def units_note(described: dict[str, Any] | None, n_train: int) -> str:
    """One line on what the per-copy values of a result built on this inverse mean (CLI, report, demo)."""
    if calibrated(described):
        assert described is not None
        return (
            f"per copy = influence / N with N = {n_train}: the predicted change of log p(completion) in nats from "
            f"adding one copy (refined: {cg_steps(described['steps'])} over {described['data_size']} sequences)"
        )
    if described and described.get("strategy") == "identity":
        return f"per copy = influence / N with N = {n_train} is a score (gradient dot products), not nats"
    return (
        f"per copy = influence / N with N = {n_train} is a score, not nats: the plain (unrefined) curvature ranks "
        "well but its sizes were 10-1,600x too large on language models (docs/VALIDATION.md §9); "
        "refine (the default) for values in nats"
    )
