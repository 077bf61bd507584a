# ruff: noqa: B008  (typer declares options as argument defaults)
"""``influencer probe``: the word-order probe of paper §5.3.4 on a fitted run."""

from __future__ import annotations

from pathlib import Path

import typer

from influencer.cli._app import app
from influencer.cli._progress import _console, _live, _Timer, _timing_table, _timings_title
from influencer.cli._runtime import UserError, _command
from influencer.cli._shared import _load_model, _say
from influencer.runs.checks import resolve_device


@app.command()
@_command
def probe(
    run: Path = typer.Argument(..., help="Run directory written by influencer fit."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The query's prompt."),
    completion: str = typer.Option(..., "--completion", "-c", help="The query's completion (leading space)."),
    prompt_phrase: str | None = typer.Option(
        None, "--prompt-phrase", show_default="the prompt", help="Prompt-side phrase placed in the sequences."
    ),
    completion_phrase: str | None = typer.Option(
        None,
        "--completion-phrase",
        show_default="the completion",
        help="Completion-side phrase placed in the sequences.",
    ),
    refine: str = typer.Option(
        "auto",
        "--refine",
        help="Refinement of the query over the fit's sequences, as for scan (auto, N steps, 0 = plain).",
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Also write the result as JSON to this file."),
    device: str = typer.Option("auto", "--device", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N."),
) -> None:
    """Word-order probe (paper §5.3.4): score synthetic training sequences that place the prompt-side phrase
    before or after the completion-side phrase (and controls) against the query; print each order's influence.

    Example: influencer probe runs/facts -p "The capital of Zorvania is" -c " Quellmoor"
    """
    import influencer as inf
    from influencer.io import atomic_write_json
    from influencer.probe import word_order_probe
    from influencer.refine_plan import default_inverse
    from influencer.runs import CURVATURE, locked_run, read_run
    from influencer.runs.data import fit_sequences
    from influencer.runs.scanning import refine_steps
    from influencer.units import units_note

    if not completion.strip():
        raise UserError("--completion is empty; a query measures log p(completion | prompt), so give one")
    steps = refine_steps(refine)
    if out is not None and out.is_dir():
        raise UserError(f"{out} is a directory; give a file name with --out")
    console = _console()
    timer = _Timer()
    record = read_run(run)
    with _live(timer), locked_run(run, "probe"):  # a fit --overwrite cannot replace the run underneath
        net, tok = _load_model(
            timer, record["model"]["source"], record["model"].get("dtype", "float32"), resolve_device(device)
        )
        with timer.stage("load curvature"):
            curv = inf.Curvature.load(run / CURVATURE, net)
        task = inf.CausalLM(pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0)
        inverse = curv
        if steps != 0:
            seqs = fit_sequences(record["data"], tok, timer)
            # the probe refines as a scan of the fit's sequences would (its own few sequences are no yardstick)
            inverse, _plan = default_inverse(
                net, task, curv, seqs.batch, refine=steps, n_queries=1, n_scan=len(seqs), rank=None, progress=True
            )
        with timer.stage("probe", "synthetic sequences × 1 query"):
            result = word_order_probe(
                net,
                task,
                inverse,
                tok,
                prompt,
                completion,
                prompt_phrase=prompt_phrase,
                completion_phrase=completion_phrase,
            )
    console.print(f"query: {prompt!r} → {completion!r}")
    console.print(result.table(), markup=False)
    _say(console, units_note(inverse.describe(), result.n_train))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, result.to_dict())
        _say(console, f"wrote {out}")
    _timing_table(console, timer, _timings_title("probe", 1))
