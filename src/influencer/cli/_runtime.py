"""How a command runs: one-line errors, --debug, and torchrun ranks (rank 0 speaks and writes)."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import typer
from typer.core import TyperGroup

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


@dataclass
class _Settings:
    debug: bool = False
    progress: bool | None = None  # None: when stderr is a terminal
    joined: bool = False  # this torchrun rank has joined the process group


_SETTINGS = _Settings()


class _Group(TyperGroup):
    """Turns usage errors into the same one-line ``error: ...`` as every other failure."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        parent = super()
        _standalone(lambda **kw: parent.main(*args, **kw, **kwargs))


def _standalone(main: Callable[..., Any]) -> NoReturn:
    """Run a click ``main`` (called with ``standalone_mode=False``) and exit: usage errors print one line
    ``error: ...`` (status 2), an interrupt ``error: interrupted`` (130)."""
    try:
        code = main(standalone_mode=False)
    except typer.Abort:
        typer.echo("error: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        if not _is_click_error(exc):
            raise
        message = _one_line(exc.format_message())
        if message and _main_rank():  # (empty: the help was shown; other torchrun ranks stay quiet)
            ctx = getattr(exc, "ctx", None)
            hint = f" (see: {ctx.command_path} --help)" if ctx is not None and exc.exit_code == 2 else ""
            typer.echo(f"error: {message}{hint}", err=True)
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


def _is_click_error(exc: BaseException) -> bool:
    """A (possibly vendored) click ClickException: bad command line and the like."""
    return hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _message(exc: BaseException) -> str:
    """A one-line description of an exception for the user."""
    from influencer.curvature import CurvatureMismatchError
    from influencer.io import RunLockedError
    from influencer.runs.checks import RequestError

    if isinstance(exc, RequestError):  # a library parameter, spelled as its option
        return _one_line(exc.render(lambda p: "--" + p.replace("_", "-")))
    if isinstance(exc, RunLockedError):
        return _one_line(str(exc))
    if isinstance(exc, CurvatureMismatchError):
        return f"the curvature does not match the model: {_one_line(str(exc))}"
    if isinstance(exc, OSError) and exc.filename is not None and not isinstance(exc, ModuleNotFoundError):
        return f"{exc.filename}: {exc.strerror or _one_line(str(exc))}"
    if isinstance(exc, (ValueError, ImportError, TypeError, LookupError)) and str(exc):
        return _one_line(str(exc))
    return f"{type(exc).__name__}: {_one_line(str(exc))} (run with --debug for the traceback)"


def _command(fn: F) -> F:
    """Run a command body; any exception becomes ``error: ...`` on stderr and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            if _SETTINGS.debug:
                raise
            typer.echo("error: interrupted (an unfinished scan resumes when run again)", err=True)
            raise typer.Exit(130) from None
        except Exception as exc:
            if isinstance(exc, _Reported):
                raise typer.Exit(1) from None  # rank 0 printed the error
            if _is_echo(exc) and not _SETTINGS.debug:  # the rank where it failed prints the error
                _linger()
                raise typer.Exit(1) from None
            if _SETTINGS.debug or _is_click_error(exc):
                raise
            if not _main_rank() and _rank_known():
                typer.echo(f"error: rank {_rank()}: {_message(exc)}", err=True)
            elif _main_rank():
                typer.echo(f"error: {_message(exc)}", err=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


class UserError(ValueError):
    """A bad command-line request (printed as one line)."""


# --------------------------------------------------------------------------------------------------------
# torchrun: one process per rank, rank 0 speaks and writes
# --------------------------------------------------------------------------------------------------------


def _under_torchrun() -> bool:
    """True in a process started by torchrun (or any env:// launcher) with more than one process."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def _rank() -> int:
    """This process's global rank (torchrun's ``RANK``; 0 in a plain process)."""
    if not _under_torchrun():
        return 0
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _main_rank() -> bool:
    """Rank 0 (or a plain process): the one that prints tables and progress and writes run files."""
    return _rank() == 0


def _rank_known() -> bool:
    """Inside the process group: an error here may be this rank's alone (before joining, every rank runs the same
    deterministic option checks, so rank 0 speaks for all)."""
    return _SETTINGS.joined


class _Reported(Exception):
    """Exit with status 1 and no message: rank 0 prints the error (see :func:`_agree`)."""


def _linger(seconds: float = 10.0) -> None:
    """A rank that fails because rank 0 failed waits a little before exiting: torchrun stops every process as soon
    as one exits with an error, and rank 0 may still be printing it."""
    if _under_torchrun() and not _main_rank():
        time.sleep(seconds)


_PEER_LOST = re.compile(r"closed by peer|reset by peer|remote (worker|process)|broken pipe", re.I)


def _is_echo(exc: BaseException) -> bool:
    """Another rank's failure seen here: raised by ``run_collectively``, or a collective that broke because a peer
    process died. The rank where it failed prints the error (torchrun's report names it too)."""
    from influencer.distributed import RankFailedError

    if isinstance(exc, RankFailedError):
        return True
    if not _SETTINGS.joined:
        return False
    import torch.distributed as tdist

    return isinstance(exc, tdist.DistError) or (isinstance(exc, RuntimeError) and bool(_PEER_LOST.search(str(exc))))


def _torchrun_cuda(name: str) -> bool:
    """Whether ``--device name`` puts this torchrun rank on a GPU it can have to itself (then NCCL, else gloo;
    an impossible request is reported by :func:`_resolve_device` once the group is up)."""
    import torch

    if name != "auto" and not name.startswith("cuda"):
        return False
    if not torch.cuda.is_available():
        return False
    from influencer.distributed import local_rank

    return name in ("auto", "cuda") and local_rank() < torch.cuda.device_count()


@contextlib.contextmanager
def _process_group(device: str) -> Iterator[None]:
    """Under torchrun (``WORLD_SIZE`` > 1) join the process group for the command and leave it at the end: NCCL
    when the command runs on CUDA (each rank on ``cuda:LOCAL_RANK``), gloo on the CPU. A plain process is left
    alone."""
    if not _under_torchrun():
        yield
        return
    import influencer.distributed as dist

    backend = "nccl" if _torchrun_cuda(device) else "gloo"
    dist.init(backend=backend)
    _SETTINGS.joined = True
    try:
        yield
        dist.barrier()  # nobody leaves while rank 0 still writes or prints
    except BaseException:
        if backend == "gloo":  # (NCCL: a peer may be inside a collective; the process exit tears it down)
            with contextlib.suppress(Exception):
                dist.shutdown()
        raise
    dist.shutdown()


def _agree(fn: Callable[[], T]) -> T:
    """Run ``fn`` (checks, loading) on every rank; if it fails on any, it fails on every rank and rank 0 prints
    one error (its own, else the first failing rank's). So no rank starts the collective work alone, and a failed
    check ends every process instead of leaving the others waiting. In one process: ``fn()``."""
    import influencer.distributed as dist

    if dist.world_size() == 1:
        return fn()
    result: T | None = None
    error: Exception | None = None
    try:
        result = fn()
    except Exception as exc:
        error = exc
    messages = dist.all_gather_object(None if error is None else _message(error))
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if not failed:
        return result  # type: ignore[return-value]
    if error is not None and _SETTINGS.debug:
        traceback.print_exception(error)
    elif dist.is_main():
        r, message = failed[0]
        typer.echo(f"error: {message}" if r == 0 else f"error: rank {r}: {message}", err=True)
    dist.barrier()  # nobody exits (and so gets every process stopped) before rank 0 has printed
    raise _Reported()
