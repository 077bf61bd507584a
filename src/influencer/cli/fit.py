# ruff: noqa: B008  (typer declares options as argument defaults)
"""``influencer fit``: fit the curvature and write a run directory."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from influencer.cli._app import app
from influencer.cli._options import (
    _CURV,
    _DATA,
    _RUN,
    DtypeChoice,
    FisherChoice,
    FormatChoice,
    StrategyChoice,
    TruncationChoice,
    UnitChoice,
    _value,
)
from influencer.cli._progress import _console, _live, _size, _Timer, _timing_table, _timings_title
from influencer.cli._runtime import UserError, _agree, _command, _process_group
from influencer.cli._shared import (
    _budget_option,
    _check_layers,
    _check_layers_early,
    _check_number,
    _check_positions,
    _data_record,
    _data_settings,
    _guard_memory,
    _load_model,
    _model_source,
    _read_documents,
    _resolve_device,
    _say,
    _tokenize,
)

if TYPE_CHECKING:
    from influencer.data import Documents, Sequences


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
        False,
        "--overwrite",
        help="Replace an existing fit in --out (and its scans); discard an unfinished one.",
        rich_help_panel=_RUN,
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
    checkpoint_every: int = typer.Option(
        1024,
        "--checkpoint-every",
        min=1,
        help="Save the running sums every N sequences: a killed fit resumes from there when run again.",
        rich_help_panel=_RUN,
    ),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, help="Sequences per forward/backward pass."),
    device: str = typer.Option("auto", "--device", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N."),
    dtype: DtypeChoice = typer.Option(
        DtypeChoice.float32, "--dtype", help="Model weights dtype (the curvature math runs in float32/float64)."
    ),
    memory_budget: str = typer.Option(
        "auto",
        "--memory-budget",
        help="Refuse to start when the planned peak memory exceeds this (auto: the memory available; "
        "a size such as 20GB; off: no check).",
    ),
) -> None:
    """Fit the curvature (EK-FAC by default) of MODEL on DATA and write a run directory.

    The run directory holds the curvature (curvature/) and run.json: model and data sources, settings, sizes,
    versions and stage timings. Example: influencer fit smollm2-135m kjv -n 256 --out runs/kjv
    """
    fmt, text_unit, truncation = _value(fmt), _value(text_unit), _value(truncation)
    strategy, fisher, dtype = _value(strategy), _value(fisher), _value(dtype)
    import influencer as inf
    from influencer.models import describe_model
    from influencer.runs import (
        CURVATURE,
        FORMAT,
        RUN_FILE,
        VERSION,
        check_fit_target,
        discard_partial,
        fit_partial,
        locked_run,
        versions,
        write_fit,
    )

    console = _console()
    timer = _Timer()
    with _process_group(device), _live(timer), contextlib.ExitStack() as held:
        import influencer.distributed as dist

        def check() -> tuple[Path, str, str, dict[str, Any], int | None, Documents]:
            # rank 0 decides about the run directory (it alone writes it); the option checks run everywhere
            _check_number("--damping", damping, at_least=0)
            _check_number("--damping-factor", damping_factor, above=0)
            budget = _budget_option(memory_budget)
            target = check_fit_target(out, overwrite=overwrite) if dist.is_main() else Path(out).expanduser()
            settings = _data_settings(
                data, fmt, field_name, text_unit, split, sequences, max_length, packing, truncation, bos, eos
            )
            source = _model_source(model)
            _check_layers_early(source, layers)  # before the weights are read
            docs = _read_documents(timer, settings)  # bad data fails before the model loads
            return target, _resolve_device(device), source, settings, budget, docs

        target, device, model_source, settings, budget, docs = _agree(check)
        held.enter_context(locked_run(target, "fit"))  # until the run directory is written
        if dist.is_main():  # another fit may have finished between the check and the lock
            check_fit_target(out, overwrite=overwrite)
        partial = fit_partial(target)  # the resumable fit: checkpoints and finished stages until the run is written
        if overwrite and dist.is_main():
            discard_partial(partial)
        elif partial.exists():
            _say(console, f"resuming the unfinished fit in {partial}")

        def load() -> tuple[Any, Any, Sequences, list[Any]]:
            net, tok = _load_model(timer, model_source, dtype, device)
            seqs = _tokenize(timer, tok, settings, docs)
            _say(console, f"data: {seqs.report.summary()}")
            _check_positions(net, seqs.batch, "training sequences", "--max-length")
            return net, tok, seqs, _check_layers(net, layers)

        net, tok, seqs, tracked = _agree(load)
        task = inf.CausalLM(pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0)
        _guard_memory(
            timer,
            budget,
            device,
            "fit",
            net,
            task,
            seqs.batch,
            [x.name for x in tracked],
            strategy=strategy,
            blocks=blocks,
            batch_size=batch_size,
            fisher=fisher,
        )
        with timer.stage("fit", f"{strategy}, {len(tracked)} layers"), _resumable(partial):
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
                out_dir=partial,
                checkpoint_every=checkpoint_every,
                progress=True,
            )
        record = {
            "format": FORMAT,
            "version": VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model": {
                "source": model_source,
                "description": describe_model(model_source),
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
            if dist.is_main():
                shutil.rmtree(partial, ignore_errors=True)
        processes = dist.world_size()
    _say(
        console,
        f"fitted {strategy} on {len(curv.layers)} layers × {curv.n_fit} sequences "
        f"(factors {_size(curv.nbytes())}) → {target}",
    )
    _timing_table(console, timer, _timings_title("fit", processes))


@contextlib.contextmanager
def _resumable(partial: Path) -> Iterator[None]:
    """An unfinished fit with other settings is refused naming the setting (--overwrite discards it)."""
    from influencer.ledger import ResumeConflictError

    try:
        yield
    except ResumeConflictError as exc:
        raise UserError(
            f"{partial} holds an unfinished fit made with {exc.setting}={exc.saved!r:.60}, this one asks "
            f"{exc.setting}={exc.asked!r:.60}: run the same fit to finish it, or pass --overwrite to discard it"
        ) from None
