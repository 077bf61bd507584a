# ruff: noqa: B008  (typer declares options as argument defaults)
"""The ``influencer`` command line: fit, scan, report, demo, validate.

    influencer fit smollm2-135m kjv --sequences 256 --out runs/kjv
    influencer scan runs/kjv --prompt "In the beginning God created" --completion " the heaven and the earth."
    influencer report runs/kjv

Every error the user can cause prints one line ``error: ...`` and exits with status 1 (2 for a bad command
line); ``--debug`` shows the traceback instead. Nothing is written before the inputs have been checked, and
run directories are only ever replaced atomically (see :mod:`influencer.runs`).

Under torchrun (``torchrun --standalone --nproc-per-node K -m influencer fit|scan …``) every process joins the
group (gloo on the CPU, NCCL on ``cuda:LOCAL_RANK``) and does its share; rank 0 alone checks and writes the run
directory and prints. Checks and loading run on every rank before the collective work and a failure on any rank
ends them all, with one ``error: ...`` line from rank 0.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from typer.core import TyperGroup

if TYPE_CHECKING:
    import torch
    from rich.console import Console
    from rich.progress import Progress
    from rich.text import Text

    from influencer.data import Documents, Sequences

__all__ = ["app"]

F = TypeVar("F", bound=Callable[..., Any])

LAYER_PRESETS = ("mlp", "attention", "all")


class _Choice(str, Enum):
    """A fixed set of option values (typer lists them in --help and rejects others)."""

    def __str__(self) -> str:
        return str(self.value)


class StrategyChoice(_Choice):
    identity = "identity"
    diagonal = "diagonal"
    kfac = "kfac"
    ekfac = "ekfac"


class FisherChoice(_Choice):
    true = "true"
    empirical = "empirical"


class FormatChoice(_Choice):
    auto = "auto"
    text = "text"
    jsonl = "jsonl"
    hf = "hf"
    kjv = "kjv"


class UnitChoice(_Choice):
    line = "line"
    file = "file"


class TruncationChoice(_Choice):
    error = "error"
    right = "right"
    left = "left"


class DtypeChoice(_Choice):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float64 = "float64"


class SizeChoice(_Choice):
    small = "small"
    full = "full"


def _value(choice: Any) -> Any:
    """The plain string of an option choice (None stays None)."""
    return choice.value if isinstance(choice, Enum) else choice


_DATA = "Training data"
_CURV = "Curvature"
_QUERY = "Queries"
_SCAN = "Scan"
_RUN = "Run"


# --------------------------------------------------------------------------------------------------------
# Errors: one line, no traceback (unless --debug)
# --------------------------------------------------------------------------------------------------------


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
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
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

T = TypeVar("T")


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


# --------------------------------------------------------------------------------------------------------
# Progress bars and stage timings
# --------------------------------------------------------------------------------------------------------


@dataclass
class _Stage:
    name: str
    depth: int
    seconds: float | None = None
    detail: str = ""


@dataclass
class _Timer:
    """Wall time of each stage; library bars (fit passes, scan, …) are recorded as sub-stages."""

    stages: list[_Stage] = field(default_factory=list)
    depth: int = 0
    progress: Progress | None = None  # while bars are live: a spinner per running stage

    @contextlib.contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[_Stage]:
        row = _Stage(name, self.depth, detail=detail)
        self.stages.append(row)
        self.depth += 1
        task = self.progress.add_task(name, total=None, unit="") if self.progress is not None else None
        start = time.perf_counter()
        try:
            yield row
        finally:
            row.seconds = time.perf_counter() - start
            self.depth -= 1
            if task is not None and self.progress is not None:
                self.progress.remove_task(task)

    def as_dict(self) -> dict[str, float]:
        """Seconds per finished stage, sub-stages keyed "stage/sub-stage"."""
        out: dict[str, float] = {}
        path: list[str] = []
        for row in self.stages:
            path = [*path[: row.depth], row.name]
            if row.seconds is not None:
                key = "/".join(path)
                out[key] = round(out.get(key, 0.0) + row.seconds, 3)
        return out


class _RichBar:
    def __init__(self, owner: _Bars, desc: str, total: int | None, unit: str):
        self.owner, self.desc, self.unit, self.count = owner, desc, unit, 0
        self.start = time.perf_counter()
        self.row = _Stage(desc, owner.timer.depth)
        owner.timer.stages.append(self.row)
        self.task = owner.progress.add_task(desc, total=total, unit=unit)

    def update(self, n: int = 1) -> None:
        self.count += n
        self.owner.progress.advance(self.task, n)

    def close(self) -> None:
        if self.row.seconds is not None:
            return
        self.row.seconds = time.perf_counter() - self.start
        self.row.detail = f"{self.count} {self.unit}"
        self.owner.progress.remove_task(self.task)
        if self.owner.show:
            self.owner.progress.console.print(
                f"  {self.desc}: {self.row.detail} in {_seconds(self.row.seconds)}", highlight=False
            )


class _Bars:
    """A progress-bar factory for :func:`influencer.progress.use_bars`: rich bars with ETA on stderr."""

    def __init__(self, timer: _Timer, show: bool, console: Console | None = None):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.timer, self.show = timer, show
        self.progress: Progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console or Console(stderr=True),
            disable=not show,
            transient=True,
            redirect_stdout=sys.stdout.isatty(),
            redirect_stderr=False,
        )  # keep piped stdout out of the bars

    def __call__(self, desc: str, total: int | None, unit: str) -> _RichBar:
        return _RichBar(self, desc, total, unit)


@contextlib.contextmanager
def _live(timer: _Timer) -> Iterator[None]:
    """Show library progress as rich bars (when enabled) and record their timings."""
    from influencer.progress import use_bars

    show = (_SETTINGS.progress if _SETTINGS.progress is not None else sys.stderr.isatty()) and _main_rank()
    bars = _Bars(timer, show)
    timer.progress = bars.progress
    try:
        with bars.progress, use_bars(bars):
            yield
    finally:
        timer.progress = None


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} bytes"  # pragma: no cover


def _seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.2f} s" if s < 60 else f"{int(s // 60)} min {s % 60:04.1f} s"


def _timing_table(console: Console, timer: _Timer, title: str) -> None:
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    table.add_column("stage")
    table.add_column("time", justify="right")
    table.add_column("", style="dim")
    for row in timer.stages:
        table.add_row("  " * row.depth + row.name, _seconds(row.seconds), row.detail)
    total = sum(r.seconds or 0.0 for r in timer.stages if r.depth == 0)
    table.add_row("total", _seconds(total), "", style="bold")
    console.print(table)


def _timings_title(command: str, processes: int) -> str:
    if processes == 1:
        return f"{command} timings"
    return f"{command} timings (rank 0 of {processes} processes)"


def _console() -> Console:
    """stdout for tables and messages; silent on torchrun ranks other than 0."""
    from rich.console import Console

    return Console(highlight=False, quiet=not _main_rank())


# --------------------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------------------


def _quiet_transformers() -> None:
    """No transformers warnings or weight-loading bars on the command line (unless --debug)."""
    if _SETTINGS.debug:
        return
    with contextlib.suppress(Exception):
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()


def _resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"--device {name}: no CUDA device is available here (torch {torch.__version__}); use --device cpu"
        )
    if device.type == "cuda" and _under_torchrun():  # one GPU per process: cuda:LOCAL_RANK
        from influencer.distributed import local_rank

        if device.index is not None:
            raise UserError(
                f"--device {name}: under torchrun every process uses cuda:LOCAL_RANK; pass --device "
                "cuda (choose the GPUs with CUDA_VISIBLE_DEVICES)"
            )
        if local_rank() >= torch.cuda.device_count():
            raise UserError(
                f"torchrun started local rank {local_rank()} but this node has "
                f"{torch.cuda.device_count()} GPUs; use --nproc-per-node {torch.cuda.device_count()}"
            )
        return f"cuda:{local_rank()}"
    return name


def _model_source(name: str) -> str:
    """A built-in model name as given; a folder as an absolute path (so the run works from anywhere)."""
    from influencer.models import builtin_models

    if name.lower() in builtin_models():
        return name.lower()
    return str(Path(name).expanduser().resolve())


def _data_source(name: str) -> str:
    return "kjv" if name.lower() == "kjv" else str(Path(name).expanduser().resolve())


def _load_model(timer: _Timer, source: str, dtype: str, device: str) -> tuple[Any, Any]:
    from influencer.models import load_model

    with timer.stage("load model", source if len(source) < 40 else "…" + source[-39:]):
        _quiet_transformers()
        return load_model(source, dtype=dtype, device=device)


def _data_settings(
    data: str,
    fmt: str,
    field_name: str,
    text_unit: str,
    split: str,
    sequences: int | None,
    max_length: int | None,
    packing: bool,
    truncation: str,
    bos: bool,
    eos: bool | None,
) -> dict[str, Any]:
    from influencer.data import detect_format

    source = _data_source(data)
    resolved = detect_format(source) if fmt == "auto" else fmt
    if packing and max_length is None:
        raise UserError("--packing needs --max-length (the length of every packed sequence)")
    settings: dict[str, Any] = {"source": source, "format": resolved}
    if resolved in ("jsonl", "hf"):
        settings["field"] = field_name
    if resolved == "text":
        settings["text_unit"] = text_unit
    if resolved == "hf":
        settings["split"] = split
    settings.update(
        {
            "sequences": sequences,
            "max_length": max_length,
            "packing": packing,
            "truncation": truncation,
            "bos": bos,
            "eos": eos,
        }
    )
    return settings


def _read_training(timer: _Timer, tokenizer: Any, settings: dict[str, Any]) -> tuple[Documents, Sequences]:
    from influencer.data import load_documents, make_sequences

    with timer.stage("read data") as row:
        docs = load_documents(
            settings["source"],
            format=settings["format"],
            field=settings.get("field", "text"),
            unit=settings.get("text_unit", "line"),
            split=settings.get("split", "train"),
            max_documents=None if settings["packing"] else settings["sequences"],
        )
        row.detail = f"{len(docs)} documents"
    with timer.stage("tokenize") as row:
        seqs = make_sequences(
            tokenizer,
            docs,
            max_length=settings["max_length"],
            packing=settings["packing"],
            truncation=settings["truncation"],
            add_bos=settings["bos"],
            add_eos=settings["eos"],
            max_sequences=settings["sequences"],
        )
        row.detail = f"{len(seqs)} sequences"
    return docs, seqs


def _data_record(settings: dict[str, Any], docs: Documents, seqs: Sequences) -> dict[str, Any]:
    from influencer.data import sequence_digest

    return {
        **settings,
        "documents_skipped": docs.skipped,
        "report": seqs.report.as_dict(),
        "digest": sequence_digest(seqs.batch),
    }


def _check_positions(model: Any, batch: dict[str, Any], what: str, option: str) -> None:
    """Refuse sequences longer than the model's context instead of failing inside its forward pass."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    longest = int(batch["attention_mask"].sum(1).max()) if len(batch["attention_mask"]) else 0
    if isinstance(limit, int) and longest > limit:
        raise UserError(
            f"the {what} have up to {longest} tokens but the model reads at most {limit} positions; lower {option}"
        )


def _say(console: Console, text: str) -> None:
    console.print(text, highlight=False, markup=False)


def _check_layers(model: Any, spec: str) -> list[Any]:
    from influencer.layers import select_layers

    try:
        return select_layers(model, spec)
    except ValueError as exc:
        if re.fullmatch(r"[A-Za-z_]+", spec) and spec not in LAYER_PRESETS:
            raise UserError(
                f"unknown layer preset {spec!r}: use one of {', '.join(LAYER_PRESETS)}, or a regex "
                r"of module names such as 'layers\.[0-3]\.mlp\.'"
            ) from None
        raise UserError(f"--layers: {_one_line(str(exc))}") from None


# --------------------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------------------

app = typer.Typer(
    name="influencer",
    cls=_Group,
    help="Influence functions for language models (EK-FAC, Grosse et al. 2023): which training sequences "
    "would most increase log p(completion | prompt)?",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
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


# ------------------------------------------------------------------------------------------------------ fit


@app.command()
@_command
def fit(
    model: str = typer.Argument(..., help="A local Hugging Face causal-LM folder, or the built-in smollm2-135m."),
    data: str = typer.Argument(
        ...,
        help="Training data: a .txt or .jsonl file, a folder of .txt files, a local Hugging Face dataset "
        "(.json/.csv/.parquet file or folder), or kjv (the built-in King James Bible).",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory to create.", rich_help_panel=_RUN),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing fit in --out (and its scans).", rich_help_panel=_RUN
    ),
    fmt: FormatChoice = typer.Option(
        FormatChoice.auto,
        "--format",
        help="Format of DATA (auto: from the suffix / folder contents).",
        rich_help_panel=_DATA,
    ),
    field_name: str = typer.Option(
        "text", "--field", help="Text field of jsonl / Hugging Face data.", rich_help_panel=_DATA
    ),
    text_unit: UnitChoice = typer.Option(
        UnitChoice.line,
        "--text-unit",
        help="Plain text: one document per non-blank line, or per file.",
        rich_help_panel=_DATA,
    ),
    split: str = typer.Option("train", "--split", help="Split of a Hugging Face dataset.", rich_help_panel=_DATA),
    sequences: int | None = typer.Option(
        None,
        "--sequences",
        "-n",
        min=1,
        show_default="all",
        help="Fit on the first N sequences.",
        rich_help_panel=_DATA,
    ),
    max_length: int | None = typer.Option(
        512,
        "--max-length",
        min=2,
        help="Tokens per sequence (the packed length with --packing).",
        rich_help_panel=_DATA,
    ),
    packing: bool = typer.Option(
        False,
        "--packing/--no-packing",
        help="Join documents and cut them into --max-length sequences, instead of one sequence per document.",
        rich_help_panel=_DATA,
    ),
    truncation: TruncationChoice = typer.Option(
        TruncationChoice.right,
        "--truncation",
        help="A document longer than --max-length: error, keep its start (right), or "
        "keep its end (left). The count is reported.",
        rich_help_panel=_DATA,
    ),
    bos: bool = typer.Option(
        False, "--bos/--no-bos", help="Prepend the BOS token to every document.", rich_help_panel=_DATA
    ),
    eos: bool | None = typer.Option(
        None,
        "--eos/--no-eos",
        show_default="with --packing",
        help="Append the EOS token to every document.",
        rich_help_panel=_DATA,
    ),
    layers: str = typer.Option(
        "mlp",
        "--layers",
        "-l",
        help="Tracked layers: a preset (mlp, attention, all) or a regex of module names.",
        rich_help_panel=_CURV,
    ),
    strategy: StrategyChoice = typer.Option(
        StrategyChoice.ekfac, "--strategy", help="Curvature approximation.", rich_help_panel=_CURV
    ),
    fisher: FisherChoice = typer.Option(
        FisherChoice.true,
        "--fisher",
        help="true: labels sampled from the model; empirical: the data's labels.",
        rich_help_panel=_CURV,
    ),
    damping: float | None = typer.Option(
        None,
        "--damping",
        min=0.0,
        show_default="factor × mean(Λ)",
        help="Absolute damping λ for every layer.",
        rich_help_panel=_CURV,
    ),
    damping_factor: float = typer.Option(
        0.1,
        "--damping-factor",
        help="λ_l = factor × mean eigenvalue of layer l (when no --damping).",
        rich_help_panel=_CURV,
    ),
    blocks: int = typer.Option(
        1, "--blocks", min=1, help="Block-diagonal factors with this many blocks.", rich_help_panel=_CURV
    ),
    n_train: int | None = typer.Option(
        None,
        "--n-train",
        min=1,
        show_default="fitted sequences",
        help="Training-set size N for per-copy units (I / N).",
        rich_help_panel=_CURV,
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampled labels.", rich_help_panel=_CURV),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, help="Sequences per forward/backward pass."),
    device: str = typer.Option("auto", "--device", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N."),
    dtype: DtypeChoice = typer.Option(
        DtypeChoice.float32, "--dtype", help="Model weights dtype (the curvature math runs in float32/float64)."
    ),
) -> None:
    """Fit the curvature (EK-FAC by default) of MODEL on DATA and write a run directory.

    The run directory holds the curvature (curvature/) and run.json: model and data sources, settings, sizes,
    versions and stage timings. Example: influencer fit smollm2-135m kjv -n 256 --out runs/kjv
    """
    fmt, text_unit, truncation = _value(fmt), _value(text_unit), _value(truncation)
    strategy, fisher, dtype = _value(strategy), _value(fisher), _value(dtype)
    import influencer as inf
    from influencer.runs import CURVATURE, FORMAT, RUN_FILE, VERSION, check_fit_target, versions, write_fit

    console = _console()
    timer = _Timer()
    with _process_group(device), _live(timer):
        import influencer.distributed as dist

        def check() -> tuple[Path, str, str, dict[str, Any]]:
            # rank 0 decides about the run directory (it alone writes it); the option checks run everywhere
            target = check_fit_target(out, overwrite=overwrite) if dist.is_main() else Path(out).expanduser()
            return (
                target,
                _resolve_device(device),
                _model_source(model),
                _data_settings(
                    data, fmt, field_name, text_unit, split, sequences, max_length, packing, truncation, bos, eos
                ),
            )

        target, device, model_source, settings = _agree(check)

        def load() -> tuple[Any, Any, Documents, Sequences, list[Any]]:
            net, tok = _load_model(timer, model_source, dtype, device)
            docs, seqs = _read_training(timer, tok, settings)
            _say(console, f"data: {seqs.report.summary()}")
            _check_positions(net, seqs.batch, "training sequences", "--max-length")
            return net, tok, docs, seqs, _check_layers(net, layers)

        net, tok, docs, seqs, tracked = _agree(load)
        task = inf.CausalLM(pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0)
        with timer.stage("fit", f"{strategy}, {len(tracked)} layers"):
            curv = inf.fit_curvature(
                net,
                task,
                seqs.batch,
                strategy=strategy,
                fisher=fisher,
                damping=damping,
                damping_factor=damping_factor,
                layers=[x.name for x in tracked],
                blocks=blocks,
                batch_size=batch_size,
                n_train=n_train,
                seed=seed,
                progress=True,
            )
        record = {
            "format": FORMAT,
            "version": VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model": {
                "source": model_source,
                "class": type(net).__name__,
                "dtype": dtype,
                "device": device,
                "parameters": sum(p.numel() for p in net.parameters()),
            },
            "data": _data_record(settings, docs, seqs),
            "fit": {
                "strategy": strategy,
                "fisher": fisher,
                "layers": layers,
                "tracked_layers": curv.layer_names,
                "damping": damping,
                "damping_factor": damping_factor,
                "blocks": blocks,
                "seed": seed,
                "batch_size": batch_size,
                "n_fit": curv.n_fit,
                "n_train": curv.n_train,
                "factor_bytes": curv.nbytes(),
                "processes": dist.world_size(),
            },
            "versions": versions(),
        }
        record["timings"] = timer.as_dict()
        with timer.stage("save"):

            def write(tmp: Path) -> None:
                curv.save(tmp / CURVATURE)
                (tmp / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

            dist.run_collectively(lambda: write_fit(target, write))  # rank 0 writes; a failure fails every rank
        processes = dist.world_size()
    _say(
        console,
        f"fitted {strategy} on {len(curv.layers)} layers × {curv.n_fit} sequences "
        f"(factors {_size(curv.nbytes())}) → {target}",
    )
    _timing_table(console, timer, _timings_title("fit", processes))


# ----------------------------------------------------------------------------------------------------- scan


def _queries_from_options(
    queries: Path | None, prompt: list[str] | None, completion: list[str] | None
) -> list[dict[str, str]]:
    from influencer.data import DataError, read_queries

    prompt, completion = prompt or [], completion or []
    if queries is not None and (prompt or completion):
        raise UserError("give queries either with --queries or with --prompt/--completion, not both")
    if queries is not None:
        return read_queries(queries)
    if not prompt and not completion:
        raise UserError("no queries: pass --queries FILE.jsonl or --prompt TEXT --completion TEXT")
    if len(prompt) != len(completion):
        raise UserError(
            f"got {len(prompt)} --prompt but {len(completion)} --completion; pair each prompt with a completion"
        )
    out = []
    for i, (p, c) in enumerate(zip(prompt, completion, strict=True), 1):
        if not c.strip():
            raise DataError(f"--completion {i} is empty; a query measures log p(completion | prompt), so give one")
        out.append({"prompt": p, "completion": c, "source": f"--prompt {i}"})
    return out


def _scan_data_settings(recorded: dict[str, Any], data: str | None, **given: Any) -> dict[str, Any]:
    """The recorded data settings of the fit, overridden by the options given (None = as recorded)."""
    if data is None:
        settings = {
            k: recorded[k]
            for k in (
                "source",
                "format",
                "field",
                "text_unit",
                "split",
                "sequences",
                "max_length",
                "packing",
                "truncation",
                "bos",
                "eos",
            )
            if k in recorded
        }
        if given.get("sequences") is not None:
            settings["sequences"] = given["sequences"]
        if any(given.get(k) is not None for k in given if k != "sequences"):
            raise UserError(
                "data options other than --sequences need --data (without it the fit's data is "
                "scanned exactly as it was fitted)"
            )
        return settings

    def pick(key: str, default: Any) -> Any:
        value = given.get(key)
        return value if value is not None else recorded.get(key, default)

    # another data set: its format is detected afresh; tokenization settings default to the fit's
    return _data_settings(
        data,
        given.get("format") or "auto",
        pick("field", "text"),
        pick("text_unit", "line"),
        pick("split", "train"),
        given.get("sequences"),
        pick("max_length", 512),
        pick("packing", False),
        pick("truncation", "right"),
        pick("bos", False),
        pick("eos", None),
    )


def _refine_batch(
    timer: _Timer,
    tok: Any,
    record: dict[str, Any],
    settings: dict[str, Any],
    seqs: Sequences,
    data: str | None,
    steps: int,
    first: int | None,
) -> dict[str, Any] | None:
    """The fit's sequences (the data the curvature describes), first ``first`` of them, for ``--refine``."""
    if steps == 0:
        if first is not None:
            raise UserError("--refine-sequences needs --refine N (N ≥ 1 steps)")
        return None
    import torch

    from influencer.data import sequence_digest

    if data is None and settings.get("sequences") == record["data"].get("sequences"):
        fit = seqs  # the scanned data is the fit's data
    else:
        with timer.stage("refinement data", "the fit's sequences"):
            _, fit = _read_training(timer, tok, _scan_data_settings(record["data"], None))
        if record["data"].get("digest") not in (None, sequence_digest(fit.batch)):
            raise UserError(
                f"the fit's training data at {record['data'].get('source')} changed since the fit (other "
                "tokens), so --refine has no data the curvature describes"
            )
    n = int(fit.batch["input_ids"].shape[0])
    take = n if first is None else min(first, n)
    return {k: v[:take] if isinstance(v, torch.Tensor) else v for k, v in fit.batch.items()}


def _short_layer(name: str, names: Sequence[str]) -> str:
    """``name`` without the dotted prefix all tracked layers share (``model.layers.``)."""
    parts = [n.split(".") for n in names]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    return ".".join(name.split(".")[common:]) or name


def _snippet(tok: Any, ids: torch.Tensor, tokens: torch.Tensor | None, *, width: int = 140, highlight: int = 3) -> Text:
    """The sequence's text around its most influential token, the top tokens in bold reverse."""
    from rich.text import Text

    pieces = [tok.decode([int(t)]).replace("\n", "⏎") for t in ids]
    top: set[int] = set()
    center = 0
    if tokens is not None and len(tokens):
        top = set(tokens.topk(min(highlight, len(tokens))).indices.tolist())
        center = int(tokens.argmax())
    lo = hi = center
    used = len(pieces[center]) if pieces else 0
    while (lo > 0 or hi < len(pieces) - 1) and used < width:
        if hi < len(pieces) - 1:
            hi += 1
            used += len(pieces[hi])
        if lo > 0 and (used < width // 3 or hi == len(pieces) - 1):
            lo -= 1
            used += len(pieces[lo])
    text = Text("…" if lo > 0 else "")
    for i in range(lo, hi + 1):
        text.append(pieces[i], style="bold reverse" if i in top else None)
    if hi < len(pieces) - 1:
        text.append("…")
    return text


@app.command()
@_command
def scan(
    run: Path = typer.Argument(..., help="Run directory written by influencer fit."),
    queries: Path | None = typer.Option(
        None,
        "--queries",
        "-q",
        help='JSON Lines file of {"prompt": ..., "completion": ...} objects.',
        rich_help_panel=_QUERY,
    ),
    prompt: list[str] | None = typer.Option(
        None, "--prompt", "-p", help="A query prompt (repeat for several).", rich_help_panel=_QUERY
    ),
    completion: list[str] | None = typer.Option(
        None,
        "--completion",
        "-c",
        help="Its completion (paired with --prompt in order; start it with a space).",
        rich_help_panel=_QUERY,
    ),
    chat_template: bool = typer.Option(
        False,
        "--chat-template/--no-chat-template",
        help="Wrap each prompt in the tokenizer's chat template (instruct models); "
        "the completion is the assistant's reply.",
        rich_help_panel=_QUERY,
    ),
    system: str | None = typer.Option(
        None, "--system", help="System message for --chat-template.", rich_help_panel=_QUERY
    ),
    query_max_length: int | None = typer.Option(
        None,
        "--query-max-length",
        min=2,
        show_default="no limit",
        help="Longest query in tokens.",
        rich_help_panel=_QUERY,
    ),
    query_truncation: TruncationChoice = typer.Option(
        TruncationChoice.error,
        "--query-truncation",
        help="A longer query: error, cut the end of its completion (right), or the start of its prompt (left).",
        rich_help_panel=_QUERY,
    ),
    rank: int = typer.Option(
        32, "--rank", min=0, help="Rank of the stored query gradients (0: exact).", rich_help_panel=_SCAN
    ),
    top_k: int = typer.Option(
        10,
        "--top-k",
        "-k",
        min=1,
        help="Hits kept per query (most positive, most negative, per layer band).",
        rich_help_panel=_SCAN,
    ),
    prefilter: int | None = typer.Option(
        None,
        "--prefilter",
        min=1,
        show_default="off",
        help="Score only each query's top N training sequences under BM25 (paper §3.2.1; biases what is found).",
        rich_help_panel=_SCAN,
    ),
    tokens: bool = typer.Option(
        True,
        "--tokens/--no-tokens",
        help="Per-token influence of every hit (a second pass over the hits only).",
        rich_help_panel=_SCAN,
    ),
    per_layer: bool = typer.Option(
        False, "--per-layer", help="Show each hit's largest per-layer contributions.", rich_help_panel=_SCAN
    ),
    keep_scores: bool = typer.Option(
        False, "--keep-scores", help="Also keep the full score matrix (queries × N).", rich_help_panel=_SCAN
    ),
    refine: int = typer.Option(
        0,
        "--refine",
        min=0,
        show_default="0: off",
        help="Refine each query by N steps of conjugate gradients on the full Gauss-Newton "
        "matrix over the fit's sequences, preconditioned by the curvature (closer to "
        "the exact influence; each step costs about one pass over them per query).",
        rich_help_panel=_SCAN,
    ),
    refine_sequences: int | None = typer.Option(
        None,
        "--refine-sequences",
        min=1,
        show_default="all",
        help="Refine on the first N of the fit's sequences.",
        rich_help_panel=_SCAN,
    ),
    show: int = typer.Option(5, "--show", min=0, help="Hits printed per query.", rich_help_panel=_SCAN),
    shard_size: int = typer.Option(
        1024, "--shard-size", min=1, help="Sequences per resumable shard.", rich_help_panel=_SCAN
    ),
    n_train: int | None = typer.Option(
        None,
        "--n-train",
        min=1,
        show_default="as fitted",
        help="Training-set size N for per-copy units.",
        rich_help_panel=_SCAN,
    ),
    data: str | None = typer.Option(
        None,
        "--data",
        show_default="the fit's data",
        help="Training data to scan (same forms as fit's DATA).",
        rich_help_panel=_DATA,
    ),
    fmt: FormatChoice | None = typer.Option(
        None, "--format", show_default="auto", help="Format of --data.", rich_help_panel=_DATA
    ),
    field_name: str | None = typer.Option(
        None, "--field", show_default="as fitted", help="Text field of --data.", rich_help_panel=_DATA
    ),
    text_unit: UnitChoice | None = typer.Option(
        None,
        "--text-unit",
        show_default="as fitted",
        help="Plain text: a document per line or file.",
        rich_help_panel=_DATA,
    ),
    split: str | None = typer.Option(
        None, "--split", show_default="as fitted", help="Hugging Face split.", rich_help_panel=_DATA
    ),
    sequences: int | None = typer.Option(
        None,
        "--sequences",
        "-n",
        min=1,
        show_default="as fitted",
        help="Scan the first N sequences.",
        rich_help_panel=_DATA,
    ),
    max_length: int | None = typer.Option(
        None, "--max-length", min=2, show_default="as fitted", help="Tokens per sequence.", rich_help_panel=_DATA
    ),
    packing: bool | None = typer.Option(
        None,
        "--packing/--no-packing",
        show_default="as fitted",
        help="Pack documents into --max-length sequences.",
        rich_help_panel=_DATA,
    ),
    truncation: TruncationChoice | None = typer.Option(
        None, "--truncation", show_default="as fitted", help="Over-long documents.", rich_help_panel=_DATA
    ),
    bos: bool | None = typer.Option(
        None, "--bos/--no-bos", show_default="as fitted", help="Prepend BOS.", rich_help_panel=_DATA
    ),
    eos: bool | None = typer.Option(
        None, "--eos/--no-eos", show_default="as fitted", help="Append EOS.", rich_help_panel=_DATA
    ),
    model: str | None = typer.Option(
        None, "--model", show_default="the fit's model", help="The model (must be the one the curvature was fitted on)."
    ),
    batch_size: int | None = typer.Option(
        None, "--batch-size", "-b", min=1, show_default="as fitted", help="Sequences per pass."
    ),
    device: str = typer.Option("auto", "--device", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N."),
    dtype: DtypeChoice | None = typer.Option(None, "--dtype", show_default="as fitted", help="Model weights dtype."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing scan (or discard an unfinished one) in RUN."
    ),
) -> None:
    """Score every training sequence of a run against your queries; write RUN/scan/ and print the top hits.

    Positive influence: adding the sequence makes the completion more likely. Per copy = influence / N, the
    predicted change of log p(completion) in nats from one added copy. An interrupted scan resumes when the
    same command runs again. Example: influencer scan runs/kjv -p "In the beginning God created"
    -c " the heaven and the earth."
    """
    fmt, text_unit, truncation = _value(fmt), _value(text_unit), _value(truncation)
    query_truncation, dtype = _value(query_truncation), _value(dtype)
    import influencer as inf
    from influencer.data import encode_queries, sequence_digest
    from influencer.io import atomic_write_json
    from influencer.runs import (
        CURVATURE,
        SCAN,
        SCAN_PARTIAL,
        SCAN_REQUEST,
        check_scan_target,
        publish_scan,
        read_run,
        versions,
    )

    console = _console()
    timer = _Timer()
    with _process_group(device), _live(timer):
        import influencer.distributed as dist

        def check() -> tuple[dict[str, Any], list[dict[str, str]], str, str, dict[str, Any]]:
            record = read_run(run)
            query_list = _queries_from_options(queries, prompt, completion)
            resolved = _resolve_device(device)
            model_source = _model_source(model) if model is not None else record["model"]["source"]
            settings = _scan_data_settings(
                record["data"],
                data,
                format=fmt,
                field=field_name,
                text_unit=text_unit,
                split=split,
                sequences=sequences,
                max_length=max_length,
                packing=packing,
                truncation=truncation,
                bos=bos,
                eos=eos,
            )
            if dist.is_main() and (run / SCAN).exists() and not overwrite:  # rank 0 decides about the run
                raise UserError(f"{run / SCAN} already holds a scan; pass --overwrite to replace it")
            return record, query_list, resolved, model_source, settings

        record, query_list, device, model_source, settings = _agree(check)
        batch_size = batch_size or record["fit"].get("batch_size", 8)

        def load() -> tuple[Any, Any, Any, Documents, Sequences, str, dict[str, Any], Any, Any]:
            net, tok = _load_model(timer, model_source, dtype or record["model"].get("dtype", "float32"), device)
            with timer.stage("load curvature"):
                curv = inf.Curvature.load(run / CURVATURE, net)
            docs, seqs = _read_training(timer, tok, settings)
            digest = sequence_digest(seqs.batch)
            if (
                data is None
                and settings.get("sequences") == record["data"].get("sequences")
                and digest != record["data"].get("digest")
            ):
                raise UserError(
                    f"the training data at {settings['source']} changed since the fit (other tokens); "
                    "pass --data to scan it anyway"
                )
            _say(console, f"data: {seqs.report.summary()}")
            qbatch, qreport = encode_queries(
                tok,
                query_list,
                max_length=query_max_length,
                truncation=query_truncation,
                chat_template=chat_template,
                system=system,
            )
            _say(console, f"queries: {qreport.summary()}")
            _check_positions(net, seqs.batch, "training sequences", "--max-length")
            _check_positions(net, qbatch, "queries", "--query-max-length")
            candidates = None
            refine_batch = _refine_batch(timer, tok, record, settings, seqs, data, refine, refine_sequences)
            if prefilter is not None and dist.is_main():  # rank 0 ranks the candidates, every rank scans them
                from influencer.prefilter import BM25Index, completion_mask

                with timer.stage("prefilter", f"BM25 top {prefilter}"):
                    index = BM25Index(
                        seqs.batch["input_ids"],
                        attention_mask=seqs.batch["attention_mask"],
                        vocab_size=max(len(tok), int(seqs.batch["input_ids"].max()) + 1),
                        ignore_ids=tok.all_special_ids,
                    )
                    _, candidates = index.candidates(
                        qbatch, n=prefilter, query_mask=completion_mask(qbatch), per_query=True
                    )
            return net, tok, curv, docs, seqs, digest, qbatch, qreport, candidates, refine_batch

        net, tok, curv, docs, seqs, digest, qbatch, qreport, candidates, refine_batch = _agree(load)
        if prefilter is not None and dist.world_size() > 1:
            candidates = dist.broadcast_tensors(None if candidates is None else {"c": candidates})["c"]
        task = inf.CausalLM(pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0)

        def target() -> tuple[str, bool]:
            partial = check_scan_target(run, overwrite=overwrite)
            return str(partial), (partial / "scan.json").is_file()

        # rank 0 checks (and with --overwrite clears) the target; the others wait, then follow its decision
        where, resumed = dist.broadcast_object(dist.run_collectively(target))
        partial = Path(where)
        if resumed:
            _say(console, f"resuming the unfinished scan in {partial}")
        with timer.stage("influence", f"{len(query_list)} queries × {len(seqs)} sequences"):
            try:
                result = inf.scan(
                    net,
                    task,
                    curv,
                    qbatch,
                    seqs.batch,
                    rank=rank or None,
                    top_k=top_k,
                    batch_size=batch_size,
                    candidates=candidates,
                    keep_scores=keep_scores,
                    tokens=tokens,
                    out_dir=partial,
                    shard_size=shard_size,
                    n_train=n_train,
                    refine_data=refine_batch,
                    refine_iterations=refine or 10,
                    progress=True,
                )
            except ValueError as exc:
                if "holds a scan" in str(exc) or "other query refinement settings" in str(exc):
                    raise UserError(
                        f"{run / SCAN_PARTIAL} holds an unfinished scan of other queries or settings; "
                        "pass --overwrite to discard it"
                    ) from None
                raise
        request = {
            "format": "influencer.scan-request",
            "version": 1,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "queries": query_list,
            "query_report": qreport.as_dict(),
            "chat_template": chat_template,
            "system": system,
            "model": model_source,
            "data": {**settings, "documents_skipped": docs.skipped, "report": seqs.report.as_dict(), "digest": digest},
            "settings": {
                "rank": rank or None,
                "top_k": top_k,
                "prefilter": prefilter,
                "tokens": tokens,
                "keep_scores": keep_scores,
                "batch_size": batch_size,
                "shard_size": shard_size,
                "refine": refine,
                "refine_sequences": None if refine_batch is None else int(refine_batch["input_ids"].shape[0]),
                "n_train": result.n_train,
                "device": device,
                "resumed": resumed,
                "processes": dist.world_size(),
            },
            "versions": versions(),
            "timings": timer.as_dict(),
        }

        def publish() -> None:
            atomic_write_json(partial / SCAN_REQUEST, request)
            publish_scan(run)

        dist.run_collectively(publish)  # rank 0 writes; a failure fails every rank
        processes = dist.world_size()
    result.directory = run / SCAN
    if _main_rank():
        _print_hits(console, tok, result, query_list, seqs, show=show, per_layer=per_layer)
    _say(
        console,
        f"per copy = influence / N with N = {result.n_train}: the predicted change of log p(completion) "
        "in nats from adding one copy of the sequence",
    )
    if not refine and record["fit"]["strategy"] != "identity":
        from influencer.refine import UNREFINED_SCALE_NOTE

        _say(console, UNREFINED_SCALE_NOTE)
    _say(console, f"wrote {run / SCAN}")
    _timing_table(console, timer, _timings_title("scan", processes))


def _print_hits(
    console: Console,
    tok: Any,
    result: Any,
    queries: list[dict[str, str]],
    seqs: Sequences,
    *,
    show: int,
    per_layer: bool,
) -> None:
    from rich.table import Table
    from rich.text import Text

    ids, mask = seqs.batch["input_ids"], seqs.batch["attention_mask"]
    for q, query in enumerate(queries):
        title = Text(f"Query {q + 1} ", style="bold")
        title.append(f"{query['prompt']!r} → {query['completion']!r}", style="default")
        table = Table(title=title, title_justify="left", expand=False, show_lines=False)
        table.add_column("#", justify="right")
        table.add_column("seq", justify="right")
        table.add_column("source", overflow="fold")
        table.add_column("influence", justify="right")
        table.add_column("per copy", justify="right")
        if per_layer:
            table.add_column("top layers")
        table.add_column("text (top tokens highlighted)", overflow="fold")
        for rank, hit in enumerate(result.top(q, show), 1):
            length = int(mask[hit.index].sum())
            row: list[Any] = [
                str(rank),
                str(hit.index),
                Text(seqs.labels[hit.index]),
                f"{hit.score:.4g}",
                f"{hit.per_copy:+.3g}",
            ]
            if per_layer:
                best = sorted(hit.layers.items(), key=lambda kv: -abs(kv[1]))[:3]
                row.append(Text("\n".join(f"{_short_layer(n, result.layer_names)} {v:+.3g}" for n, v in best)))
            snippet = _snippet(tok, ids[hit.index, :length], hit.tokens)
            if hit.spurious:
                snippet.append("  (spurious: one token dominates)", style="dim")
            row.append(snippet)
            table.add_row(*row)
        console.print(table)
        stats = result.stats(q)
        _say(
            console,
            f"  scanned {int(stats['count'])} sequences: mean influence {stats['mean']:.3g}, std {stats['std']:.3g}",
        )


# --------------------------------------------------------------------------------------------------- report


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
        from influencer.report import write_report
    except ModuleNotFoundError as exc:
        if exc.name not in ("influencer.report",):
            raise
        raise UserError(
            "this build of influencer has no report module (influencer.report); update influencer"
        ) from None
    import influencer as inf
    from influencer.data import sequence_digest
    from influencer.models import load_tokenizer
    from influencer.runs import REPORT, SCAN, read_run, read_scan_request

    console = _console()
    timer = _Timer()
    record = read_run(run)
    request = read_scan_request(run)
    target = out if out is not None else run / REPORT
    if target.exists() and target.is_dir():
        raise UserError(f"{target} is a directory; give a file name with --out")
    with _live(timer):
        with timer.stage("load scan"):
            result = inf.ScanResult.load(run / SCAN)
        with timer.stage("load tokenizer"):
            _quiet_transformers()
            tok = load_tokenizer(request.get("model") or record["model"]["source"])
        settings = {k: v for k, v in request["data"].items() if k not in ("documents_skipped", "report", "digest")}
        _, seqs = _read_training(timer, tok, settings)
        if sequence_digest(seqs.batch) != request["data"].get("digest"):
            raise UserError(
                f"the training data at {settings['source']} changed since the scan; the report would "
                "show the wrong texts"
            )
        ids, mask = seqs.batch["input_ids"], seqs.batch["attention_mask"]

        def train_tokens(i: int) -> list[str]:
            return [tok.decode([int(t)]) for t in ids[i, : int(mask[i].sum())]]

        def train_text(i: int) -> str:
            return f"[{seqs.labels[i]}] " + tok.decode(ids[i, : int(mask[i].sum())].tolist())

        fit_info = record["fit"]
        notes = [
            f"model: {record['model']['source']} ({record['model']['class']})",
            f"curvature: {fit_info['strategy']} ({fit_info['fisher']} Fisher) on {len(fit_info['tracked_layers'])} "
            f"layers ({fit_info['layers']}), fitted on {fit_info['n_fit']} sequences",
            f"data: {settings['source']} ({seqs.report.summary()})",
            f"per copy = influence / N, N = {result.n_train}",
        ]
        if request["settings"].get("prefilter"):
            notes.append(f"BM25 prefilter: top {request['settings']['prefilter']} sequences per query were scored")
        if not request["settings"].get("refine") and fit_info["strategy"] != "identity":
            from influencer.refine import UNREFINED_SCALE_NOTE

            notes.append(UNREFINED_SCALE_NOTE)
        with timer.stage("write report"):
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
            try:
                written = write_report(
                    result,
                    tmp,
                    queries=request["queries"],
                    train_tokens=train_tokens,
                    train_text=train_text,
                    title=title or f"influencer report: {run.name}",
                    top=top,
                    notes=notes,
                )
                os.replace(written, target)
            finally:
                tmp.unlink(missing_ok=True)
    _say(console, f"wrote {target}")


# ----------------------------------------------------------------------------------------------------- demo


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
    """Run the end-to-end demo: EK-FAC on SmolLM2-135M, BM25 candidates from the whole King James Bible."""
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


# ------------------------------------------------------------------------------------------------- validate


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


if __name__ == "__main__":  # pragma: no cover
    app()
