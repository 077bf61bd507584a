"""How well do the engine's strategies track exact damped Gauss-Newton influence, as the damping varies?

No PBRF here (the PBRF linearises to exact damped GNH influence, see docs/VALIDATION.md): for Q held-out
measurements × M random training points of a setup, Pearson (mean over measurements) between each strategy and
the exact influence −∇fᵀ(G + λ)⁻¹∇L computed with conjugate gradients on the full GNH, for

- one global λ = factor × mean eigenvalue of G (what the PBRF experiment uses), and
- per-layer λ_l = factor × mean(Λ_l) (the engine's default with factor 0.1, paper §5), the same λ_l for every
  strategy and the exact reference,

plus the exact block-diagonal (per-layer) GNH influence, to separate the cost of the block-diagonal
approximation from the cost of the Kronecker factorisation, and (``--expected-lambda``, MLP setups) EK-FAC with
its eigenvalues Λ computed from the *expected* per-example Fisher (Σ over output dimensions of H^½ J) instead of
one sampled label per example, to separate the cost of label sampling.

    .venv/bin/python benchmarks/validate_damping.py --setup concrete --train-points 200 --factors 0.1,1,10,100
    .venv/bin/python benchmarks/validate_damping.py --setup digits --train-points 200 --factors 1,10 --schemes global
    .venv/bin/python benchmarks/validate_damping.py --setup concrete --set steps=1000 --factors 1,10 --schemes global
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

import influencer as inf
from influencer.progress import LogBars, use_bars
from influencer.validate import (
    FlatModel,
    conjugate_gradients,
    load_setup,
    mean_eigenvalue,
    pearson,
    train_gradients,
)
from influencer.validate.experiment import _indices
from influencer.validate.outputs import parse_overrides
from influencer.validate.reference import exact_ihvp, scores_from_ihvp


def say(msg: str) -> None:
    """A timestamped progress line on stderr (the table goes to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _expected_ekfac(s, fm: FlatModel, ekfac: inf.Curvature, chunk: int = 8) -> inf.Curvature:
    """EK-FAC in the fitted eigenbases with Λ = (1/N) Σ_n Σ_k (Q_Sᵀ J̃_nk Q_A)⊙², J̃_n = H_n^½ J_n (no sampling)."""
    from torch.func import jacrev, vmap

    x_all, y_all = s.train
    lam: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for lo in range(0, len(x_all), chunk):
            xb, yb = x_all[lo : lo + chunk], y_all[lo : lo + chunk]
            jac = vmap(jacrev(lambda th, x, y: fm.outputs(th, (x[None], y[None]))[0]), in_dims=(None, 0, 0))(
                fm.theta0, xb, yb
            )  # [B, K, P]
            if isinstance(s.task, inf.Classification):  # H = diag(p) − ppᵀ = Σ_k r_k r_kᵀ, r_k = √p_k (e_k − p)
                p = fm.outputs(fm.theta0, (xb, yb)).softmax(-1)
                root = p.sqrt()[:, :, None] * (torch.eye(p.shape[1], dtype=p.dtype) - p[:, None, :])
                jac = torch.einsum("nkj,njp->nkp", root, jac)
            start = 0
            for layer in fm.layers:
                n_w = layer.d_out * layer.d_in
                w = jac[:, :, start : start + n_w].reshape(len(jac), jac.shape[1], layer.d_out, layer.d_in)
                parts = [w, jac[:, :, start + n_w : start + n_w + layer.d_out, None]] if layer.bias else [w]
                start += n_w + (layer.d_out if layer.bias else 0)
                f = ekfac.layers[layer.name]
                rotated = f.qs[0].to(jac.dtype).T @ torch.cat(parts, -1) @ f.qa[0].to(jac.dtype)
                lam[layer.name] = lam.get(layer.name, 0) + rotated.pow(2).sum((0, 1))
    n = len(x_all)
    return replace(ekfac, layers={k: replace(f, lam=(lam[k] / n).to(f.lam.dtype)) for k, f in ekfac.layers.items()})


def write_table(text: str, out: str | Path) -> None:
    """Write ``text`` to ``out``/table.md (creating the folder) and print it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text)
    print(text)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setup", default="concrete")
    ap.add_argument("--size", default="full")
    ap.add_argument("--measurements", type=int, default=10)
    ap.add_argument("--train-points", type=int, default=500)
    ap.add_argument("--factors", default="0.1,1,10")
    ap.add_argument("--schemes", default="global,per-layer", help="global and/or per-layer damping")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="setup setting override, e.g. steps=1000 (repeatable)",
    )
    ap.add_argument(
        "--expected-lambda",
        action="store_true",
        help="add EK-FAC with Λ from the expected (not sampled) Fisher (MLP setups)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    with use_bars(LogBars(say)):
        run(args, argv)


def run(args: argparse.Namespace, argv: list[str] | None) -> None:
    say(f"loading the {args.setup} setup (trains it once if it is not cached)")
    s = load_setup(args.setup, size=args.size, seed=args.seed, **parse_overrides(args.overrides))
    q_idx = _indices(s.n_test, args.measurements, args.seed + 11)
    t_idx = _indices(s.n_train, args.train_points, args.seed + 12)
    queries, subset = s.queries(q_idx), s.train_subset(t_idx)
    fm = FlatModel(s.model, s.task, s.layers)
    say(f"fitting ekfac, kfac, diagonal, identity on N = {s.n_train} (P = {fm.P:,})")
    fits = {
        k: inf.fit_curvature(s.model, s.task, s.train, strategy=k, layers=s.layers, progress=False)
        for k in ("ekfac", "kfac", "diagonal", "identity")
    }
    mean_eig = mean_eigenvalue(fits["ekfac"])
    if args.expected_lambda:
        fits["ekfac-expected"] = _expected_ekfac(s, fm, fits["ekfac"])
    with torch.no_grad():
        v = torch.cat([fm.per_example_grads(b, "measurement") for _, b in fm.batches(queries, 64, queries=True)])
        grads = train_gradients(fm, s.train, t_idx)
        batches = fm.batches(s.train, 4096)
        refs = fm.reference_outputs(batches)
    sizes = [x.d_out * x.width for x in fm.layers]
    bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()

    def corr(a: torch.Tensor, b: torch.Tensor) -> float:
        return sum(pearson(a[i], b[i]) for i in range(len(a))) / len(a)

    def engine(strategy: str, damping: dict[str, float]) -> torch.Tensor:
        c = fits[strategy]
        if strategy != "identity":
            c = replace(c, layers={n: replace(f, damping=damping[n]) for n, f in c.layers.items()})
        return inf.pairwise_scores(s.model, s.task, c, queries, subset, per_layer=False, progress=False).total.double()

    rows = []
    identity = engine("identity", {})
    for scheme in args.schemes.split(","):
        for factor in (float(f) for f in args.factors.split(",")):
            t = time.time()
            if scheme == "global":
                damping = {x.name: factor * mean_eig for x in fm.layers}
            else:
                damping = {n: factor * float(f.lam.double().mean()) for n, f in fits["ekfac"].layers.items()}
            d = fm.damping_vector(damping)
            say(f"{scheme} damping, factor {factor:g}: exact influence (CG on the full GNH)")
            with torch.no_grad():
                x, info = exact_ihvp(fm, s.train, v, damping, method="cg", rtol=1e-8, max_iter=20000, progress=True)
                exact = scores_from_ihvp(x, grads)

                def block(p: torch.Tensor, d: torch.Tensor = d) -> torch.Tensor:
                    out = d * p
                    for lo, hi in itertools.pairwise(bounds):
                        q = torch.zeros_like(p)
                        q[:, lo:hi] = p[:, lo:hi]
                        out[:, lo:hi] += fm.gnh_vp(q, batches, refs, s.n_train)[:, lo:hi]
                    return out

                say(f"{scheme} damping, factor {factor:g}: exact block-diagonal influence (CG)")
                block_diag = scores_from_ihvp(
                    conjugate_gradients(
                        block, v, rtol=1e-8, max_iter=20000, progress=True, desc="exact block-diagonal (CG)"
                    )[0],
                    grads,
                )
            row = {
                "scheme": scheme,
                "factor": factor,
                "cg_iterations": info["iterations"],
                "block-diagonal exact": corr(block_diag, exact),
            }
            for k in ("ekfac", "kfac", "diagonal", "ekfac-expected"):
                if k in fits:
                    row[k] = corr(engine(k, damping), exact)
            row["gradient-dot"] = corr(identity, exact)
            rows.append(row)
            say(f"{row} ({time.time() - t:.0f} s)")
    command = "python benchmarks/validate_damping.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    lines = [
        f"`{command}`",
        "",
        f"**{s.name}** — Pearson with exact damped full-GNH influence, {len(q_idx)} measurements × "
        f"{len(t_idx)} training points (mean eigenvalue of G: {mean_eig:.4g}); model: "
        f"{ {k: round(v, 4) for k, v in s.info.items() if k.startswith(('train_', 'test_'))} }, "
        f"recipe {s.recipe.config()}.",
        "",
        "| damping | CG iterations | exact block-diagonal | EK-FAC | K-FAC | diagonal | gradient dot |"
        + (" EK-FAC, expected Λ |" if args.expected_lambda else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if args.expected_lambda else ""),
    ]
    for r in rows:
        what = (
            f"λ = {r['factor']:g} × mean eig (global)"
            if r["scheme"] == "global"
            else f"λ_l = {r['factor']:g} × mean Λ_l (per layer)"
        )
        lines.append(
            f"| {what} | {r['cg_iterations']} | {r['block-diagonal exact']:.3f} | {r['ekfac']:.3f} | "
            f"{r['kfac']:.3f} | {r['diagonal']:.3f} | {r['gradient-dot']:.3f} |"
            + (f" {r['ekfac-expected']:.3f} |" if "ekfac-expected" in r else "")
        )
    write_table("\n".join(lines) + "\n", args.out or f"benchmarks/out/validate/damping-{args.setup}")


if __name__ == "__main__":
    main()
