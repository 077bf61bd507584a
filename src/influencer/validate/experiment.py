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

import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor

import influencer as inf
from influencer.curvature.strategies import strategy as strategy_record
from influencer.functional import FlatModel
from influencer.validate.experiment_result import ExperimentResult, MethodResult
from influencer.validate.ground_truth import _pbrf_all
from influencer.validate.methods import DEFAULT_METHODS, METHODS, canonical_methods
from influencer.validate.pbrf import PBRFConfig
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
from influencer.validate.stats import pearson, spearman

__all__ = [
    "DAMPING_FACTORS",
    "METHODS",
    "ExperimentResult",
    "MethodResult",
    "canonical_methods",
    "mean_eigenvalue",
    "run_experiment",
]

#: λ = factor × mean eigenvalue of G when none is given: the PBRF's Adam solves need ~κ(G + λ)^½ steps, so the
#: factor is the smallest that keeps 10 × 500 PBRF pairs within a few CPU hours on each setup (kjv-lm: at 1 × half
#: of the solves at ε = 1/N stall short of the tolerance; at 10 × all converge in ~250 steps)
DAMPING_FACTORS = {"concrete": 1.0, "digits": 10.0, "mnist": 10.0, "kjv-lm": 10.0}


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
