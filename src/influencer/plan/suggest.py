"""Suggestions within a memory budget: the fewest blocks for the fit stages, the largest batch size, the
largest rank and the number of resident queries whose predicted peak fits the budget."""

from __future__ import annotations

from typing import Any

from influencer.curvature.strategies import strategy as strategy_record
from influencer.plan.memory import _Shapes
from influencer.plan.result import Plan, _fmt_bytes


def _suggest(
    p: Plan,
    shapes: _Shapes,
    budget: int,
    blocks: int,
    rank: int | None,
    n_queries: int,
    batch_size: int,
    activations,
    strategy: str,
) -> dict[str, Any]:
    """Settings within ``budget``: fewest blocks for the fit, the largest batch, rank and resident queries."""
    out: dict[str, Any] = {"budget": _fmt_bytes(budget), "fits": p.peak <= budget}

    def fit_peak(o: int, b: int) -> int:
        peak = 0
        for s in p.stages:
            if s.name not in ("covariance", "eigh", "eigenvalues", "diagonal"):
                continue
            parts = dict(s.parts)
            scale = shapes.cov(o) / max(1, shapes.cov(blocks))
            for key in ("A/S sums", "eigenbases"):
                if key in parts:
                    parts[key] = int(parts[key] * scale)
            if "workspace" in parts:
                d = shapes.largest_block(o)
                parts["workspace"] = d * d * (shapes.item + 40)
            if "activations" in parts:
                parts["activations"] = activations(b)
            peak = max(peak, sum(parts.values()))
        return peak

    if strategy_record(strategy).basis:
        limit = min(min(x.width, x.d_out) for x in shapes.layers)
        options = [o for o in (1, 2, 4, 8, 16, 32, 64) if o <= limit]
        good = [o for o in options if fit_peak(o, batch_size) <= budget] or [
            o for o in options if fit_peak(o, 1) <= budget
        ]
        out["blocks"] = good[0] if good else None
        if not good:
            out["blocks_note"] = (
                "no block count fits the fit stages in the budget: track fewer layers per run "
                "(layer-group partitions, fit_partition(layers=...))"
            )
    o = out.get("blocks") or blocks
    batches = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if fit_peak(o, b) <= budget]
    out["batch_size"] = batches[-1] if batches else None
    scan = p.stage("scan")
    others = sum(v for k, v in scan.parts.items() if k not in ("query store", "scorer copies", "token products"))
    per_query_store = shapes.store(1, rank)[0]
    per_query = 2 * per_query_store + 2 * batch_size * int(p.settings["seq_len"]) * (rank or 1) * shapes.item
    out["resident_queries"] = max(0, (budget - others) // max(1, per_query))
    ranks = [
        r
        for r in (8, 16, 32, 64, 128, 256)
        if others
        + n_queries * (2 * shapes.store(1, r)[0] + 2 * batch_size * int(p.settings["seq_len"]) * r * shapes.item)
        <= budget
    ]
    out["rank"] = ranks[-1] if ranks else None
    return out
