"""Pieces the commands share: the hooks a command passes to the library, option checks spelled as options."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from influencer.cli._progress import _Timer
from influencer.cli._runtime import _SETTINGS, UserError, _agree, _main_rank
from influencer.runs.checks import RequestError, RunHooks, check_number, load_model_timed, parse_budget

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


def _option(parameter: str) -> str:
    """A library parameter as its command-line option: ``damping_factor`` → ``--damping-factor``."""
    return "--" + parameter.replace("_", "-")


def _user_error(exc: RequestError) -> UserError:
    return UserError(exc.render(_option))


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


def _check_number(
    option: str, value: float | None, *, above: float | None = None, at_least: float | None = None
) -> None:
    """Refuse a numeric option that is NaN, infinite or out of range (before anything is loaded)."""
    try:
        check_number(option.lstrip("-").replace("-", "_"), value, above=above, at_least=at_least)
    except RequestError as exc:
        raise _user_error(exc) from None


def _budget_option(text: str) -> int | None:
    """``--memory-budget``: None (auto), -1 (off) or bytes; a UserError naming the option otherwise."""
    try:
        return parse_budget(text)
    except RequestError as exc:
        raise _user_error(exc) from None
