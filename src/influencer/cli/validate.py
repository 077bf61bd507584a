"""``influencer validate experiment|lds``: influence estimates against ground truth (paper §5.1).

The same commands run as ``python -m influencer.validate experiment|lds`` and through the thin wrappers
``benchmarks/validate_experiment.py`` / ``benchmarks/validate_lds.py`` (:func:`main`). Each run writes to
``--out`` (default ``runs/validate/<name>``; the benchmark wrappers: ``benchmarks/out/validate/<name>``):

- ``table.md`` — the command line that made it, then the markdown table;
- ``<setup>.png`` (experiment) / ``lds-<setup>.png`` (LDS) — the figure (needs matplotlib);
- ``result/`` — everything as JSON + safetensors (``ExperimentResult.load`` / ``LDSResult.load``);
- a checkpoint of the PBRF solves / retrained models, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import typer

from influencer.cli._app import GROUP_SETTINGS, app
from influencer.cli._options import SetupChoice, SizeChoice, _value
from influencer.cli._progress import _console
from influencer.cli._runtime import UserError, _command, _standalone
from influencer.cli._shared import _say

__all__ = ["main", "validate_app"]

validate_app = typer.Typer(
    name="validate",
    help="Check influence estimates against ground truth on small trained setups (paper §5.1): the PBRF "
    "experiment (Fig. 6/7) and the linear datamodeling score. Recorded results: docs/VALIDATION.md.",
    **GROUP_SETTINGS,  # type: ignore[arg-type]
)
app.add_typer(validate_app, name="validate")


# Options both commands take (typer reads these declarations; they are never mutated).
_SETUP = typer.Option(SetupChoice.concrete, "--setup", help="Validation setup (docs/VALIDATION.md §1).")
_SIZE = typer.Option(
    SizeChoice.full,
    "--size",
    help="full: the documented setups (minutes to hours); small: reduced data and width, for a quick check.",
)
_SET = typer.Option(
    [],
    "--set",
    metavar="KEY=VALUE",
    help="Setup override, repeatable: steps, lr, hidden, weight_decay, batch_size, n_train, … (its own checkpoint).",
)
_MEASUREMENTS = typer.Option(
    None, "--measurements", min=1, show_default="10; small: 5", help="Held-out measurements (queries)."
)
_DAMPING = typer.Option(None, "--damping", min=0.0, help="One absolute damping λ for every method.")
_DAMPING_FACTOR = typer.Option(
    None,
    "--damping-factor",
    min=0.0,
    help="λ = factor × mean eigenvalue of G. Default: experiment 1 (concrete) / 10 (others); lds: the engine's "
    "per-layer damping.",
)
_SEED = typer.Option(0, "--seed", help="Seed of the setup's training and of the sampled points.")
_THREADS = typer.Option(1, "--threads", min=1, help="Torch CPU threads (the recorded timings use 1).")
_CACHE = typer.Option(
    None, "--cache", show_default="$INFLUENCER_CACHE/validate", help="Folder of cached trained setups."
)
_OUT = typer.Option(None, "--out", "-o", show_default="runs/validate/<name>", help="Folder for the results.")


@validate_app.command()
@_command
def experiment(
    ctx: typer.Context,
    setup: SetupChoice = _SETUP,
    size: SizeChoice = _SIZE,
    overrides: list[str] = _SET,
    measurements: int | None = _MEASUREMENTS,
    train_points: int | None = typer.Option(
        None, "--train-points", min=1, show_default="500; small: 40", help="Random training points compared."
    ),
    methods: str = typer.Option(
        "ekfac,kfac,lissa,gradient-dot",
        "--methods",
        help="Comma-separated, from ekfac, kfac, diagonal, lissa, gradient-dot, exact, ekfac-pcg (EK-FAC + CG).",
    ),
    damping: float | None = _DAMPING,
    damping_factor: float | None = _DAMPING_FACTOR,
    epsilon: float | None = typer.Option(None, "--epsilon", show_default="1/N", help="PBRF up-weighting ε."),
    pbrf_tol: float | None = typer.Option(
        None, "--pbrf-tol", show_default="3e-3; small: 1e-2", help="PBRF convergence tolerance."
    ),
    pbrf_max_steps: int | None = typer.Option(
        None, "--pbrf-max-steps", min=1, show_default="3000", help="Most Adam steps per PBRF solve."
    ),
    lissa_depth: int | None = typer.Option(
        None, "--lissa-depth", min=1, show_default="5000; small: 1000", help="LiSSA recursion steps."
    ),
    lissa_batch: int = typer.Option(128, "--lissa-batch", min=1, help="LiSSA mini-batch size."),
    lissa_repeats: int = typer.Option(1, "--lissa-repeats", min=1, help="LiSSA runs averaged."),
    pcg_iterations: int = typer.Option(10, "--pcg-iterations", min=0, help="CG steps of ekfac-pcg."),
    seed: int = _SEED,
    threads: int = _THREADS,
    cache: Path | None = _CACHE,
    out: Path | None = _OUT,
) -> None:
    """Paper Fig. 6/7: each method's Pearson and Spearman against the PBRF, and its wall time."""
    from influencer.progress import LogBars, use_bars
    from influencer.validate import run_experiment
    from influencer.validate.experiment import canonical_methods

    chosen = canonical_methods([m.strip() for m in methods.split(",") if m.strip()])
    say, setup_obj, tag = _prepare(setup, size, overrides, seed, threads, cache)
    folder = out or _out_root(ctx) / tag
    pbrf = {k: v for k, v in (("tol", pbrf_tol), ("max_steps", pbrf_max_steps)) if v is not None}
    lissa: dict[str, Any] = {"batch_size": lissa_batch, "repeats": lissa_repeats}
    if lissa_depth is not None:
        lissa["depth"] = lissa_depth
    from influencer.runs import locked_run

    with locked_run(folder, "validate"), use_bars(LogBars(say)):  # one writer per results folder
        result = run_experiment(
            setup_obj,
            measurements=measurements,
            train_points=train_points,
            methods=chosen,
            damping=damping,
            damping_factor=damping_factor,
            epsilon=epsilon,
            pbrf=pbrf or None,
            lissa=lissa,
            pcg_iterations=pcg_iterations,
            size=_value(size),
            seed=seed,
            checkpoint=folder / "pbrf-checkpoint",
            log=say,
            progress=True,
        )
        _finish(ctx, result, folder, f"{_value(setup)}.png", say)


@validate_app.command()
@_command
def lds(
    ctx: typer.Context,
    setup: SetupChoice = _SETUP,
    size: SizeChoice = _SIZE,
    overrides: list[str] = _SET,
    measurements: int | None = _MEASUREMENTS,
    subsets: int | None = typer.Option(
        None, "--subsets", min=2, show_default="100; small: 16", help="Models retrained on random subsets (M)."
    ),
    fraction: float = typer.Option(0.5, "--fraction", min=0.0, max=1.0, help="Each subset's share of the data."),
    strategies: str = typer.Option(
        "identity,diagonal,kfac,ekfac",
        "--strategies",
        help="Comma-separated, from identity, diagonal, kfac, ekfac, exact.",
    ),
    seeds: int = typer.Option(1, "--seeds", min=1, help="Initialisations averaged per subset."),
    damping: float | None = _DAMPING,
    damping_factor: float | None = _DAMPING_FACTOR,
    seed: int = _SEED,
    threads: int = _THREADS,
    cache: Path | None = _CACHE,
    out: Path | None = _OUT,
) -> None:
    """Linear datamodeling score: Spearman between predicted and actual measurements of retrained models."""
    from influencer.progress import LogBars, use_bars
    from influencer.validate import run_lds
    from influencer.validate.lds import STRATEGIES

    chosen = [s.strip() for s in strategies.split(",") if s.strip()]
    for name in chosen:
        if name not in STRATEGIES:
            raise UserError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
    say, setup_obj, tag = _prepare(setup, size, overrides, seed, threads, cache)
    folder = out or _out_root(ctx) / f"lds-{tag}"
    from influencer.runs import locked_run

    with locked_run(folder, "validate"), use_bars(LogBars(say)):  # one writer per results folder
        result = run_lds(
            setup_obj,
            subsets=subsets,
            fraction=fraction,
            measurements=measurements,
            strategies=chosen,
            damping=damping,
            damping_factor=damping_factor,
            seeds=seeds,
            size=_value(size),
            seed=seed,
            checkpoint=folder / "retrain-checkpoint",
            log=say,
            progress=True,
        )
        _finish(ctx, result, folder, f"lds-{_value(setup)}.png", say)


def _prepare(
    setup: Any, size: Any, overrides: list[str], seed: int, threads: int, cache: Path | None
) -> tuple[Callable[[str], None], Any, str]:
    """Threads, a timestamped logger, the trained (or cached) setup and its output name."""
    import torch

    from influencer.validate import load_setup
    from influencer.validate.outputs import parse_overrides

    torch.set_num_threads(threads)
    console, t0 = _console(), time.time()

    def say(msg: str) -> None:
        _say(console, f"[{time.time() - t0:7.0f}s] {msg}")

    settings = parse_overrides(overrides)
    s = load_setup(_value(setup), size=_value(size), seed=seed, cache=cache, log=say, **settings)
    return say, s, f"{_value(setup)}{'-small' if _value(size) == 'small' else ''}"


def _finish(ctx: typer.Context, result: Any, folder: Path, figure: str, say: Callable[[str], None]) -> None:
    from influencer.validate.outputs import save_run

    text = save_run(result, folder, figure=figure, command=_command_line(ctx), log=say)
    console = _console()
    console.print(text, highlight=False, markup=False, soft_wrap=True)  # (tables stay one row per line)
    console.print(f"setup: {result.setup_info}", highlight=False, markup=False, soft_wrap=True)
    say(f"wrote {folder}")


def _out_root(ctx: typer.Context) -> Path:
    """Where results go without ``--out``: ``runs/validate``, or what :func:`main`'s caller set."""
    return Path((ctx.obj or {}).get("out_root", "runs/validate"))


def _command_line(ctx: typer.Context) -> str:
    """The command as run: its path, then every option given on the command line (in declaration order)."""
    words: list[str] = []
    for param in ctx.command.params:
        source = None if param.name is None else ctx.get_parameter_source(param.name)
        if getattr(source, "name", None) != "COMMANDLINE":  # (typer vendors click: compare by name)
            continue
        flag = max(param.opts, key=len)
        value = ctx.params[param.name]
        for item in value if isinstance(value, (list, tuple)) else [value]:
            words += [flag, str(_value(item))]
    return " ".join([ctx.command_path, *(shlex.quote(w) for w in words)])


def main(argv: Sequence[str] | None = None, *, prog: str | None = None, command: str | None = None) -> int:
    """Run the validation commands from a command line; returns the exit status.

    prog: the program name shown in help and recorded in ``table.md`` (default ``python -m influencer.validate``).
    command: run this command (``experiment`` or ``lds``) with ``argv`` as its options — for wrapper scripts,
        whose results then default to ``benchmarks/out/validate/<name>``.
    """
    group = typer.main.get_command(validate_app)
    target = group if command is None else group.commands[command]  # type: ignore[attr-defined]
    obj = None if command is None else {"out_root": "benchmarks/out/validate"}  # (read by _out_root)
    try:
        _standalone(
            lambda **kw: target.main(args=argv, prog_name=prog or "python -m influencer.validate", obj=obj, **kw)
        )
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0
