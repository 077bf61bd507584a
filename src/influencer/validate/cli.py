"""Command line of the validation suite: ``python -m influencer.validate {experiment,lds} …``.

:func:`main` is what ``benchmarks/validate_experiment.py``, ``benchmarks/validate_lds.py`` and the ``influencer
validate`` command call. Each run writes to ``--out`` (default ``benchmarks/out/validate/<name>``):

- ``table.md`` — the command line and the markdown table;
- ``<setup>.png`` (experiment) / ``lds-<setup>.png`` (LDS) — the figure (needs matplotlib);
- ``result/`` — everything as JSON + safetensors (:meth:`ExperimentResult.load`, :meth:`LDSResult.load`);
- a checkpoint of the PBRF solves / retrained models, so an interrupted run resumes where it stopped.

Setup settings can be overridden with ``--set key=value`` (e.g. ``--set steps=1000``; see
:func:`influencer.validate.load_setup`).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from influencer.validate.experiment import METHODS, run_experiment
from influencer.validate.lds import STRATEGIES, run_lds
from influencer.validate.setups import SETUPS, load_setup

__all__ = ["main"]


def _value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _overrides(items: Sequence[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        out[key.strip().replace("-", "_")] = _value(value.strip())
    return out


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--setup", default="concrete", choices=SETUPS)
    p.add_argument(
        "--size",
        default="full",
        choices=["full", "small"],
        help="full: the documented setups; small: reduced data and width (seconds to train)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="setup setting override, e.g. steps=1000 (repeatable)",
    )
    p.add_argument("--measurements", type=int, default=None, help="held-out queries (default: 10; small: 5)")
    p.add_argument("--damping", type=float, default=None, help="absolute λ")
    p.add_argument("--damping-factor", type=float, default=None, help="λ = factor × mean eigenvalue of G")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default=None, help="checkpoint cache (default $INFLUENCER_CACHE/validate)")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/out/validate/<name>)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m influencer.validate", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("experiment", help="paper Fig. 6/7: methods against the PBRF, with wall times")
    _common(e)
    e.add_argument("--train-points", type=int, default=None, help="random training points (default: 500; small: 40)")
    e.add_argument(
        "--methods", default="ekfac,kfac,lissa,gradient-dot", help=f"comma-separated, from {', '.join(METHODS)}"
    )
    e.add_argument("--epsilon", type=float, default=None, help="PBRF ε (default 1/N)")
    e.add_argument("--pbrf-tol", type=float, default=None, help="PBRF tolerance (default 3e-3; small: 1e-2)")
    e.add_argument("--pbrf-max-steps", type=int, default=None)
    e.add_argument("--lissa-depth", type=int, default=None, help="default 5000; small: 1000")
    e.add_argument("--lissa-batch", type=int, default=128)
    e.add_argument("--lissa-repeats", type=int, default=1)
    e.add_argument(
        "--pcg-iterations",
        type=int,
        default=10,
        help="conjugate-gradient steps of ekfac-pcg (EK-FAC-preconditioned CG on the full GNH)",
    )
    lds = sub.add_parser("lds", help="linear datamodeling score from models retrained on random subsets")
    _common(lds)
    lds.add_argument("--subsets", type=int, default=None, help="retrained models M (default: 100; small: 16)")
    lds.add_argument("--fraction", type=float, default=0.5)
    lds.add_argument(
        "--strategies", default="identity,diagonal,kfac,ekfac", help=f"comma-separated, from {', '.join(STRATEGIES)}"
    )
    lds.add_argument("--seeds", type=int, default=1, help="initialisations averaged per subset")
    return p


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """Run ``experiment`` or ``lds`` from command-line arguments; returns 0 (prints the table).

    prog: how the run is named in ``table.md`` (default ``python -m influencer.validate <command>``).
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(args_list)
    torch.set_num_threads(args.threads)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:7.0f}s] {msg}", flush=True)

    overrides = _overrides(args.overrides)
    setup = load_setup(args.setup, size=args.size, seed=args.seed, cache=args.cache, log=log, **overrides)
    tag = f"{args.setup}{'-small' if args.size == 'small' else ''}"
    common: dict[str, Any] = {
        "measurements": args.measurements,
        "damping": args.damping,
        "damping_factor": args.damping_factor,
        "size": args.size,
        "seed": args.seed,
        "log": log,
    }
    if args.command == "experiment":
        out = Path(args.out or f"benchmarks/out/validate/{tag}")
        pbrf = {k: v for k, v in (("tol", args.pbrf_tol), ("max_steps", args.pbrf_max_steps)) if v is not None}
        lissa = {"batch_size": args.lissa_batch, "repeats": args.lissa_repeats}
        if args.lissa_depth is not None:
            lissa["depth"] = args.lissa_depth
        result: Any = run_experiment(
            setup,
            train_points=args.train_points,
            methods=tuple(m for m in args.methods.split(",") if m),
            epsilon=args.epsilon,
            pbrf=pbrf or None,
            lissa=lissa,
            pcg_iterations=args.pcg_iterations,
            checkpoint=out / "pbrf-checkpoint",
            **common,
        )
        figure = f"{args.setup}.png"
    else:
        out = Path(args.out or f"benchmarks/out/validate/lds-{tag}")
        result = run_lds(
            setup,
            subsets=args.subsets,
            fraction=args.fraction,
            strategies=tuple(s for s in args.strategies.split(",") if s),
            seeds=args.seeds,
            checkpoint=out / "retrain-checkpoint",
            **common,
        )
        figure = f"lds-{args.setup}.png"
    result.save(out / "result")
    try:
        result.plot(out / figure)
    except ImportError:
        log("matplotlib is not installed: no figure")
    rest = args_list[1:] if args_list and args_list[0] == args.command else args_list
    command = prog or f"python -m influencer.validate {args.command}"
    text = f"`{command} {shlex.join(rest)}`\n\n{result.to_markdown()}\n"
    (out / "table.md").write_text(text)
    print(text, flush=True)
    print(f"setup: {result.setup_info}", flush=True)
    return 0
