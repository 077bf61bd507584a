"""What the numbers of a result mean: per-copy values in nats or a score, and the notes that say so.

Influence / N predicts the change of log p(completion) in nats from one added copy only where the inverse is
close to the exact damped one *including the training sequence's own curvature*. On the fine-tuned SmolLM2 of
docs/VALIDATION.md §9 the plain block-diagonal estimate overstated a planted fact's effect ~570×, a refinement
over a sample that misses the fact ~330×, and the refined hits corrected for their own curvature (leave-one-in,
:mod:`influencer.self_curvature`) came within a few × of the PBRF. So per-copy values count as nats only for the
corrected hits of a refined scan; everything else is a score, and the CLI, the report, the probe and the demo
label it so.
"""

from __future__ import annotations

from typing import Any

__all__ = ["calibrated", "cg_steps", "correction_note", "units_note"]


def cg_steps(k: int) -> str:
    """'1 CG step', '3 CG steps'."""
    return f"{k} CG step" + ("" if k == 1 else "s")


def calibrated(described: dict[str, Any] | None, correction: dict[str, Any] | None = None) -> bool:
    """Whether a hit's influence / N may be read as nats of Δ log p per added copy: the inverse (its
    ``describe()``) is refined (≥ 1 CG step on the full Gauss-Newton matrix) *and* the hits were corrected for
    their own curvature (``correction``: a scan's ``meta["self_correction"]`` with its factors). Without the
    correction a sequence that alone teaches something is overstated by orders of magnitude (docs/VALIDATION.md
    §9), so uncorrected values — full score matrices, plain curvature, a skipped correction — are a score."""
    refined = bool(described) and described.get("inverse") == "refined" and int(described.get("steps", 0)) >= 1  # type: ignore[union-attr]
    return refined and bool(correction) and "factors" in correction  # type: ignore[operator]


def correction_note(meta: dict[str, Any]) -> str | None:
    """One line on the leave-one-in correction of a scan's hits (None when it did not run)."""
    sc = meta.get("self_correction")
    if not sc:
        return None
    if "skipped" in sc:
        return f"hits not corrected for their own curvature: {sc['skipped']} (self_correct=True forces it)"
    f = [float(v) for v in sc["factors"].values()]
    span = f" (factors {min(f):.2g}-{max(f):.2g})" if f else ""
    lists = sc.get("lists", "all")
    which = "" if lists == "all" else " of the top and bottom lists (the layer-band lists are not: budget)"
    return (
        f"hits{which} rescaled by their own curvature (leave-one-in, re-ranked among {sc['pool']} candidates per "
        f"list){span}; full scores and totals are not"
    )


def units_note(described: dict[str, Any] | None, n_train: int, correction: dict[str, Any] | None = None) -> str:
    """One line on what the per-copy values of a result built on this inverse mean (CLI, report, demo)."""
    if calibrated(described, correction):
        assert described is not None
        return (
            f"per copy = influence / N with N = {n_train}: the predicted change of log p(completion) in nats from "
            f"adding one copy (refined: {cg_steps(described['steps'])} over {described['data_size']} sequences; "
            "hits corrected for their own curvature)"
        )
    if described and described.get("strategy") == "identity":
        return f"per copy = influence / N with N = {n_train} is a score (gradient dot products), not nats"
    if described and described.get("inverse") == "refined":
        return (
            f"per copy = influence / N with N = {n_train} is a score, not nats: the hits were not corrected for "
            "their own curvature, which a sequence that alone teaches something needs (docs/VALIDATION.md §9)"
        )
    return (
        f"per copy = influence / N with N = {n_train} is a score, not nats: the plain (unrefined) curvature ranks "
        "well but its sizes were 10-1,600x too large on language models (docs/VALIDATION.md §9); "
        "the default (refined, hits corrected) gives values in nats"
    )
