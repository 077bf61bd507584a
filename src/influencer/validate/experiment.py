"""Paper §5.1 (Fig. 6/7): influence estimates against the PBRF on held-out measurements.

:func:`run_experiment` trains (or loads) a setup, picks ``measurements`` held-out queries and ``train_points``
random training examples, solves the PBRF for each training example (one ±ε pair serves every measurement) and
scores the same pairs with each method:

- ``ekfac``, ``kfac``, ``diagonal``: the engine (:func:`influencer.fit_curvature` on the whole training set +
  :func:`influencer.pairwise_scores`), every tracked layer, the experiment's damping;
- ``gradient-dot``: the engine's ``identity`` strategy, −∇fᵀ∇L (no curvature, no damping);
- ``lissa``: :func:`influencer.validate.reference.lissa_ihvp` on the full (not block-diagonal) GNH;
- ``exact``: the exact damped full-GNH influence (conjugate gradients to 1e-8), i.e. what the PBRF linearises;
- ``ekfac-pcg``: ``pcg_iterations`` steps of conjugate gradients on the full damped GNH preconditioned by the
  EK-FAC inverse (:func:`~influencer.validate.reference.curvature_preconditioner`): EK-FAC corrected by a few
  full-GNH products, timed with the EK-FAC fit it needs.

Damping: one absolute λ shared by the PBRF and every method (``damping``), by default ``damping_factor`` × the
mean eigenvalue of G over all tracked parameters (estimated as the mean EK-FAC eigenvalue, ≈ trace(G)/P).
Correlations (Pearson and Spearman) are computed per measurement over the training points, then averaged.
Wall times cover everything a method needs for all measurements (curvature fitting, query gradients, IHVPs,
training gradients and scoring) on the same machine and thread count.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import influencer as inf
from influencer.curvature.strategies import strategy as strategy_record
from influencer.functional import FlatModel
from influencer.io import atomic_save_tensors, atomic_write_json, atomic_write_text, load_tensors, read_json
from influencer.validate.pbrf import PBRF, PBRFConfig
from influencer.validate.reference import (
    conjugate_gradients,
    curvature_preconditioner,
    damped_gnh_operator,
    exact_ihvp,
    lissa_ihvp,
    scores_from_ihvp,
    train_gradients,
)
from influencer.validate.setups import Setup, load_setup
from influencer.validate.stats import mean_std, pearson, spearman

__all__ = [
    "DAMPING_FACTORS",
    "METHODS",
    "ExperimentResult",
    "MethodResult",
    "canonical_methods",
    "mean_eigenvalue",
    "run_experiment",
]

METHODS = ("ekfac", "kfac", "diagonal", "lissa", "gradient-dot", "exact", "ekfac-pcg")
#: λ = factor × mean eigenvalue of G when none is given: the PBRF's Adam solves need ~κ(G + λ)^½ steps, so the
#: factor is the smallest that keeps 10 × 500 PBRF pairs within a few CPU hours on each setup (kjv-lm: at 1 × half
#: of the solves at ε = 1/N stall short of the tolerance; at 10 × all converge in ~250 steps)
DAMPING_FACTORS = {"concrete": 1.0, "digits": 10.0, "mnist": 10.0, "kjv-lm": 10.0}
DEFAULT_METHODS = ("ekfac", "kfac", "lissa", "gradient-dot")
_ALIASES = {
    "identity": "gradient-dot",
    "graddot": "gradient-dot",
    "grad-dot": "gradient-dot",
    "ek-fac": "ekfac",
    "k-fac": "kfac",
    "pcg": "ekfac-pcg",
}
_LABELS = {
    "ekfac": "EK-FAC",
    "kfac": "K-FAC",
    "diagonal": "diagonal",
    "lissa": "LiSSA",
    "gradient-dot": "gradient dot product",
    "exact": "exact damped GNH (CG)",
    "ekfac-pcg": "EK-FAC + CG",
}


def canonical_methods(methods: Sequence[str]) -> list[str]:
    """Method names as :data:`METHODS` spells them (aliases such as ``identity`` or ``pcg`` resolved, duplicates
    dropped); ValueError names an unknown one."""
    out = []
    for m in methods:
        key = _ALIASES.get(m.lower(), m.lower())
        if key not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {METHODS}")
        if key not in out:
            out.append(key)
    return out


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


def _save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """Lay out ``fig``, write it to ``path`` as a PNG (creating the folder), close it; returns the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, Tensor):
        return x.tolist()
    return str(x)


# --------------------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------------------


def mean_eigenvalue(curvature: inf.Curvature) -> float:
    """Mean fitted eigenvalue over all tracked parameters (Σ_l ΣΛ_l / Σ_l |Λ_l|) ≈ trace(G) / P."""
    total = sum(float(f.lam.to(torch.float64).sum()) for f in curvature.layers.values() if f.lam is not None)
    count = sum(f.lam.numel() for f in curvature.layers.values() if f.lam is not None)
    return total / max(1, count)


def _indices(n: int, k: int, seed: int, what: str = "points") -> Tensor:
    if not 0 < k <= n:
        raise ValueError(f"asked for {k} {what} but the setup has {n}; ask for between 1 and {n}")
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values


def _correlations(est: Tensor, truth: Tensor) -> tuple[list[float], list[float]]:
    return (
        [pearson(est[i], truth[i]) for i in range(len(truth))],
        [spearman(est[i], truth[i]) for i in range(len(truth))],
    )


def run_experiment(
    setup: str | Setup = "concrete",
    *,
    measurements: int | None = None,
    train_points: int | None = None,
    methods: Sequence[str] = DEFAULT_METHODS,
    damping: float | None = None,
    damping_factor: float | None = None,
    epsilon: float | None = None,
    pbrf: PBRFConfig | dict[str, Any] | None = None,
    lissa: dict[str, Any] | None = None,
    pcg_iterations: int = 10,
    size: str = "full",
    seed: int = 0,
    cache: str | os.PathLike | bool | None = None,
    checkpoint: str | os.PathLike | None = None,
    batch_size: int = 256,
    log: Callable[[str], None] | None = None,
    progress: bool = False,
) -> ExperimentResult:
    """Compare influence methods with the PBRF on ``setup`` (paper Fig. 6/7).

    setup: "concrete", "digits", "mnist", "kjv-lm" (see :mod:`influencer.validate.setups`) or a built Setup.
    measurements / train_points: how many held-out queries and random training examples (seeded by ``seed``);
        None → 10 × 500 (the paper's sizes), or 5 × 40 with ``size="small"``.
    methods: any of ``ekfac``, ``kfac``, ``diagonal``, ``lissa``, ``gradient-dot``, ``exact``, ``ekfac-pcg``.
    damping: one absolute λ for the PBRF and every method; None → ``damping_factor`` × mean eigenvalue of G
        (``damping_factor`` None → the setup's entry in :data:`DAMPING_FACTORS`).
    epsilon: PBRF up-weighting ε (None → 1/N, one added copy); pbrf: :class:`PBRFConfig` fields.
    lissa: keyword arguments of :func:`lissa_ihvp` (default depth 5000, batch 128, 1 repeat, scale 2(λ_max+λ)).
    pcg_iterations: conjugate-gradient steps of ``ekfac-pcg`` (each one full-batch GNH-vector product).
    size: "full" or "small" (a quick check: the small setup, 5 × 40 points, PBRF tolerance 1e-2 and LiSSA depth
        1000 unless given); cache: checkpoint cache dir (False: none);
    checkpoint: a directory where PBRF results are stored as they are computed and resumed from.
    log: receives one line per stage and PBRF progress; progress: bars over the LiSSA, exact-CG and EK-FAC + CG steps.
    """
    say = log or (lambda _msg: None)
    chosen = canonical_methods(methods)
    small = size == "small"
    measurements = measurements if measurements is not None else (5 if small else 10)
    train_points = train_points if train_points is not None else (40 if small else 500)
    s = setup if isinstance(setup, Setup) else load_setup(setup, seed=seed, cache=cache, size=size, log=say)
    q_idx = _indices(s.n_test, measurements, seed + 11, what="measurements (held-out examples)")
    t_idx = _indices(s.n_train, train_points, seed + 12, what="training points")
    queries = s.queries(q_idx)
    subset = s.train_subset(t_idx)
    fm = FlatModel(s.model, s.task, s.layers)
    results: dict[str, MethodResult] = {}

    # Damping from the EK-FAC fit (which is timed as EK-FAC's own fitting cost).
    t0 = time.perf_counter()
    ekfac = inf.fit_curvature(
        s.model, s.task, s.train, strategy="ekfac", layers=s.layers, batch_size=batch_size, seed=seed, progress=False
    )
    ekfac_fit = time.perf_counter() - t0
    mean_eig = mean_eigenvalue(ekfac)
    if damping_factor is None:
        damping_factor = DAMPING_FACTORS.get(s.name, 1.0)
    lam = float(damping) if damping is not None else damping_factor * mean_eig
    note = "absolute" if damping is not None else f"{damping_factor:g} × mean eigenvalue of G = {mean_eig:.4g}"
    pcfg = pbrf if isinstance(pbrf, PBRFConfig) else PBRFConfig(**{"tol": 1e-2 if small else 3e-3, **(pbrf or {})})
    if epsilon is not None:
        pcfg = PBRFConfig(**{**asdict(pcfg), "epsilon": float(epsilon)})
    lcfg = {
        "depth": 1000 if small else 5000,
        "batch_size": 128,
        "repeats": 1,
        "scale": None,
        "scale_factor": 2.0,
        "seed": seed,
        **(lissa or {}),
    }

    def engine(name: str, strategy: str, fitted: inf.Curvature | None = None, fit_seconds: float = 0.0) -> None:
        t = time.perf_counter()
        curv = (
            fitted
            if fitted is not None
            else inf.fit_curvature(
                s.model,
                s.task,
                s.train,
                strategy=strategy,
                layers=s.layers,
                batch_size=batch_size,
                seed=seed,
                progress=False,
            )
        )
        if strategy_record(strategy).curved:
            curv = curv.with_damping(damping=lam)
        sc = inf.pairwise_scores(
            s.model, s.task, curv, queries, subset, batch_size=batch_size, per_layer=False, progress=False
        ).total.to(torch.float64)
        seconds = fit_seconds + time.perf_counter() - t
        results[name] = MethodResult(name, sc, seconds, [], [], {"strategy": strategy})

    def query_grads() -> Tensor:
        return torch.cat([fm.per_example_grads(b, "measurement") for _, b in fm.batches(queries, 64, queries=True)])

    for name in chosen:
        say(f"{s.name}: {name}…")
        if name == "ekfac":
            engine(name, "ekfac", ekfac, ekfac_fit)
        elif name in ("kfac", "diagonal"):
            engine(name, name)
        elif name == "gradient-dot":
            engine(name, "identity")
        elif name == "lissa":
            t = time.perf_counter()
            x, info = lissa_ihvp(fm, s.train, query_grads(), lam, progress=progress, **lcfg)
            sc = scores_from_ihvp(x, train_gradients(fm, s.train, t_idx))
            results[name] = MethodResult(name, sc, time.perf_counter() - t, [], [], asdict(info))
        elif name == "exact":
            t = time.perf_counter()
            x, info = exact_ihvp(
                fm, s.train, query_grads(), lam, method="cg", rtol=1e-8, max_iter=20000, progress=progress
            )
            sc = scores_from_ihvp(x, train_gradients(fm, s.train, t_idx))
            results[name] = MethodResult(name, sc, time.perf_counter() - t, [], [], info)
        elif name == "ekfac-pcg":
            t = time.perf_counter()
            apply = damped_gnh_operator(fm, s.train, fm.damping_vector(lam))
            pre = curvature_preconditioner(fm, ekfac.with_damping(damping=lam))
            x, steps, rel = conjugate_gradients(
                apply, query_grads(), iterations=pcg_iterations, precondition=pre, progress=progress, desc="EK-FAC + CG"
            )
            sc = scores_from_ihvp(x, train_gradients(fm, s.train, t_idx))
            results[name] = MethodResult(
                name, sc, ekfac_fit + time.perf_counter() - t, [], [], {"iterations": steps, "relative_residual": rel}
            )

    say(f"{s.name}: PBRF for {len(t_idx)} training points…")
    truth, pbrf_seconds, stats = _pbrf_all(fm, s, lam, pcfg, queries, q_idx, t_idx, checkpoint, say)
    for m in results.values():
        m.pearson, m.spearman = _correlations(m.scores, truth)
    settings = {
        "measurements": measurements,
        "train_points": train_points,
        "methods": chosen,
        "damping": lam,
        "damping_factor": None if damping is not None else damping_factor,
        "damping_note": note,
        "mean_eigenvalue": mean_eig,
        "epsilon": stats["epsilon"],
        "pbrf": asdict(pcfg),
        "lissa": lcfg,
        "pcg_iterations": pcg_iterations,
        "size": size,
        "seed": seed,
        "params": fm.P,
        "covers_all": fm.covers_all,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
    }
    return ExperimentResult(s.name, settings, s.info, q_idx, t_idx, truth, pbrf_seconds, stats, results)


def _pbrf_all(
    fm: FlatModel,
    s: Setup,
    lam: float,
    cfg: PBRFConfig,
    queries: Any,
    q_idx: Tensor,
    t_idx: Tensor,
    checkpoint: str | os.PathLike | None,
    say: Callable[[str], None],
) -> tuple[Tensor, float, dict]:
    solver = PBRF(fm, s.train, lam, cfg)
    qb = fm.batches(queries, 64, queries=True)
    q = sum(len(i) for i, _ in qb)
    truth = torch.full((q, len(t_idx)), math.nan, dtype=torch.float64)
    infos: list[dict[str, Any]] = [{} for _ in range(len(t_idx))]
    key = {
        "setup": s.name,
        "info": _jsonable(s.info.get("recipe")),
        "config": _jsonable(s.info),
        "damping": lam,
        "pbrf": asdict(cfg),
        "train": t_idx.tolist(),
        "queries": q,
    }
    ck = Path(checkpoint) if checkpoint is not None else None
    seconds = 0.0
    if ck is not None and (ck / "pbrf.json").is_file() and (ck / "pbrf.safetensors").is_file():
        meta = read_json(ck / "pbrf.json")
        if (
            meta.get("key") == json.loads(json.dumps(_jsonable(key)))
            and meta.get("query_indices", q_idx.tolist()) == q_idx.tolist()
        ):
            saved = load_tensors(ck / "pbrf.safetensors")["pbrf"]
            truth.copy_(saved)
            infos = meta["infos"]
            seconds = meta["seconds"]
            say(f"resumed {sum(bool(i) for i in infos)} PBRF points from {ck}")
    t_start = time.perf_counter()
    done_before = sum(bool(i) for i in infos)
    last_save = time.perf_counter()
    for j, idx in enumerate(t_idx.tolist()):
        if infos[j]:
            continue
        val, info = solver.influence(idx, qb)
        truth[:, j] = val
        infos[j] = info
        seconds += info["seconds"]
        done = sum(bool(i) for i in infos)
        if ck is not None and (time.perf_counter() - last_save > 30 or done == len(t_idx)):
            atomic_save_tensors(ck / "pbrf.safetensors", {"pbrf": truth})
            atomic_write_json(
                ck / "pbrf.json",
                _jsonable({"key": key, "query_indices": q_idx.tolist(), "infos": infos, "seconds": seconds}),
            )
            last_save = time.perf_counter()
        if done % max(1, len(t_idx) // 20) == 0 or done == len(t_idx):
            rate = (time.perf_counter() - t_start) / max(1, done - done_before)
            say(f"  PBRF {done}/{len(t_idx)}  ({rate:.1f} s/point, ~{rate * (len(t_idx) - done) / 60:.0f} min left)")
    steps = [i[k]["steps"] for i in infos for k in ("plus", "minus")]
    conv = [i[k]["converged"] for i in infos for k in ("plus", "minus")]
    ratio = [i[k]["grad_ratio"] for i in infos for k in ("plus", "minus")]
    steps_sorted = sorted(steps)
    stats = {
        "solves": len(steps),
        "converged": int(sum(conv)),
        "steps_median": steps_sorted[len(steps) // 2],
        "steps_max": max(steps),
        "steps_mean": sum(steps) / len(steps),
        "grad_ratio_max": max(ratio),
        "epsilon": solver.epsilon,
        "n": solver.n,
    }
    return truth, seconds, stats
