# ruff: noqa: B008  (typer declares options as argument defaults)
"""``influencer scan``: score the training data against queries, write RUN/scan/, print the top hits."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from influencer.cli._app import app
from influencer.cli._options import (
    _DATA,
    _QUERY,
    _SCAN,
    DtypeChoice,
    FormatChoice,
    TruncationChoice,
    UnitChoice,
    _value,
)
from influencer.cli._progress import _console, _live, _Timer, _timing_table, _timings_title
from influencer.cli._runtime import UserError, _agree, _command, _main_rank, _process_group
from influencer.cli._shared import (
    _budget_option,
    _check_positions,
    _data_settings,
    _guard_memory,
    _load_model,
    _model_source,
    _read_documents,
    _read_training,
    _resolve_device,
    _say,
    _tokenize,
)
from influencer.ledger import ResumeConflictError
from influencer.pieces import token_pieces

if TYPE_CHECKING:
    import torch
    from rich.console import Console
    from rich.text import Text

    from influencer.data import Documents, Sequences


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


def _refine_option(text: str) -> int | str:
    """``--refine``: "auto" or a number of CG steps ≥ 0."""
    value = text.strip().lower()
    if value == "auto":
        return "auto"
    try:
        steps = int(value)
    except ValueError:
        steps = -1
    if steps < 0:
        raise UserError(f"--refine takes 'auto' or a number of CG steps ≥ 0, got {text!r}")
    return steps


def _refine_batch(
    timer: _Timer,
    tok: Any,
    record: dict[str, Any],
    settings: dict[str, Any],
    seqs: Sequences,
    data: str | None,
    refine: int | str,
    sample: int | None,
) -> dict[str, Any] | None:
    """The fit's sequences (the data the curvature describes), which the refinement samples from."""
    if refine == 0:
        if sample is not None:
            raise UserError("--refine-sequences sets the refinement sample; it needs --refine auto or N ≥ 1")
        return None
    from influencer.data import sequence_digest

    if data is None and settings.get("sequences") == record["data"].get("sequences"):
        return seqs.batch  # the scanned data is the fit's data
    with timer.stage("refinement data", "the fit's sequences"):
        _, fit = _read_training(timer, tok, _scan_data_settings(record["data"], None))
    if record["data"].get("digest") not in (None, sequence_digest(fit.batch)):
        raise UserError(
            f"the fit's training data at {record['data'].get('source')} changed since the fit (other "
            "tokens), so the refinement has no data the curvature describes; pass --refine 0"
        )
    return fit.batch


def _describe_plan(plan: Any) -> str:
    from influencer.units import cg_steps

    if plan.steps == 0:
        return f"none ({plan.reason}); the curvature's own answer"
    return (
        f"{cg_steps(plan.steps)} over {plan.sample} of the fit's sequences ({plan.reason}; predicted "
        f"{100 * plan.predicted:.0f}% of the scan's cost, allowed {100 * plan.share:.0f}%)"
    )


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

    pieces = [p.replace("\n", "⏎") for p in token_pieces(tok, ids.tolist())]
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
    fmt, text_unit, truncation = _value(fmt), _value(text_unit), _value(truncation)
    query_truncation, dtype = _value(query_truncation), _value(dtype)
    refine_steps = _refine_option(refine)
    corrections = {"auto": None, "on": True, "off": False}
    if self_correct.strip().lower() not in corrections:
        raise UserError(f"--self-correct takes auto, on or off, got {self_correct!r}")
    correct = corrections[self_correct.strip().lower()]
    budget = _budget_option(memory_budget)
    import influencer as inf
    from influencer.data import encode_queries, sequence_digest
    from influencer.io import atomic_write_json
    from influencer.runs import (
        CURVATURE,
        SCAN,
        SCAN_PARTIAL,
        SCAN_REQUEST,
        check_scan_target,
        locked_run,
        publish_scan,
        read_run,
        versions,
    )

    console = _console()
    timer = _Timer()
    with _process_group(device), _live(timer), contextlib.ExitStack() as held:
        import influencer.distributed as dist

        def check() -> tuple[dict[str, Any], list[dict[str, str]], str, str, dict[str, Any], Documents]:
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
            docs = _read_documents(timer, settings)  # bad data fails before the model loads
            return record, query_list, resolved, model_source, settings, docs

        record, query_list, device, model_source, settings, docs = _agree(check)
        held.enter_context(locked_run(run, "scan"))  # until the scan is published: one writer per run
        if dist.is_main() and (run / SCAN).exists() and not overwrite:  # a scan finished before the lock was had
            raise UserError(f"{run / SCAN} already holds a scan; pass --overwrite to replace it")
        batch_size = batch_size or record["fit"].get("batch_size", 8)

        def load() -> tuple[Any, Any, Any, Documents, Sequences, str, dict[str, Any], Any, Any]:
            net, tok = _load_model(timer, model_source, dtype or record["model"].get("dtype", "float32"), device)
            with timer.stage("load curvature"):
                curv = inf.Curvature.load(run / CURVATURE, net)
            seqs = _tokenize(timer, tok, settings, docs)
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
            refine_batch = _refine_batch(timer, tok, record, settings, seqs, data, refine_steps, refine_sequences)
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
        _guard_memory(
            timer,
            budget,
            device,
            "scan",
            net,
            task,
            seqs.batch,
            curv.layer_names,
            strategy=curv.strategy,
            blocks=curv.blocks,
            rank=rank or None,
            n_queries=len(query_list),
            batch_size=batch_size,
            top_k=top_k,
        )

        def target() -> tuple[str, bool]:
            partial = check_scan_target(run, overwrite=overwrite)
            return str(partial), (partial / "scan.json").is_file()

        # rank 0 checks (and with --overwrite clears) the target; the others wait, then follow its decision
        where, resumed = dist.broadcast_object(dist.run_collectively(target))
        partial = Path(where)
        if resumed:
            _say(console, f"resuming the unfinished scan in {partial}")
        inverse, plan = curv, None
        if refine_batch is not None:
            import torch

            from influencer.refine_plan import default_inverse

            n_scan = len(seqs) if candidates is None else int(torch.unique(torch.cat(list(candidates))).numel())
            inverse, plan = default_inverse(
                net,
                task,
                curv,
                refine_batch,
                refine=refine_steps,
                n_queries=len(query_list),
                n_scan=n_scan,
                rank=rank or None,
                sample=refine_sequences,
                progress=True,
            )
            if plan is not None:
                _say(console, f"refinement: {_describe_plan(plan)}")
        with timer.stage("influence", f"{len(query_list)} queries × {len(seqs)} sequences"):
            try:
                result = inf.scan(
                    net,
                    task,
                    inverse,
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
                    refine=0,  # decided above, over the fit's sequences
                    self_correct=correct,
                    progress=True,
                )
            except ResumeConflictError as exc:
                raise UserError(
                    f"{run / SCAN_PARTIAL} holds an unfinished scan made with {exc.setting}={exc.saved!r:.60}, "
                    f"this one asks {exc.setting}={exc.asked!r:.60}: pass --overwrite to discard it"
                ) from None
        if split_completion and show > 0:
            from influencer.completion import completion_split

            hits = {q: [h.index for h in result.top(q, show)] for q in range(result.n_queries)}
            hits = {q: v for q, v in hits.items() if v}
            with timer.stage("completion split", f"{sum(map(len, hits.values()))} hits"):
                splits = completion_split(net, task, inverse, qbatch, seqs.batch, hits, batch_size=batch_size)
            for sp in splits:
                sp.texts = token_pieces(tok, sp.tokens)
            result.meta["completion_split"] = {str(sp.query): sp.to_json() for sp in splits}
            dist.run_collectively(lambda: result.save(partial))
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
                "refine": refine_steps,
                "refine_sequences": refine_sequences,
                "refine_plan": None if plan is None else plan.to_dict(),
                "split_completion": split_completion,
                "self_correct": self_correct,
                "inverse": inverse.describe(),
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
    from influencer.units import calibrated, correction_note, units_note

    nats = calibrated(inverse.describe(), result.meta.get("self_correction"))
    if _main_rank():
        _print_hits(console, tok, result, query_list, seqs, show=show, per_layer=per_layer, nats=nats)
    _say(console, units_note(inverse.describe(), result.n_train, result.meta.get("self_correction")))
    if (note := correction_note(result.meta)) is not None:
        _say(console, note)
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
    nats: bool,
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
        table.add_column("per copy (nats)" if nats else "per copy (score)", justify="right")
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
        split = (result.meta.get("completion_split") or {}).get(str(q))
        if split is not None:
            _print_split(console, split, [h.index for h in result.top(q, show)])
        stats = result.stats(q)
        _say(
            console,
            f"  scanned {int(stats['count'])} sequences: mean influence {stats['mean']:.3g}, std {stats['std']:.3g}",
        )


def _print_split(console: Console, data: dict[str, Any], indices: list[int]) -> None:
    """Per completion token: log p and its share of each shown hit's influence."""
    from rich.table import Table

    from influencer.completion import CompletionSplit

    split = CompletionSplit.from_json(0, data)
    shown = [i for i in indices if i in split.hits]
    table = Table(title="  which completion token drives the score", title_justify="left", expand=False)
    table.add_column("completion token")
    table.add_column("log p", justify="right")
    for i in shown:
        table.add_column(f"share of seq {i}", justify="right")
    texts = split.texts or [str(t) for t in split.tokens]
    shares = {i: split.shares(i) for i in shown}
    for c, text in enumerate(texts):
        table.add_row(repr(text), f"{float(split.logp[c]):.3f}", *(f"{float(shares[i][c]):.0%}" for i in shown))
    console.print(table)
