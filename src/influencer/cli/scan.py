# ruff: noqa: B008  (typer declares options as argument defaults)
"""``influencer scan``: score the training data against queries, write RUN/scan/, print the top hits."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from influencer.cli._app import app
from influencer.cli._hits import _print_hits
from influencer.cli._options import (
    _DATA,
    _QUERY,
    _SCAN,
    DtypeChoice,
    FormatChoice,
    PrecisionChoice,
    TruncationChoice,
    UnitChoice,
    _value,
)
from influencer.cli._progress import _console, _live, _Timer, _timing_table, _timings_title
from influencer.cli._runtime import UserError, _command, _main_rank, _process_group
from influencer.cli._shared import _hooks, _quiet_transformers, _say

if TYPE_CHECKING:
    pass


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
    refine: str = typer.Option(
        "auto",
        "--refine",
        help="Refine the queries by conjugate-gradient steps on the full Gauss-Newton matrix over a random sample "
        "of the fit's sequences, preconditioned by the curvature: auto (steps and sample chosen so that it costs "
        "at most the scan on small corpora, ≤ 10% of it from 100k sequences), N steps, or 0 for the paper's "
        "plain estimate (its per-copy values are then not calibrated).",
        rich_help_panel=_SCAN,
    ),
    refine_sequences: int | None = typer.Option(
        None,
        "--refine-sequences",
        min=1,
        show_default="chosen by the cost model",
        help="Refine over a sample of N of the fit's sequences.",
        rich_help_panel=_SCAN,
    ),
    self_correct: str = typer.Option(
        "auto",
        "--self-correct",
        help="Correct the hits for their own curvature (leave-one-in; per-copy values are nats only then): auto "
        "(for a refined scan, within the refinement's budget; skipped and said so otherwise), on, or off.",
        rich_help_panel=_SCAN,
    ),
    split_completion: bool = typer.Option(
        False,
        "--split-completion",
        help="Split each query's log p and each shown hit's influence over the completion tokens (which token "
        "drives the score; one more solve per completion token).",
        rich_help_panel=_SCAN,
    ),
    precision: PrecisionChoice = typer.Option(
        PrecisionChoice.float32,
        "--precision",
        help="Precision of the contraction of queries with training gradients: float32, or bfloat16 (within ~0.5 %% "
        "of float32, several times faster on GPUs and CPUs with AVX512-BF16/AMX).",
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
    memory_budget: str = typer.Option(
        "auto",
        "--memory-budget",
        help="Refuse to start when the planned peak memory exceeds this (auto: the memory available; "
        "a size such as 20GB; off: no check).",
    ),
) -> None:
    """Score every training sequence of a run against your queries; write RUN/scan/ and print the top hits.

    Positive influence: adding the sequence makes the completion more likely. Per copy = influence / N, the
    predicted change of log p(completion) in nats from one added copy. An interrupted scan resumes when the
    same command runs again. Example: influencer scan runs/kjv -p "In the beginning God created"
    -c " the heaven and the earth."
    """
    from influencer.runs.scanning import scan_run

    query_list = _queries_from_options(queries, prompt, completion)
    given = {
        "format": _value(fmt),
        "field": field_name,
        "text_unit": _value(text_unit),
        "split": split,
        "sequences": sequences,
        "max_length": max_length,
        "packing": packing,
        "truncation": _value(truncation),
        "bos": bos,
        "eos": eos,
    }
    console = _console()
    timer = _Timer()
    _quiet_transformers()
    with _process_group(device), _live(timer):
        import influencer.distributed as dist

        done = scan_run(
            run,
            query_list,
            chat_template=chat_template,
            system=system,
            query_max_length=query_max_length,
            query_truncation=_value(query_truncation),
            rank=rank,
            top_k=top_k,
            prefilter=prefilter,
            tokens=tokens,
            keep_scores=keep_scores,
            refine=refine,
            refine_sequences=refine_sequences,
            self_correct=self_correct,
            split_completion=show if split_completion else 0,
            precision=_value(precision),
            shard_size=shard_size,
            n_train=n_train,
            data=data,
            data_options=given,
            model=model,
            batch_size=batch_size,
            device=device,
            dtype=_value(dtype),
            overwrite=overwrite,
            memory_budget=memory_budget,
            hooks=_hooks(console, timer),
        )
        processes = dist.world_size()
    from influencer.units import calibrated, correction_note, units_note

    result, inverse = done.result, done.request["settings"]["inverse"]
    nats = calibrated(inverse, result.meta.get("self_correction"))
    if _main_rank():
        _print_hits(
            console, done.tokenizer, result, query_list, done.sequences, show=show, per_layer=per_layer, nats=nats
        )
    _say(console, units_note(inverse, result.n_train, result.meta.get("self_correction")))
    if (note := correction_note(result.meta)) is not None:
        _say(console, note)
    _say(console, f"wrote {result.directory}")
    _timing_table(console, timer, _timings_title("scan", processes))
