# ruff: noqa: B008  (typer declares options as argument defaults)
"""``influencer report``: the HTML report of a run's scan."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from influencer.cli._app import app
from influencer.cli._progress import _console, _live, _Timer
from influencer.cli._runtime import UserError, _command
from influencer.cli._shared import _quiet_transformers, _read_training, _say
from influencer.pieces import token_pieces


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
    from influencer.models import describe_model, load_tokenizer
    from influencer.runs import REPORT, SCAN, locked_run, read_run, read_scan_request

    console = _console()
    timer = _Timer()
    record = read_run(run)
    request = read_scan_request(run)
    target = out if out is not None else run / REPORT
    if target.exists() and target.is_dir():
        raise UserError(f"{target} is a directory; give a file name with --out")
    with _live(timer), locked_run(run, "report"):  # a scan must not replace scan/ while the report reads it
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
            return token_pieces(tok, ids[i, : int(mask[i].sum())].tolist())

        def train_text(i: int) -> str:
            return tok.decode(ids[i, : int(mask[i].sum())].tolist())

        fit_info = record["fit"]
        notes = [
            f"model: {record['model'].get('description') or describe_model(record['model']['source'])} "
            f"({record['model']['class']})",
            f"curvature: {fit_info['strategy']} ({fit_info['fisher']} Fisher) on {len(fit_info['tracked_layers'])} "
            f"layers ({fit_info['layers']}), fitted on {fit_info['n_fit']} sequences",
            f"data: {settings['source']} ({seqs.report.summary()})",
        ]
        if request["settings"].get("prefilter"):
            notes.append(f"BM25 prefilter: top {request['settings']['prefilter']} sequences per query were scored")
        from influencer.units import units_note

        notes.append(units_note(result.meta.get("inverse"), result.n_train, result.meta.get("self_correction")))
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
                    train_source=lambda i: str(seqs.labels[i]),
                    title=title or f"influencer report: {run.name}",
                    top=top,
                    notes=notes,
                )
                os.replace(written, target)
            finally:
                tmp.unlink(missing_ok=True)
    _say(console, f"wrote {target}")
