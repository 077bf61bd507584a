"""Linear datamodeling score (LDS) of identity, diagonal, K-FAC, EK-FAC (and exact damped GNH) on one setup.

    .venv/bin/python benchmarks/validate_lds.py --setup concrete                 # 100 subsets, ~10 min
    .venv/bin/python benchmarks/validate_lds.py --setup digits
    .venv/bin/python benchmarks/validate_lds.py --setup concrete --damping-factor 1   # one global λ

Retrained measurements are checkpointed in ``--out`` (resumable). Recorded results: docs/VALIDATION.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from influencer.validate import run_lds


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setup", default="concrete", choices=["concrete", "digits", "mnist", "kjv-lm"])
    p.add_argument("--size", default="full", choices=["full", "small"])
    p.add_argument("--subsets", type=int, default=100)
    p.add_argument("--fraction", type=float, default=0.5)
    p.add_argument("--measurements", type=int, default=10)
    p.add_argument("--strategies", default="identity,diagonal,kfac,ekfac,exact")
    p.add_argument("--damping", type=float, default=None)
    p.add_argument("--damping-factor", type=float, default=None,
                   help="one global λ = factor × mean eigenvalue (default: the engine's per-layer damping)")
    p.add_argument("--seeds", type=int, default=1, help="initialisations averaged per subset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default=None)
    p.add_argument("--out", default=None, help="default benchmarks/out/validate/lds-<setup>")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out or f"benchmarks/out/validate/lds-{args.setup}{'-small' if args.size == 'small' else ''}")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:7.0f}s] {msg}", flush=True)

    result = run_lds(args.setup, size=args.size, subsets=args.subsets, fraction=args.fraction,
                     measurements=args.measurements, strategies=tuple(args.strategies.split(",")),
                     damping=args.damping, damping_factor=args.damping_factor, seeds=args.seeds, seed=args.seed,
                     cache=args.cache, checkpoint=out / "retrain-checkpoint", log=log)
    result.save(out / "result")
    result.plot(out / f"lds-{args.setup}.png")
    command = "python benchmarks/validate_lds.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    text = f"`{command}`\n\n{result.to_markdown()}\n"
    (out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
