"""Linear datamodeling score (LDS; Park et al. 2023, "TRAK"): do summed influence scores predict retraining?

For M random subsets S_j of the training set (each a ``fraction`` of it), a model is retrained on S_j with the
setup's own recipe and initialisation, and every measurement f_q is evaluated on it. The influence scores
I(q, z) of the full-data model predict f_q(S_j) up to an affine map by g_q(S_j) = Σ_{z ∈ S_j} I(q, z) (positive
I = z raises f). The LDS of a method is the Spearman correlation between g_q(S_j) and f_q(S_j) over the M
subsets, averaged over the measurements.

Retrained models start from the base model's initial weights (``seeds`` > 1 averages f over that many
initialisations, a less noisy target), so the only randomness across subsets is the subset itself.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import influencer as inf
from influencer.functional import FlatModel
from influencer.io import atomic_save_tensors, atomic_write_json, atomic_write_text, load_tensors, read_json
from influencer.validate.experiment import _indices, mean_eigenvalue
from influencer.validate.outputs import _jsonable, _save_figure
from influencer.validate.reference import exact_ihvp, scores_from_ihvp, train_gradients
from influencer.validate.setups import Setup, load_setup
from influencer.validate.stats import mean_std, spearman

__all__ = ["LDSResult", "run_lds"]

STRATEGIES = ("identity", "diagonal", "kfac", "ekfac", "exact")
_LABELS = {
    "identity": "gradient dot product (identity)",
    "diagonal": "diagonal",
    "kfac": "K-FAC",
    "ekfac": "EK-FAC",
    "exact": "exact damped GNH (CG)",
}


@dataclass
class LDSResult:
    """Outcome of :func:`run_lds`: per-strategy LDS (one Spearman per measurement) and the raw data."""

    setup: str
    settings: dict[str, Any]
    setup_info: dict[str, Any]
    query_indices: Tensor
    masks: Tensor  # [M, N] bool: subset membership
    actual: Tensor  # [M, Q] measurements of the retrained models
    base: Tensor  # [Q] measurements of the full-data model
    scores: dict[str, Tensor]  # strategy → [Q, N]
    lds: dict[str, list[float]]  # strategy → per-measurement Spearman
    seconds: dict[str, float] = field(default_factory=dict)

    def predicted(self, strategy: str) -> Tensor:
        """Σ_{z∈S_j} I(q, z): [M, Q]."""
        return self.masks.to(torch.float64) @ self.scores[strategy].T.to(torch.float64)

    def table(self) -> list[dict[str, Any]]:
        rows = []
        for name, values in self.lds.items():
            m, sd = mean_std(values)
            rows.append(
                {
                    "strategy": _LABELS.get(name, name),
                    "lds": m,
                    "lds_std": sd,
                    "seconds": self.seconds.get(name, math.nan),
                }
            )
        return rows

    def to_markdown(self) -> str:
        st = self.settings
        m, n = self.masks.shape
        lines = [
            f"**{self.setup}** — LDS over {m} retrained models on random {st['fraction']:.0%} subsets of "
            f"N = {n}, {len(self.query_indices)} measurements; damping: {st['damping_note']}.",
            "",
            "| strategy | LDS (mean ± sd over measurements) | scoring time (s) |",
            "|---|---|---|",
        ]
        for r in self.table():
            lines.append(f"| {r['strategy']} | {r['lds']:.3f} ± {r['lds_std']:.3f} | {r['seconds']:.2f} |")
        lines += ["", f"Retraining: {st['retrain_seconds']:.0f} s for {m} models ({st['seeds']} seed(s) each)."]
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike, *, measurement: int = 0) -> Path:
        """PNG: LDS per strategy and predicted-vs-actual scatter plots for one measurement."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(self.lds)
        fig, axes = plt.subplots(1, len(names) + 1, figsize=(3.2 * (len(names) + 1), 3.2), squeeze=False)
        rows = self.table()
        ax = axes[0][0]
        ax.bar(range(len(rows)), [r["lds"] for r in rows], yerr=[r["lds_std"] for r in rows])
        ax.set_xticks(range(len(rows)), [n for n in names], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("LDS (Spearman)")
        ax.axhline(0, color="k", lw=0.5)
        for j, name in enumerate(names):
            ax = axes[0][j + 1]
            ax.scatter(self.predicted(name)[:, measurement].numpy(), self.actual[:, measurement].numpy(), s=6)
            ax.set_title(f"{_LABELS.get(name, name).split(' (')[0]}: ρ={self.lds[name][measurement]:.2f}", fontsize=9)
            ax.set_xlabel("Σ scores over subset", fontsize=8)
            ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
            ax.set_ylabel("f after retraining", fontsize=8)
        fig.suptitle(f"{self.setup}: linear datamodeling score", fontsize=10)
        return _save_figure(fig, path)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        tensors = {
            "query_indices": self.query_indices,
            "masks": self.masks.to(torch.uint8),
            "actual": self.actual,
            "base": self.base,
            **{f"scores/{k}": v for k, v in self.scores.items()},
        }
        atomic_save_tensors(path / "lds.safetensors", tensors)
        atomic_write_json(
            path / "lds.json",
            _jsonable(
                {
                    "format": "influencer.validate.lds",
                    "version": 1,
                    "setup": self.setup,
                    "settings": self.settings,
                    "setup_info": self.setup_info,
                    "lds": self.lds,
                    "seconds": self.seconds,
                    "table": self.table(),
                }
            ),
        )
        atomic_write_text(path / "table.md", self.to_markdown() + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> LDSResult:
        path = Path(path)
        meta = read_json(path / "lds.json")
        t = load_tensors(path / "lds.safetensors")
        scores = {k.split("/", 1)[1]: v for k, v in t.items() if k.startswith("scores/")}
        return cls(
            meta["setup"],
            meta["settings"],
            meta["setup_info"],
            t["query_indices"],
            t["masks"].bool(),
            t["actual"],
            t["base"],
            scores,
            meta["lds"],
            meta.get("seconds", {}),
        )


def run_lds(
    setup: str | Setup = "concrete",
    *,
    subsets: int | None = None,
    fraction: float = 0.5,
    measurements: int | None = None,
    strategies: Sequence[str] = ("identity", "diagonal", "kfac", "ekfac"),
    damping: float | None = None,
    damping_factor: float | None = None,
    seeds: int = 1,
    size: str = "full",
    seed: int = 0,
    cache: str | os.PathLike | bool | None = None,
    checkpoint: str | os.PathLike | None = None,
    batch_size: int = 256,
    log: Callable[[str], None] | None = None,
    progress: bool = False,
) -> LDSResult:
    """Linear datamodeling score of each strategy on ``setup``.

    subsets / measurements: M retrained models and Q held-out measurements (None → 100 and 10, or 16 and 5 with
    ``size="small"``); fraction: each subset's share of the training set.

    damping: an absolute λ for every strategy; else ``damping_factor`` × mean eigenvalue of G (one global λ);
    both None (default) → the engine's default per-layer damping 0.1 × mean(Λ_l) (what users get).
    strategies: any of identity, diagonal, kfac, ekfac, exact (exact needs one global λ; with per-layer damping it
    uses EK-FAC's per-layer values). checkpoint: directory to store/resume retrained measurements.
    log: one line per stage and retraining progress; progress: a bar over the exact strategy's CG steps.
    """
    say = log or (lambda _msg: None)
    small = size == "small"
    subsets = subsets if subsets is not None else (16 if small else 100)
    measurements = measurements if measurements is not None else (5 if small else 10)
    if subsets < 2:
        raise ValueError(f"the LDS needs at least 2 subsets, got {subsets}")
    for name in strategies:
        if name not in STRATEGIES:
            raise ValueError(f"unknown strategy {name!r}; choose from {STRATEGIES}")
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    s = setup if isinstance(setup, Setup) else load_setup(setup, seed=seed, cache=cache, size=size, log=say)
    n = s.n_train
    q_idx = _indices(s.n_test, measurements, seed + 11, what="measurements (held-out examples)")
    queries = s.queries(q_idx)
    fm = FlatModel(s.model, s.task, s.layers)
    qb = fm.batches(queries, 64, queries=True)

    ekfac = inf.fit_curvature(
        s.model, s.task, s.train, strategy="ekfac", layers=s.layers, batch_size=batch_size, seed=seed, progress=False
    )
    if damping is not None:
        lam: float | dict[str, float] = float(damping)
        note = f"λ = {damping:.4g} (absolute, all layers)"
    elif damping_factor is not None:
        lam = damping_factor * mean_eigenvalue(ekfac)
        note = f"λ = {damping_factor:g} × mean eigenvalue of G = {lam:.4g} (all layers)"
    else:
        lam = {name: f.damping for name, f in ekfac.layers.items()}
        note = "engine default, per layer λ_l = 0.1 × mean(Λ_l) of each strategy (exact: EK-FAC's λ_l)"
    scores: dict[str, Tensor] = {}
    seconds: dict[str, float] = {}
    for name in strategies:
        t = time.perf_counter()
        if name == "exact":
            v = torch.cat([fm.per_example_grads(b, "measurement") for _, b in qb])
            x, _ = exact_ihvp(fm, s.train, v, lam, method="cg", rtol=1e-8, max_iter=20000, progress=progress)
            sc = scores_from_ihvp(x, train_gradients(fm, s.train, torch.arange(n)))
        else:
            curv = (
                ekfac
                if name == "ekfac"
                else inf.fit_curvature(
                    s.model,
                    s.task,
                    s.train,
                    strategy=name,
                    layers=s.layers,
                    batch_size=batch_size,
                    seed=seed,
                    progress=False,
                )
            )
            if name != "identity" and not isinstance(lam, dict):
                curv = curv.with_damping(damping=lam)
            sc = inf.pairwise_scores(
                s.model, s.task, curv, queries, s.train, batch_size=batch_size, per_layer=False, progress=False
            ).total
        scores[name] = sc.to(torch.float64)
        seconds[name] = time.perf_counter() - t

    gen = torch.Generator().manual_seed(seed + 13)
    k = round(fraction * n)
    masks = torch.zeros(subsets, n, dtype=torch.bool)
    for j in range(subsets):
        masks[j, torch.randperm(n, generator=gen)[:k]] = True
    with torch.no_grad():
        base = torch.cat([fm.measurement(fm.theta0, b) for _, b in qb])
    actual, retrain_seconds = _retrain_all(s, masks, queries, seeds, checkpoint, say)
    lds = {
        name: [spearman(masks.to(torch.float64) @ sc[qi], actual[:, qi]) for qi in range(len(q_idx))]
        for name, sc in scores.items()
    }
    settings = {
        "subsets": subsets,
        "fraction": fraction,
        "measurements": measurements,
        "strategies": list(strategies),
        "damping": lam,
        "damping_note": note,
        "seeds": seeds,
        "size": size,
        "seed": seed,
        "retrain_seconds": retrain_seconds,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    return LDSResult(s.name, settings, s.info, q_idx, masks, actual, base, scores, lds, seconds)


def _retrain_all(
    s: Setup, masks: Tensor, queries: Any, seeds: int, checkpoint: str | os.PathLike | None, say: Callable[[str], None]
) -> tuple[Tensor, float]:
    m = len(masks)
    done = [False] * m
    key = {
        "setup": s.name,
        "info": _jsonable(s.info),
        "masks": masks.to(torch.int64).sum(1).tolist(),
        "seeds": seeds,
        "first": masks[0].nonzero().reshape(-1)[:20].tolist(),
    }
    ck = Path(checkpoint) if checkpoint is not None else None
    seconds = 0.0
    rows: list[Tensor | None] = [None] * m
    if ck is not None and (ck / "lds_retrain.json").is_file():
        meta = read_json(ck / "lds_retrain.json")
        if meta.get("key") == json.loads(json.dumps(_jsonable(key))):
            saved = load_tensors(ck / "lds_retrain.safetensors")["actual"]
            for j, flag in enumerate(meta["done"]):
                if flag:
                    rows[j], done[j] = saved[j], True
            seconds = meta["seconds"]
            say(f"resumed {sum(done)} retrained models from {ck}")
    t_start, last = time.perf_counter(), time.perf_counter()
    for j in range(m):
        if done[j]:
            continue
        t = time.perf_counter()
        idx = masks[j].nonzero().reshape(-1)
        values = []
        for k in range(seeds):
            model = s.retrain(idx, seed=s.seed + k * 1000)
            fm_q = FlatModel(model, s.task, s.layers)
            with torch.no_grad():
                values.append(
                    torch.cat([fm_q.measurement(fm_q.theta0, b) for _, b in fm_q.batches(queries, 64, queries=True)])
                )
        rows[j] = torch.stack(values).mean(0)
        done[j] = True
        seconds += time.perf_counter() - t
        if ck is not None and (time.perf_counter() - last > 30 or all(done)):
            width = next(r for r in rows if r is not None).numel()
            stacked = torch.stack(
                [r if r is not None else torch.full((width,), math.nan, dtype=torch.float64) for r in rows]
            )
            atomic_save_tensors(ck / "lds_retrain.safetensors", {"actual": stacked})
            atomic_write_json(ck / "lds_retrain.json", _jsonable({"key": key, "done": done, "seconds": seconds}))
            last = time.perf_counter()
        count = sum(done)
        if count % max(1, m // 10) == 0:
            say(f"  retrained {count}/{m} ({(time.perf_counter() - t_start) / 60:.1f} min)")
    actual = torch.stack([r for r in rows if r is not None]).to(torch.float64)
    return actual, seconds
