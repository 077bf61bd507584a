"""Pieces the commands share: the hooks a command passes to the library, model loading, console output.

A refused request (:class:`influencer.runs.RequestError`) names its parameter; ``_runtime`` prints it as the option."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from influencer.cli._progress import _Timer
from influencer.cli._runtime import _SETTINGS, _agree, _main_rank
from influencer.runs.checks import RunHooks, load_model_timed

if TYPE_CHECKING:
    from rich.console import Console


def _quiet_transformers() -> None:
    """No transformers warnings or weight-loading bars on the command line (unless --debug)."""
    if _SETTINGS.debug:
        return
    with contextlib.suppress(Exception):
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()


def _hooks(console: Console, timer: _Timer) -> RunHooks:
    """The library's hooks on the command line: the stage table, messages on rank 0, all ranks agreeing, bars."""

    def say(text: str) -> None:
        if _main_rank():
            _say(console, text)

    return RunHooks(timer=timer, say=say, agree=_agree, progress=True)


def _load_model(timer: _Timer, source: str, dtype: str, device: str) -> tuple[Any, Any]:
    _quiet_transformers()
    return load_model_timed(timer, source, dtype, device)


def _say(console: Console, text: str) -> None:
    console.print(text, highlight=False, markup=False)
