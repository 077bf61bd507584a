"""Paper §5.1 Fig. 6/7 on one setup: EK-FAC, K-FAC, LiSSA, gradient dot product (and exact damped GNH) against
the PBRF, with wall times. Results (table, PNG, JSON + safetensors) go to ``--out``; the PBRF pairs are
checkpointed there as they are solved, so an interrupted run resumes where it stopped.

    .venv/bin/python benchmarks/validate_experiment.py --setup concrete            # 10 × 500, ~1 h (1 thread)
    .venv/bin/python benchmarks/validate_experiment.py --setup digits --pbrf-tol 1e-2
    .venv/bin/python benchmarks/validate_experiment.py --setup kjv-lm --train-points 40
    .venv/bin/python benchmarks/validate_experiment.py --setup concrete --size small --train-points 40  # smoke

Recorded results: docs/VALIDATION.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from influencer.validate import METHODS, PBRFConfig, run_experiment


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--setup", default="concrete", choices=["concrete", "digits", "mnist", "kjv-lm"])
    p.add_argument("--size", default="full", choices=["full", "small"])
    p.add_argument("--measurements", type=int, default=10)
    p.add_argument("--train-points", type=int, default=500)
    p.add_argument("--methods", default="ekfac,kfac,lissa,gradient-dot,exact",
                   help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--damping", type=float, default=None, help="absolute λ (default: factor × mean eigenvalue)")
    p.add_argument("--damping-factor", type=float, default=None, help="default: the setup's DAMPING_FACTORS entry")
    p.add_argument("--epsilon", type=float, default=None, help="PBRF ε (default 1/N)")
    p.add_argument("--pbrf-tol", type=float, default=3e-3)
    p.add_argument("--pbrf-max-steps", type=int, default=3000)
    p.add_argument("--lissa-depth", type=int, default=5000)
    p.add_argument("--lissa-batch", type=int, default=128)
    p.add_argument("--lissa-repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default=None, help="checkpoint cache (default $INFLUENCER_CACHE/validate)")
    p.add_argument("--out", default=None, help="default benchmarks/out/validate/<setup>")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out or f"benchmarks/out/validate/{args.setup}{'-small' if args.size == 'small' else ''}")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:7.0f}s] {msg}", flush=True)

    result = run_experiment(
        args.setup, size=args.size, measurements=args.measurements, train_points=args.train_points,
        methods=tuple(m for m in args.methods.split(",") if m), damping=args.damping,
        damping_factor=args.damping_factor, epsilon=args.epsilon,
        pbrf=PBRFConfig(tol=args.pbrf_tol, max_steps=args.pbrf_max_steps),
        lissa={"depth": args.lissa_depth, "batch_size": args.lissa_batch, "repeats": args.lissa_repeats},
        seed=args.seed, cache=args.cache, checkpoint=out / "pbrf-checkpoint", log=log)
    result.save(out / "result")
    result.plot(out / f"{args.setup}.png")
    command = "python benchmarks/validate_experiment.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    text = f"`{command}`\n\n{result.to_markdown()}\n"
    (out / "table.md").write_text(text)
    print(text)
    print(f"setup: {result.setup_info}")


if __name__ == "__main__":
    main()
