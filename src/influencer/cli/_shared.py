"""Pieces the commands share: device, model and data loading, option checks."""

from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from influencer.cli._options import LAYER_PRESETS
from influencer.cli._progress import _Timer
from influencer.cli._runtime import _SETTINGS, UserError, _one_line, _under_torchrun

if TYPE_CHECKING:
    from rich.console import Console

    from influencer.data import Documents, Sequences


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


def _read_documents(timer: _Timer, settings: dict[str, Any]) -> Documents:
    """The training documents (read and checked before any model is loaded: bad data fails in seconds)."""
    from influencer.runs import read_documents

    return read_documents(settings, timer)


def _tokenize(timer: _Timer, tokenizer: Any, settings: dict[str, Any], docs: Documents) -> Sequences:
    from influencer.runs import tokenize_documents

    return tokenize_documents(tokenizer, settings, docs, timer)


def _read_training(timer: _Timer, tokenizer: Any, settings: dict[str, Any]) -> tuple[Documents, Sequences]:
    docs = _read_documents(timer, settings)
    return docs, _tokenize(timer, tokenizer, settings, docs)


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


def _check_number(
    option: str, value: float | None, *, above: float | None = None, at_least: float | None = None
) -> None:
    """Refuse a numeric option that is NaN, infinite or out of range (before anything is loaded)."""
    if value is None:
        return
    if not math.isfinite(value):
        raise UserError(f"{option} must be a finite number, got {value}")
    if above is not None and not value > above:
        raise UserError(f"{option} must be > {above:g}, got {value:g}")
    if at_least is not None and not value >= at_least:
        raise UserError(f"{option} must be ≥ {at_least:g}, got {value:g}")


def _check_layers_early(source: str, spec: str) -> None:
    """Resolve --layers against the model's architecture before its weights are read (a meta-device skeleton)."""
    from influencer.models import load_skeleton

    try:
        skeleton = load_skeleton(source)
    except ValueError as exc:
        raise UserError(_one_line(str(exc))) from None
    _check_layers(skeleton, spec)


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


def _budget_option(text: str) -> int | None:
    """``--memory-budget``: None (auto), -1 (off) or bytes; a UserError naming the option otherwise."""
    from influencer.guard import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise UserError(f"--memory-budget: {exc}") from None


def _guard_memory(
    timer: _Timer,
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
