"""Results of the PBRF experiment: :class:`MethodResult` (one method's scores, correlations with the PBRF and wall
time) and :class:`ExperimentResult` (the ground truth and every method) with its markdown table, the Fig. 6/7-style
figure, and ``save`` / ``load`` of ``result.json`` + ``scores.safetensors`` + ``table.md``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from influencer.io import atomic_save_tensors, atomic_write_json, atomic_write_text, load_tensors, read_json
from influencer.validate.methods import _LABELS
from influencer.validate.outputs import _jsonable, _save_figure
from influencer.validate.stats import mean_std

__all__ = ["ExperimentResult", "MethodResult"]


@dataclass
class MethodResult:
    """Scores [Q, M] of one method for the experiment's measurements × training points, with its wall time."""

    name: str
    scores: Tensor
    seconds: float
    pearson: list[float]
    spearman: list[float]
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return _LABELS.get(self.name, self.name)

    def summary(self) -> dict[str, float]:
        p, ps = mean_std(self.pearson)
        s, ss = mean_std(self.spearman)
        return {"pearson": p, "pearson_std": ps, "spearman": s, "spearman_std": ss, "seconds": self.seconds}


@dataclass
class ExperimentResult:
    """Outcome of :func:`run_experiment`: PBRF ground truth, each method's scores, correlations and times."""

    setup: str
    settings: dict[str, Any]
    setup_info: dict[str, Any]
    query_indices: Tensor
    train_indices: Tensor
    pbrf: Tensor
    pbrf_seconds: float
    pbrf_stats: dict[str, Any]
    methods: dict[str, MethodResult]

    # --- reporting -----------------------------------------------------------------------------------
    def table(self) -> list[dict[str, Any]]:
        """One row per method: label, mean ± sd Pearson/Spearman against the PBRF, seconds, speed ratio."""
        ref = self.methods.get("ekfac")
        rows = []
        for m in self.methods.values():
            row = {"method": m.label, **m.summary()}
            row["time_vs_ekfac"] = m.seconds / ref.seconds if ref is not None and ref.seconds > 0 else math.nan
            rows.append(row)
        return rows

    def to_markdown(self) -> str:
        q, m = self.pbrf.shape
        st = self.settings
        lines = [
            f"**{self.setup}** — {q} measurements × {m} training points; damping λ = {st['damping']:.4g}"
            f" ({st['damping_note']}); ε = {st['epsilon']:.4g}; {st['threads']} thread(s).",
            "",
            "| method | Pearson vs PBRF | Spearman vs PBRF | time for all measurements (s) | × EK-FAC time |",
            "|---|---|---|---|---|",
        ]
        for r in self.table():
            lines.append(
                f"| {r['method']} | {r['pearson']:.3f} ± {r['pearson_std']:.3f} | "
                f"{r['spearman']:.3f} ± {r['spearman_std']:.3f} | {r['seconds']:.2f} | "
                f"{r['time_vs_ekfac']:.1f} |"
            )
        ps = self.pbrf_stats
        lines += [
            "",
            f"PBRF: {ps['solves']} Adam solves from θ_s (tolerance ‖∇J‖ ≤ {st['pbrf']['tol']:g}·‖∇J(θ_s)‖), "
            f"{ps['converged'] / max(1, ps['solves']):.1%} converged (largest final ratio "
            f"{ps['grad_ratio_max']:.3g}), steps median {ps['steps_median']:.0f} / max {ps['steps_max']}, "
            f"{self.pbrf_seconds:.0f} s in all. Parameters: "
            f"{st['params']} ({'all parameters' if st['covers_all'] else 'tracked Linear layers only'}).",
        ]
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike, *, measurement: int | None = None) -> Path:
        """Write a PNG: correlation and time per method (Fig. 6 style) and scatter plots against the PBRF
        (Fig. 7 style; every measurement, each standardised, or only ``measurement``)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        names = list(self.methods)
        k = max(2, len(names))
        fig = plt.figure(figsize=(2.9 * k, 6.2))
        grid = fig.add_gridspec(2, 2 * k)
        rows = self.table()
        x = range(len(names))
        labels = [self.methods[n].label.split(" (")[0] for n in names]
        ax = fig.add_subplot(grid[0, :k])
        ax.bar(
            [i - 0.2 for i in x],
            [r["pearson"] for r in rows],
            0.4,
            yerr=[r["pearson_std"] for r in rows],
            label="Pearson",
        )
        ax.bar(
            [i + 0.2 for i in x],
            [r["spearman"] for r in rows],
            0.4,
            yerr=[r["spearman_std"] for r in rows],
            label="Spearman",
        )
        ax.set_xticks(list(x), labels, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("correlation with PBRF")
        ax.axhline(0, color="k", lw=0.5)
        ax.legend(fontsize=8)
        ax = fig.add_subplot(grid[0, k:])
        ax.bar(list(x), [r["seconds"] for r in rows])
        ax.set_yscale("log")
        ax.set_xticks(list(x), labels, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(f"seconds for {self.pbrf.shape[0]} measurements")
        for i, r in enumerate(rows):
            ax.annotate(f"{r['seconds']:.2g}", (i, r["seconds"]), ha="center", va="bottom", fontsize=7)
        qs = range(self.pbrf.shape[0]) if measurement is None else [measurement]
        for j, name in enumerate(names):
            ax = fig.add_subplot(grid[1, 2 * j : 2 * j + 2])
            for qi in qs:
                a, b = self.pbrf[qi], self.methods[name].scores[qi]
                if measurement is None:
                    a = (a - a.mean()) / a.std().clamp_min(1e-300)
                    b = (b - b.mean()) / b.std().clamp_min(1e-300)
                ax.scatter(a.numpy(), b.numpy(), s=4, alpha=0.5)
            if measurement is None:
                lo, hi = ax.get_xlim()
                ax.plot([lo, hi], [lo, hi], color="k", lw=0.5, ls="--")
            r = self.methods[name].summary()
            ax.set_title(f"{labels[j]}: r={r['pearson']:.2f}, ρ={r['spearman']:.2f}", fontsize=9)
            ax.set_xlabel("PBRF" + (" (standardised)" if measurement is None else ""), fontsize=8)
            ax.set_ylabel("estimate", fontsize=8)
        fig.suptitle(
            f"{self.setup}: influence vs PBRF ({self.pbrf.shape[0]} measurements × "
            f"{self.pbrf.shape[1]} training points)",
            fontsize=10,
        )
        return _save_figure(fig, path)

    # --- persistence ---------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """``result.json`` + ``scores.safetensors`` + ``table.md`` in directory ``path`` (atomic writes)."""
        path = Path(path)
        tensors = {"pbrf": self.pbrf, "query_indices": self.query_indices, "train_indices": self.train_indices}
        tensors.update({f"method/{n}": m.scores for n, m in self.methods.items()})
        atomic_save_tensors(path / "scores.safetensors", tensors)
        meta = {
            "format": "influencer.validate.experiment",
            "version": 1,
            "setup": self.setup,
            "settings": self.settings,
            "setup_info": self.setup_info,
            "pbrf_seconds": self.pbrf_seconds,
            "pbrf_stats": self.pbrf_stats,
            "table": self.table(),
            "methods": {
                n: {"seconds": m.seconds, "pearson": m.pearson, "spearman": m.spearman, "details": m.details}
                for n, m in self.methods.items()
            },
        }
        atomic_write_json(path / "result.json", _jsonable(meta))
        atomic_write_text(path / "table.md", self.to_markdown() + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ExperimentResult:
        path = Path(path)
        meta = read_json(path / "result.json")
        t = load_tensors(path / "scores.safetensors")
        methods = {
            n: MethodResult(n, t[f"method/{n}"], v["seconds"], v["pearson"], v["spearman"], v["details"])
            for n, v in meta["methods"].items()
        }
        return cls(
            meta["setup"],
            meta["settings"],
            meta["setup_info"],
            t["query_indices"],
            t["train_indices"],
            t["pbrf"],
            meta["pbrf_seconds"],
            meta["pbrf_stats"],
            methods,
        )
