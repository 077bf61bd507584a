# ruff: noqa: B008  (typer declares options as argument defaults)
"""``influencer demo``: the end-to-end demo (SmolLM2-135M-Instruct de-quantized from a 4-bit GGUF, King James Bible)."""

from __future__ import annotations

from pathlib import Path

import typer

from influencer.cli._app import app
from influencer.cli._options import StrategyChoice, _value
from influencer.cli._progress import _live, _Timer
from influencer.cli._runtime import _command
from influencer.cli._shared import _quiet_transformers


@app.command()
@_command
def demo(
    verses: int = typer.Option(
        96, "--verses", min=1, help="Fit on the first N verses of Genesis (+ a few famous ones)."
    ),
    candidates: int = typer.Option(
        24, "--candidates", min=0, help="BM25 candidates per query from the whole Bible (0: the fitting verses)."
    ),
    layers: str = typer.Option(
        r"model\.layers\.[0-5]\.mlp\.", "--layers", help="Layer preset or regex (default: the MLPs of blocks 0-5)."
    ),
    rank: int = typer.Option(32, "--rank", min=1, help="Rank of the stored queries."),
    strategy: StrategyChoice = typer.Option(StrategyChoice.ekfac, "--strategy", help="Curvature approximation."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Sequences per pass."),
    top: int = typer.Option(3, "--top", min=1, help="Hits printed per query."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="Torch threads (default: torch's choice)."),
    out: Path = typer.Option(
        Path("runs/demo"), "--out", help="Folder for report.html (when influencer.report is available)."
    ),
) -> None:
    """Run the end-to-end demo: EK-FAC on SmolLM2-135M-Instruct, BM25 candidates from the whole King James Bible."""
    strategy = _value(strategy)
    from influencer import demo as demo_module

    _quiet_transformers()
    argv = [
        "--verses",
        str(verses),
        "--candidates",
        str(candidates),
        "--layers",
        layers,
        "--rank",
        str(rank),
        "--strategy",
        strategy,
        "--batch-size",
        str(batch_size),
        "--top",
        str(top),
        "--out",
        str(out),
    ]
    if threads:
        argv += ["--threads", str(threads)]
    with _live(_Timer()):
        demo_module.main(argv)
