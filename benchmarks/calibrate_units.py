"""Units you can believe? Predicted per-copy Δ log p against the PBRF response on the fine-tuned SmolLM2.

For a few training sequences z (facts' own sentences of ``factkit.py``) this script solves the proximal Bregman
response function (paper §2.1, Eq. 7–9) of adding one copy of z, ε = 1/N, over the tracked layers:

    θ(ε) = argmin_θ  (1/N) Σ_i D_KL(p(θ_s, x_i) ‖ p(θ, x_i)) + ε L(z, θ) + (λ_l/2) ‖θ − θ_s‖²,

with Adam (as in the paper's language-model validation, §5.1) in the rescaled variable u = (θ − θ_s)/ε and the
Bregman term estimated at every step as z's own term (exact, weight 1/N) plus a random minibatch of the others
(an unbiased estimate of the full sum; Polyak averaging of the last quarter of the iterates). Convergence is
checked at the end: ‖∇J(u)‖ with the Bregman term over z and 64 other sequences, against ‖∇J(0)‖.
The actual Δ log p of each query is f_q(θ_s + ε u) − f_q(θ_s).
Predictions, per copy (I / N): the paper's plain EK-FAC, the default path of ``scan`` (the refined inverse its cost
model plans for these queries over the corpus), and both with the leave-one-in factor of
:mod:`influencer.self_curvature`. Queries per z: its fact's own wording, paraphrase and reversed form, and the
own wording of an unrelated fact.

    .venv/bin/python benchmarks/calibrate_units.py [--facts 0,12,24,36,6] [--steps 300] [--minibatch 4]

Writes benchmarks/out/calibration/<run>/results.json and table.md.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import influencer as inf
from influencer.curvature.linalg import per_example_grads
from influencer.functional import FlatModel
from influencer.io import atomic_write_json
from influencer.passes import layer_io
from influencer.refine_plan import default_inverse, sample_rows
from influencer.self_curvature import hit_factors, self_correction
from influencer.tasks import take_rows

from bench_facts import LAYERS, fitted
from factdata import FACTS
from factkit import fact_model


def pbrf_response(
    fm: FlatModel,
    train: Any,
    z_row: int,
    damping: torch.Tensor,
    epsilon: float,
    *,
    steps: int,
    minibatch: int,
    lr: float,
    seed: int,
) -> tuple[torch.Tensor, list[float]]:
    """u* of the rescaled PBRF objective by Adam; returns (Polyak-averaged u, the stochastic gradient norms).

    The Bregman term (1/N) Σ_i D_i is estimated stratified: z's own term exactly at weight 1/N (it is most of
    the curvature along z's gradient, and a uniform minibatch would draw it about once in N / minibatch steps)
    plus the mean over ``minibatch`` others drawn uniformly from the other N − 1 at weight (N − 1)/N."""
    n = len(fm.task.as_dataset(train))
    others = torch.tensor([i for i in range(n) if i != z_row])
    gen = torch.Generator().manual_seed(seed)
    u = torch.zeros_like(fm.theta0, requires_grad=True)
    opt = torch.optim.Adam([u], lr=lr, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    avg, count, norms = torch.zeros_like(fm.theta0), 0, []
    zb = fm.batches(take_rows(train, [z_row]), 1)[0][1]
    with torch.no_grad():
        z_ref = fm.outputs(fm.theta0, zb)
    for step in range(steps):
        rows = others[torch.randint(0, n - 1, (minibatch,), generator=gen)]
        (_, b) = fm.batches(take_rows(train, rows), minibatch)[0]
        with torch.no_grad():
            ref = fm.outputs(fm.theta0, b)
        theta = fm.theta0 + epsilon * u
        z_out = fm.outputs(theta, zb)
        bregman = fm.bregman(fm.outputs(theta, b), ref, b).mean() * (n - 1) / n
        bregman = bregman + fm.bregman(z_out, z_ref, zb).sum() / n
        loss = fm.task.train_loss(z_out, zb).sum()
        total = (bregman + epsilon * loss + 0.5 * epsilon**2 * (damping * u.pow(2)).sum()) / epsilon**2
        opt.zero_grad()
        total.backward()
        norms.append(float(u.grad.norm()))
        opt.step()
        sched.step()
        if step >= steps - steps // 4:
            avg += u.detach()
            count += 1
    return avg / max(count, 1), norms


def pbrf_gradient_norm(
    fm: FlatModel, train: Any, z_row: int, u: torch.Tensor, damping: torch.Tensor, epsilon: float, sample: int
) -> float:
    """‖∇J(u)‖ of the rescaled PBRF objective with the Bregman term over z and ``sample`` other sequences (a
    convergence check: compare with ‖∇J(0)‖ = ‖∇L(z)‖ / ε)."""
    n = len(fm.task.as_dataset(train))
    rows = [r for r in sample_rows(n, sample + 1, 7) if r != z_row][:sample]
    u = u.detach().clone().requires_grad_(True)
    theta = fm.theta0 + epsilon * u
    zb = fm.batches(take_rows(train, [z_row]), 1)[0][1]
    with torch.no_grad():
        z_ref = fm.outputs(fm.theta0, zb)
    z_out = fm.outputs(theta, zb)
    total = (fm.bregman(z_out, z_ref, zb).sum() / n + epsilon * fm.task.train_loss(z_out, zb).sum()) / epsilon**2
    total = total + 0.5 * (damping * u.pow(2)).sum()
    grad = torch.autograd.grad(total, u)[0]
    for _, b in fm.batches(take_rows(train, rows), 8):
        theta = fm.theta0 + epsilon * u
        with torch.no_grad():
            ref = fm.outputs(fm.theta0, b)
        part = fm.bregman(fm.outputs(theta, b), ref, b).sum() * (n - 1) / (n * len(rows)) / epsilon**2
        grad = grad + torch.autograd.grad(part, u)[0]
    return float(grad.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--facts", default="0,12,24,36,6")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--minibatch", type=int, default=4)
    parser.add_argument("--check-sample", type=int, default=64, help="sequences in the final gradient check")
    parser.add_argument("--lr", type=float, default=None, help="Adam step in u (default: from the first gradient)")
    parser.add_argument("--layers", default=LAYERS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--solve-threads", type=int, default=None, help="threads for the PBRF solves")
    parser.add_argument("--out", default="benchmarks/out/calibration")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setup = fact_model()
    model, tok = setup.model, setup.tokenizer
    task = inf.CausalLM(pad_token_id=tok.pad_token_id)
    curv, _ = fitted(setup, task, args.layers, "ekfac", 16)
    layers = curv.bind(model)
    fm = FlatModel(model, task, curv.layer_names)
    damping = fm.damping_vector({n: f.damping for n, f in curv.layers.items()})
    n = len(setup.docs)
    eps = 1.0 / n
    facts = [int(f) for f in args.facts.split(",")]
    pairs = []  # (fact of z, query form, query fact)
    for f in facts:
        other = (f + 24) % len(FACTS)
        pairs += [(f, "own", f), (f, "paraphrase", f), (f, "reversed", f), (f, "own", other)]
    prompts = [getattr(FACTS[qf], form)[0] for _, form, qf in pairs]
    completions = [getattr(FACTS[qf], form)[1] for _, form, qf in pairs]
    from influencer.data import tokenize_queries

    queries = tokenize_queries(tok, prompts, completions)
    qbatch = fm.batches(queries, len(prompts), queries=True)[0][1]
    with torch.no_grad():
        f0 = fm.measurement(fm.theta0, qbatch)
    rows = [setup.fact_rows[f] for f in facts]
    # predictions: plain EK-FAC and the default path (as scan would plan it for these queries over the corpus)
    plain = inf.pairwise_scores(model, task, curv, queries, take_rows(setup.train, rows), progress=False).total
    default, plan = default_inverse(
        model, task, curv, setup.train, refine="auto", n_queries=len(prompts), n_scan=n, rank=32
    )
    refined = inf.pairwise_scores(model, task, default, queries, take_rows(setup.train, rows), progress=False).total
    factors = self_correction(model, task, curv, setup.train, rows, n_train=n)  # for EK-FAC: 1 / (1 + c s / N)
    default_factors = hit_factors(model, task, default, setup.train, rows, n_train=n)  # the sample's members differ
    for p in model.parameters():  # the PBRF differentiates θ only through the rescaled u
        p.requires_grad_(False)
    results: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "n": n,
        "epsilon": eps,
        "default": default.describe(),
        "plan": None if plan is None else plan.to_dict(),
        "pairs": [],
        "solves": [],
    }
    if args.solve_threads:  # e.g. 1 while another job uses the other core
        torch.set_num_threads(args.solve_threads)
    for j, f in enumerate(facts):
        t0 = time.perf_counter()
        z = take_rows(setup.train, [rows[j]])
        lr = args.lr
        if lr is None:  # as the library's PBRF solver: 30 × the RMS coordinate of the Cauchy point along −∇L(z)
            io = layer_io(model, task, layers, task.collate([task.as_dataset(z)[0]]), torch.tensor([0]))
            g = fm.flat({k: per_example_grads(x.a, x.g) for k, x in io.items()})[0]
            probe = fm.batches(take_rows(setup.train, sample_rows(n, 16, 100 + j)), 4)
            with torch.no_grad():  # (G + λ) g with G ≈ a random 16 sequences at weight (N−1)/N + z's own term at 1/N
                gg = fm.gnh_vp(g, probe, None, 16) * (n - 1) / n + fm.gnh_vp(g, fm.batches(z, 1), None, 1) / n
                curv_g = float((g * (gg + damping * g)).sum())
            alpha = float((g * g).sum()) / curv_g
            lr = 30.0 * alpha * float(g.norm()) / math.sqrt(g.numel())
        u, norms = pbrf_response(
            fm, setup.train, rows[j], damping, eps, steps=args.steps, minibatch=args.minibatch, lr=lr, seed=j
        )
        check = pbrf_gradient_norm(fm, setup.train, rows[j], u, damping, eps, args.check_sample)
        with torch.no_grad():
            f1 = fm.measurement(fm.theta0 + eps * u.to(fm.theta0.dtype), qbatch)
        factor = factors[rows[j]]["factor"]
        default_factor = default_factors[rows[j]]
        for p, (pf, form, qf) in enumerate(pairs):
            if pf != f:
                continue
            actual = float(f1[p] - f0[p])
            row = {
                "z_fact": f,
                "form": form,
                "query_fact": qf,
                "actual": actual,
                "logp": float(f0[p]),
                "ekfac": float(plain[p, j]) / n,
                "default": float(refined[p, j]) / n,
                "factor": factor,
            }
            row["ekfac+self"] = row["ekfac"] * factor
            row["default+self"] = row["default"] * default_factor
            results["pairs"].append(row)
            print(
                f"z=fact {f} q={form:10s}(fact {qf:2d}) actual {actual:+.4g}  ekfac {row['ekfac']:+.4g}  default "
                f"{row['default']:+.4g}  ×{factor:.3g} → {row['ekfac+self']:+.4g} / {row['default+self']:+.4g}",
                flush=True,
            )
        results["solves"].append(
            {"z_fact": f, "grad_start": norms[0], "grad_end": check, "lr": lr, "seconds": time.perf_counter() - t0}
        )
        print(
            f"  solve: {time.perf_counter() - t0:.0f}s, |∇J(0)| {norms[0]:.3g} → |∇J(u)| {check:.3g} "
            f"(Bregman over z + {args.check_sample} others; last stochastic |∇J| {norms[-1]:.3g})",
            flush=True,
        )
    out = Path(args.out) / setup.folder.name
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", results)
    table = render(results)
    (out / "table.md").write_text(table)
    print(table)


def render(results: dict[str, Any]) -> str:
    methods = ("ekfac", "default", "ekfac+self", "default+self")
    lines = [
        f"`{results['command']}` — N = {results['n']}, ε = 1/N",
        "",
        "| z | query | log p | actual Δ (PBRF) | " + " | ".join(methods) + " |",
        "|---|---|---:|---:|" + "---:|" * len(methods),
    ]
    for r in results["pairs"]:
        lines.append(
            f"| fact {r['z_fact']} | {r['form']} (fact {r['query_fact']}) | {r['logp']:.2f} | {r['actual']:+.3g} | "
            + " | ".join(f"{r[m]:+.3g}" for m in methods)
            + " |"
        )
    lines.append("")
    for r in results.get("solves", []):
        lines.append(
            f"PBRF for fact {r['z_fact']}: ‖∇J(0)‖ {r['grad_start']:.3g} → ‖∇J(u)‖ {r['grad_end']:.3g} "
            f"({r['seconds']:.0f} s)  "
        )
    lines.append("")
    lines.append("| method | median predicted / actual | pairs with the sign of the actual |")
    lines.append("|---|---:|---:|")
    for m in methods:
        ratios = [r[m] / r["actual"] for r in results["pairs"] if r["actual"] != 0]
        signs = sum((r[m] > 0) == (r["actual"] > 0) for r in results["pairs"])
        lines.append(f"| {m} | {statistics.median(ratios):.3g} | {signs}/{len(results['pairs'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
