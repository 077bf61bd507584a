"""What a run does around its math: the callbacks it reports through (:class:`RunHooks`) and the checks it makes
before anything expensive (numbers finite and in range, layers resolved on a weightless skeleton, the device,
the memory plan). A refused request raises :class:`RequestError`, which names the parameter it is about."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

LAYER_PRESETS = ("mlp", "attention", "all")


class RequestError(ValueError):
    """A bad request, found before any expensive work. ``parameter`` names the argument it is about (``{}`` in the
    message stands for it); :meth:`render` spells it another way (the command line writes ``--damping-factor``)."""

    def __init__(self, template: str, parameter: str | None = None, *others: str):
        self.template, self.parameter, self.others = template, parameter, others
        super().__init__(self.render())

    def render(self, spell: Callable[[str], str] = str) -> str:
        """The message with ``{}`` / ``{0}`` the parameter and ``{1}``, ``{2}``, … the ``others``, spelled. Only
        those exact tokens are replaced, so braces in data-derived text (a regex such as ``[0-9]{2}``, a path)
        stay as they are."""
        if self.parameter is None:
            return self.template
        names = [spell(self.parameter), *(spell(o) for o in self.others)]

        def fill(m: re.Match[str]) -> str:
            i = int(m.group(1) or 0)
            return names[i] if i < len(names) else m.group(0)

        return re.sub(r"\{(\d?)\}", fill, self.template)


class _Row:
    detail = ""


class _NoTimer:
    @contextlib.contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[_Row]:
        yield _Row()


def _call(fn: Callable[[], T]) -> T:
    return fn()


_LOG = logging.getLogger("influencer")


@dataclass
class RunHooks:
    """How a fit or scan reports and coordinates; the defaults suit a Python caller in one process.

    ``timer``: an object whose ``stage(name, detail)`` is a context manager yielding a row with a ``detail``
    attribute (the command line's prints a timing table); ``say``: one-line messages (resuming, data summary,
    refinement plan; default: the ``influencer`` logger); ``agree``: runs a check or load step on every torchrun
    rank and fails all of them together (default: just call it); ``progress``: library progress bars.
    """

    timer: Any = field(default_factory=_NoTimer)
    say: Callable[[str], None] = _LOG.info
    agree: Callable[[Callable[[], Any]], Any] = _call
    progress: bool = False


def check_number(
    parameter: str, value: float | None, *, above: float | None = None, at_least: float | None = None
) -> None:
    """Refuse a number that is NaN, infinite or out of range (None passes)."""
    if value is None:
        return
    if not math.isfinite(value):
        raise RequestError(f"{{}} must be a finite number, got {value}", parameter)
    if above is not None and not value > above:
        raise RequestError(f"{{}} must be > {above:g}, got {value:g}", parameter)
    if at_least is not None and not value >= at_least:
        raise RequestError(f"{{}} must be ≥ {at_least:g}, got {value:g}", parameter)


def check_count(parameter: str, value: int | None, *, at_least: int = 1) -> None:
    """Refuse a count below ``at_least`` (None passes)."""
    if value is not None and value < at_least:
        raise RequestError(f"{{}} must be ≥ {at_least}, got {value}", parameter)


def check_precision(precision: str) -> None:
    """Refuse a precision other than float32 / bfloat16."""
    from influencer.passes import PRECISIONS

    if precision not in PRECISIONS:
        raise RequestError(f"{{}} takes {' or '.join(PRECISIONS)}, got {precision!r}", "precision")


def select_layers_checked(model: Any, spec: str) -> list[Any]:
    """The tracked layers ``spec`` names in ``model`` (a preset or a regex); RequestError about ``layers``."""
    from influencer.layers import select_layers

    try:
        return select_layers(model, spec)
    except ValueError as exc:
        if re.fullmatch(r"[A-Za-z_]+", spec) and spec not in LAYER_PRESETS:
            raise RequestError(
                f"unknown layer preset {spec!r}: use one of {', '.join(LAYER_PRESETS)}, or a regex "
                r"of module names such as 'layers\.[0-3]\.mlp\.'"
            ) from None
        raise RequestError(f"{{}}: {_one_line(str(exc))}", "layers") from None


def check_layers_early(source: str, spec: str) -> None:
    """Resolve ``spec`` against the model's architecture before its weights are read (a meta-device skeleton)."""
    from influencer.models import load_skeleton

    try:
        skeleton = load_skeleton(source)
    except ValueError as exc:
        raise RequestError(_one_line(str(exc))) from None
    select_layers_checked(skeleton, spec)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def model_source(name: str | os.PathLike[str]) -> str:
    """A built-in model name as given; a folder as an absolute path (so the run works from anywhere)."""
    from influencer.models import builtin_models

    name = os.fspath(name)
    if name.lower() in builtin_models():
        return name.lower()
    return str(Path(name).expanduser().resolve())


def resolve_device(name: str) -> str:
    """``auto`` → cuda when available, else cpu; under torchrun every process takes ``cuda:LOCAL_RANK``."""
    import torch

    from influencer import distributed as dist

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RequestError(f"unknown {{}} {name!r}; use auto, cpu, cuda or cuda:N", "device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RequestError(
            f"{{}} {name}: no CUDA device is available here (torch {torch.__version__}); use cpu", "device"
        )
    if device.type == "cuda" and dist.world_size() > 1:  # one GPU per process: cuda:LOCAL_RANK
        if device.index is not None:
            raise RequestError(
                f"{{}} {name}: under torchrun every process uses cuda:LOCAL_RANK; ask for cuda (choose the GPUs "
                "with CUDA_VISIBLE_DEVICES)",
                "device",
            )
        if dist.local_rank() >= torch.cuda.device_count():
            raise RequestError(
                f"torchrun started local rank {dist.local_rank()} but this node has "
                f"{torch.cuda.device_count()} GPUs; use --nproc-per-node {torch.cuda.device_count()}"
            )
        return f"cuda:{dist.local_rank()}"
    return name


def check_positions(model: Any, batch: dict[str, Any], what: str, parameter: str) -> None:
    """Refuse sequences longer than the model's context instead of failing inside its forward pass."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    longest = int(batch["attention_mask"].sum(1).max()) if len(batch["attention_mask"]) else 0
    if isinstance(limit, int) and longest > limit:
        raise RequestError(
            f"the {what} have up to {longest} tokens but the model reads at most {limit} positions; lower {{}}",
            parameter,
        )


def parse_budget(value: int | str | None) -> int | None:
    """A memory budget as bytes: ``"auto"`` / None → None (the memory available), ``"off"`` → -1, ``"20GB"`` or a
    number of bytes as given; RequestError about ``memory_budget`` otherwise."""
    from influencer.guard import parse_size

    if value is None or isinstance(value, int):
        return value
    try:
        return parse_size(value)
    except ValueError as exc:
        raise RequestError(f"{{}}: {exc}", "memory_budget") from None


def guard_memory(
    timer: Any,
    budget: int | None,
    device: str,
    what: str,
    model: Any,
    task: Any,
    batch: dict[str, Any],
    layers: list[str],
    **settings: Any,
) -> None:
    """Plan the run's memory (one forward + backward of one sequence) and refuse it when it would not fit."""
    from influencer.guard import check_memory, memory_limit
    from influencer.plan import plan

    limit = memory_limit(budget, device)
    if limit is None:
        return
    seq_len = max(2, int(batch["attention_mask"].sum(1).max())) if len(batch["attention_mask"]) else 2
    stages = ("covariance", "eigh", "eigenvalues", "diagonal") if what == "fit" else ("queries", "scan")
    hints = ("batch_size", "blocks") if what == "fit" else ("batch_size", "rank")
    with timer.stage("memory plan", f"limit {limit / 2**30:.1f} GiB"):
        p = plan(
            model,
            task,
            layers,
            seq_len=seq_len,
            n_train=len(batch["input_ids"]),
            memory_budget=limit,
            calibrate=False,
            **settings,
        )
    check_memory(p, stages, limit, what=what, given=budget is not None, hints=hints)


def load_model_timed(timer: Any, source: str, dtype: str, device: str) -> tuple[Any, Any]:
    """The model and tokenizer, as a timed stage."""
    from influencer.models import load_model

    with timer.stage("load model", source if len(source) < 40 else "…" + source[-39:]):
        return load_model(source, dtype=dtype, device=device)
