"""Why the per-copy values of a fact's own sentence are hundreds of nats: the sentence's own curvature.

On the fine-tuned SmolLM2 of ``factkit.py`` the training sentence that states a fact is the only source of its
features. Its own Gauss-Newton term (1/N)·G_z is part of the damped curvature G + λ of the influence
I(q, z) = −∇f_qᵀ (G + λ)⁻¹ ∇L(z), and along z's own directions it is most of it. This script measures, for a few
facts and their own-wording query, the per-copy influence I/N of the fact's sentence with

- the plain EK-FAC inverse (fitted on every sequence, z included);
- ``steps`` CG steps on the damped GNH over a random sample of ``sample`` sequences (z not among them), the
  refinement of the query side as ``scan`` runs it;
- the same CG steps on the GNH over the sample plus z's own term at weight 1/N:
  ((N−1)/N)·G_S + (1/N)·G_z + λ (an unbiased estimate of G with z's own part exact);
- the rank-one leave-one-in correction I / (1 + (c_z/N)·s_z), c_z = gᵀG_z g/‖g‖² (z's own curvature along its
  gradient g = ∇L(z)), s_z = gᵀK⁻¹g/‖g‖² with K the EK-FAC inverse, applied to the EK-FAC value;
- c_z/N·s_z itself and gᵀG_S g / gᵀλg (the sample's curvature along g, relative to the damping).

    .venv/bin/python benchmarks/facts_self_curvature.py [--facts 0,12,24,36] [--steps 5] [--sample 32]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import influencer as inf
from influencer.curvature.linalg import per_example_grads
from influencer.functional import FlatModel
from influencer.passes import layer_io
from influencer.queries import measurement_gradients
from influencer.refine import conjugate_gradients, curvature_preconditioner
from influencer.refine_plan import sample_rows
from influencer.tasks import take_rows

from bench_facts import LAYERS, fitted
from factkit import fact_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--facts", default="0,12,24,36")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--sample", type=int, default=32)
    parser.add_argument("--layers", default=LAYERS)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setup = fact_model()
    model = setup.model
    task = inf.CausalLM(pad_token_id=setup.tokenizer.pad_token_id)
    curv, _ = fitted(setup, task, args.layers, "ekfac", 16)
    layers = curv.bind(model)
    fm = FlatModel(model, task, curv.layer_names)
    lam = fm.damping_vector({n: f.damping for n, f in curv.layers.items()})
    pre = curvature_preconditioner(fm, curv)
    n = len(setup.docs)
    rows = sample_rows(n, args.sample, 0)
    facts = [int(f) for f in args.facts.split(",")]
    rows = rows[~torch.isin(rows, torch.tensor([setup.fact_rows[f] for f in facts]))]
    sample = fm.batches(take_rows(setup.train, rows), 4)

    def a_sample(x: torch.Tensor) -> torch.Tensor:
        return fm.gnh_vp(x, sample, None, len(rows)) + lam * x

    print(f"`{' '.join(sys.argv)}` — N = {n}, sample {len(rows)} sequences, {args.steps} CG steps\n")
    print(
        "| fact | EK-FAC | CG on the sample | CG on the sample + z's own term | rank-1 corrected EK-FAC | "
        "c_z/N·s_z | gᵀG_S g / gᵀλg |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for f in facts:
        t0 = time.perf_counter()
        one = take_rows(setup.train, [setup.fact_rows[f]])
        own = fm.batches(one, 1)
        io = layer_io(model, task, layers, task.collate([task.as_dataset(one)[0]]), torch.tensor([0]), loss="train")
        g = fm.flat({name: per_example_grads(x.a, x.g) for name, x in io.items()})
        v = fm.flat(measurement_gradients(model, task, layers, setup.queries("own", [f])))

        def a_with_self(x: torch.Tensor, own=own) -> torch.Tensor:
            rest = fm.gnh_vp(x, sample, None, len(rows)) * (n - 1) / n
            return rest + fm.gnh_vp(x, own, None, 1) / n + lam * x

        with torch.no_grad():
            ekfac = -float((pre(v) * g).sum()) / n  # I / N = −∇fᵀ K⁻¹ ∇L(z) / N
            x_s, _, _ = conjugate_gradients(a_sample, v, precondition=pre, iterations=args.steps)
            x_self, _, _ = conjugate_gradients(a_with_self, v, precondition=pre, iterations=args.steps)
            gg = float((g * g).sum())
            c = float((g * fm.gnh_vp(g, own, None, 1)).sum()) / gg
            s_ek = float((pre(g) * g).sum()) / gg
            ratio_sample = float((g * fm.gnh_vp(g, sample, None, len(rows))).sum()) / float((g * lam * g).sum())
        corr = c / n * s_ek
        print(
            f"| {f} | {ekfac:.4g} | {-float((x_s * g).sum()) / n:.4g} | {-float((x_self * g).sum()) / n:.4g} | "
            f"{ekfac / (1 + corr):.4g} | {corr:.3g} | {ratio_sample:.3g} |",
            flush=True,
        )
        print(f"  ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)


if __name__ == "__main__":
    main()
