"""How many full-GNH conjugate-gradient steps does EK-FAC need to match exact damped influence?

For Q held-out measurements × M random training points of a validation setup, Pearson (mean over
measurements) with the exact influence −∇fᵀ(G + λ)⁻¹∇L (CG on the full GNH to 1e-8) of

- ``influencer.pairwise_scores`` with ``RefinedInverse(model, task, ekfac, train, steps=k)``: k steps of CG
  preconditioned by the fitted EK-FAC (the engine's public refinement; k = 0 is plain EK-FAC), and
- k steps of plain (unpreconditioned) CG from 0 (k = 0: the gradient dot product up to the factor 1/λ),

with the wall time of each, on one thread. One global λ = factor × mean eigenvalue of G as in the PBRF
experiment (`validate_experiment.py`).

    .venv/bin/python benchmarks/validate_refine.py --setup concrete --train-points 200
    .venv/bin/python benchmarks/validate_refine.py --setup digits --train-points 120 --damping-factor 10
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import torch
from validate_damping import say, write_table

import influencer as inf
from influencer.progress import LogBars, use_bars
from influencer.refine import RefinedInverse
from influencer.validate import (
    FlatModel,
    conjugate_gradients,
    damped_gnh_operator,
    load_setup,
    mean_eigenvalue,
    pearson,
    scores_from_ihvp,
    train_gradients,
)
from influencer.validate.experiment import DAMPING_FACTORS, _indices
from influencer.validate.outputs import parse_overrides


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setup", default="concrete")
    ap.add_argument("--measurements", type=int, default=10)
    ap.add_argument("--train-points", type=int, default=200)
    ap.add_argument("--damping-factor", type=float, default=None, help="default: the PBRF experiment's")
    ap.add_argument("--iterations", default="0,1,2,3,5,10,20,40")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="setup setting override, e.g. n_train=512 (repeatable)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with use_bars(LogBars(say)):
        run(args)


def run(args: argparse.Namespace) -> None:
    say(f"loading the {args.setup} setup (trains it once if it is not cached)")
    s = load_setup(args.setup, seed=args.seed, **parse_overrides(args.overrides))
    fm = FlatModel(s.model, s.task, s.layers)
    t = time.perf_counter()
    ekfac = inf.fit_curvature(
        s.model, s.task, s.train, strategy="ekfac", layers=s.layers, seed=args.seed, progress=False
    )
    fit_seconds = time.perf_counter() - t
    factor = args.damping_factor if args.damping_factor is not None else DAMPING_FACTORS.get(s.name, 1.0)
    lam = factor * mean_eigenvalue(ekfac)
    ekfac = ekfac.with_damping(damping=lam)
    queries = s.queries(_indices(s.n_test, args.measurements, args.seed + 11, what="measurements"))
    t_idx = _indices(s.n_train, args.train_points, args.seed + 12, what="training points")
    subset = s.train_subset(t_idx)
    v = torch.cat([fm.per_example_grads(b, "measurement") for _, b in fm.batches(queries, 64, queries=True)])
    grads = train_gradients(fm, s.train, t_idx)
    apply = damped_gnh_operator(fm, s.train, fm.damping_vector(lam))
    say(f"exact influence: CG on the full GNH to 1e-8 (N = {s.n_train}, P = {fm.P:,}, λ = {lam:.4g})")
    t = time.perf_counter()
    x_exact, exact_steps, _ = conjugate_gradients(
        apply, v, rtol=1e-8, max_iter=20000, progress=True, desc="exact damped GNH (CG)"
    )
    exact_seconds = time.perf_counter() - t
    exact = scores_from_ihvp(x_exact, grads)

    def corr(sc: torch.Tensor) -> float:
        sc = sc.to(torch.float64)
        return sum(pearson(sc[i], exact[i]) for i in range(len(sc))) / len(sc)

    rows = [
        "| CG steps k | EK-FAC + k CG steps (engine) | time (s) | plain CG, k steps | time (s) |",
        "|---|---|---|---|---|",
    ]
    for k in (int(i) for i in args.iterations.split(",")):
        say(f"EK-FAC + {k} CG steps and plain CG, {k} steps")
        t = time.perf_counter()
        inverse = RefinedInverse(s.model, s.task, ekfac, s.train, steps=k)
        refined = inf.pairwise_scores(s.model, s.task, inverse, queries, subset, per_layer=False, progress=False).total
        t_refined = time.perf_counter() - t + fit_seconds
        t = time.perf_counter()
        x_cg = conjugate_gradients(apply, v, iterations=k)[0] if k else v / lam
        plain = scores_from_ihvp(x_cg, grads)
        t_plain = time.perf_counter() - t
        rows.append(f"| {k} | {corr(refined):.3f} | {t_refined:.2f} | {corr(plain):.3f} | {t_plain:.2f} |")
        print(rows[-1], flush=True)
    head = (
        f"**{s.name}** — Pearson with exact damped full-GNH influence (CG to 1e-8: {exact_steps} steps, "
        f"{exact_seconds:.1f} s), {args.measurements} measurements × {args.train_points} training points "
        f"(N = {s.n_train}{', ' + str(s.info['tokens']) + ' tokens' if 'tokens' in s.info else ''}, "
        f"P = {fm.P:,} tracked parameters); "
        f"λ = {lam:.4g} ({factor:g} × mean eigenvalue of G); EK-FAC times include its fit ({fit_seconds:.2f} s) "
        f"and scoring; 1 thread."
    )
    cmd = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    write_table(
        f"`{cmd}`\n\n{head}\n\n" + "\n".join(rows) + "\n", args.out or f"benchmarks/out/validate/refine-{args.setup}"
    )


if __name__ == "__main__":
    main()
