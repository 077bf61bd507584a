# ruff: noqa: B008  (typer declares options as argument defaults)
"""``influencer fit``: fit the curvature and write a run directory."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from influencer.cli._app import app
from influencer.cli._options import (
    _CURV,
    _DATA,
    _RUN,
    DtypeChoice,
    FisherChoice,
    FormatChoice,
    PrecisionChoice,
    StrategyChoice,
    TruncationChoice,
    UnitChoice,
    _value,
)
from influencer.cli._progress import _console, _live, _size, _Timer, _timing_table, _timings_title
from influencer.cli._runtime import _command, _process_group
from influencer.cli._shared import _hooks, _quiet_transformers, _say


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
    precision: PrecisionChoice = typer.Option(
        PrecisionChoice.float32,
        "--precision",
        help="Precision of the EK-FAC Λ pass (rotations into the eigenbases, per-sequence products): float32, or "
        "bfloat16 (float32 sums; Λ within ~0.1 %% of Λ + λ on average, several times faster matmuls on GPUs "
        "and CPUs with AVX512-BF16/AMX).",
        rich_help_panel=_CURV,
    ),
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
    from influencer.runs import data_settings
    from influencer.runs.fitting import fit_run

    console = _console()
    timer = _Timer()
    _quiet_transformers()
    settings = data_settings(
        data,
        format=_value(fmt),
        field=field_name,
        text_unit=_value(text_unit),
        split=split,
        sequences=sequences,
        max_length=max_length,
        packing=packing,
        truncation=_value(truncation),
        bos=bos,
        eos=eos,
    )
    with _process_group(device), _live(timer):
        import influencer.distributed as dist

        target = fit_run(
            model,
            settings,
            out,
            overwrite=overwrite,
            layers=layers,
            strategy=_value(strategy),
            fisher=_value(fisher),
            damping=damping,
            damping_factor=damping_factor,
            blocks=blocks,
            n_train=n_train,
            seed=seed,
            batch_size=batch_size,
            checkpoint_every=checkpoint_every,
            device=device,
            dtype=_value(dtype),
            precision=_value(precision),
            memory_budget=memory_budget,
            hooks=_hooks(console, timer),
        )
        processes = dist.world_size()
    fitted = json.loads((target / "run.json").read_text(encoding="utf-8"))["fit"]
    _say(
        console,
        f"fitted {fitted['strategy']} on {len(fitted['tracked_layers'])} layers × {fitted['n_fit']} sequences "
        f"(factors {_size(fitted['factor_bytes'])}) → {target}",
    )
    _timing_table(console, timer, _timings_title("fit", processes))
