"""The typer application and its global options."""

from __future__ import annotations

import typer

from influencer.cli._runtime import _SETTINGS, _Group

# every typer group of the command line: one-line errors, help without arguments, -h, plain tracebacks
GROUP_SETTINGS = {
    "cls": _Group,
    "no_args_is_help": True,
    "add_completion": False,
    "pretty_exceptions_enable": False,
    "context_settings": {"help_option_names": ["-h", "--help"]},
}

app = typer.Typer(
    name="influencer",
    help="Influence functions for language models (EK-FAC, Grosse et al. 2023): which training sequences "
    "would most increase log p(completion | prompt)?",
    **GROUP_SETTINGS,  # type: ignore[arg-type]
)


def _version(value: bool) -> None:
    if value:
        from influencer import __version__

        typer.echo(f"influencer {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback when something fails."),
    progress: bool | None = typer.Option(
        None,
        "--progress/--no-progress",
        show_default=False,
        help="Progress bars with ETA on stderr (default: when stderr is a terminal).",
    ),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Fit curvature on training data, scan it for the sequences that most influence your queries, report."""
    _SETTINGS.debug = debug
    _SETTINGS.progress = progress
