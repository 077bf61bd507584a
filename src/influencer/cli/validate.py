# ruff: noqa: B008  (typer declares options as argument defaults)
"""``influencer validate``: influence estimates against the PBRF ground truth."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import typer

from influencer.cli._app import app
from influencer.cli._options import SizeChoice, _value
from influencer.cli._progress import _console
from influencer.cli._runtime import UserError, _command
from influencer.cli._shared import _say


@app.command()
@_command
def validate(
    setup: str = typer.Argument("concrete", help="Validation setup (e.g. concrete, digits, mnist, kjv-lm)."),
    size: SizeChoice = typer.Option(
        SizeChoice.small, "--size", help="small: a quick check; full: the paper-sized experiment."
    ),
    measurements: int | None = typer.Option(
        None, "--measurements", min=1, show_default="the suite's default", help="Held-out queries."
    ),
    train_points: int | None = typer.Option(
        None, "--train-points", min=1, show_default="the suite's default", help="Training points compared."
    ),
    methods: str | None = typer.Option(
        None,
        "--methods",
        show_default="the suite's default",
        help="Comma-separated methods (ekfac, kfac, diagonal, lissa, gradient-dot, exact).",
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Folder to save the results in."),
) -> None:
    """Compare influence estimates with the PBRF ground truth (paper §5.1); prints a table of correlations."""
    size = _value(size)
    try:
        validation = importlib.import_module("influencer.validate")  # (sys.modules first: tests swap it)
    except ModuleNotFoundError as exc:
        if exc.name not in ("influencer.validate",):
            raise
        raise UserError(
            "this build of influencer has no validation suite (influencer.validate); update influencer"
        ) from None
    run_experiment = getattr(validation, "run_experiment", None)
    if run_experiment is None:
        raise UserError("influencer.validate has no run_experiment(); update influencer")
    console = _console()
    kwargs: dict[str, Any] = {"size": size, "log": lambda msg: _say(console, str(msg))}
    if measurements is not None:
        kwargs["measurements"] = measurements
    if train_points is not None:
        kwargs["train_points"] = train_points
    if methods:
        kwargs["methods"] = [m.strip() for m in methods.split(",") if m.strip()]
    result = run_experiment(setup, **kwargs)
    _say(console, result.to_markdown() if hasattr(result, "to_markdown") else str(result))
    if out is not None and hasattr(result, "save"):
        result.save(out)
        _say(console, f"wrote {out}")
