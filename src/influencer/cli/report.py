# ruff: noqa: B008  (typer declares options as argument defaults)
"""``influencer report``: the HTML report of a run's scan."""

from __future__ import annotations

from pathlib import Path

import typer

from influencer.cli._app import app
from influencer.cli._progress import _console, _live, _Timer
from influencer.cli._runtime import UserError, _command
from influencer.cli._shared import _quiet_transformers, _say


@app.command()
@_command
def report(
    run: Path = typer.Argument(..., help="Run directory with a finished scan."),
    out: Path | None = typer.Option(None, "--out", "-o", show_default="RUN/report.html", help="HTML file to write."),
    top: int = typer.Option(10, "--top", min=1, help="Hits shown per query."),
    title: str | None = typer.Option(None, "--title", show_default="from the run", help="Report title."),
) -> None:
    """Write an HTML report of a run's scan: top hits per query with token highlights, layers, tails."""
    try:
        import influencer.report  # noqa: F401  (the report extra: a clear error when it is missing)
    except ModuleNotFoundError as exc:
        if exc.name not in ("influencer.report",):
            raise
        raise UserError(
            "this build of influencer has no report module (influencer.report); update influencer"
        ) from None
    from influencer.runs import Run

    console = _console()
    timer = _Timer()
    opened = Run.open(run)
    with _live(timer):
        _quiet_transformers()
        target = opened.report(out, top=top, title=title, timer=timer)
    _say(console, f"wrote {target}")
