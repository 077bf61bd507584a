"""Scan a run: every check first, then the lock, the resumable scan in ``scan.partial/`` (shards, query store,
optional refinement and correction), and the publishing rename to ``scan/`` with its ``request.json``."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from influencer.runs import paths
from influencer.runs.checks import (
    RequestError,
    RunHooks,
    check_count,
    check_positions,
    check_precision,
    guard_memory,
    load_model_timed,
    model_source,
    parse_budget,
    resolve_device,
)
from influencer.runs.data import data_record, fit_sequences, read_documents, scan_data_settings, tokenize_documents

_CORRECT = {"auto": None, "on": True, "off": False}


@dataclass
class ScannedRun:
    """A finished scan with what it was made of: the result, the tokenizer and the scanned sequences (to show
    hits as text), the queries and the recorded request (``request.json``)."""

    result: Any
    tokenizer: Any
    sequences: Any
    queries: list[dict[str, str]]
    request: dict[str, Any]


def refine_steps(value: int | str) -> int | str:
    """``refine``: "auto" or a number of CG steps ≥ 0 (RequestError otherwise)."""
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    try:
        steps = int(text)
    except ValueError:
        steps = -1
    if steps < 0:
        raise RequestError(f"{{}} takes 'auto' or a number of CG steps ≥ 0, got {value!r}", "refine")
    return steps


def self_correction(value: bool | str | None) -> bool | None:
    """``self_correct``: auto (None), on (True) or off (False)."""
    if value is None or isinstance(value, bool):
        return value
    if value.strip().lower() not in _CORRECT:
        raise RequestError(f"{{}} takes auto, on or off, got {value!r}", "self_correct")
    return _CORRECT[value.strip().lower()]


def read_query_list(queries: str | os.PathLike[str] | list[Mapping[str, str]]) -> list[dict[str, str]]:
    """Queries from a JSON Lines file, or a list of {"prompt", "completion"} mappings (checked: a completion)."""
    from influencer.data import DataError, read_queries

    if isinstance(queries, (str, os.PathLike)):
        return read_queries(Path(queries))
    out = []
    for i, q in enumerate(queries, 1):
        if not isinstance(q, Mapping) or not isinstance(q.get("completion"), str):
            raise DataError(f"query {i}: give a mapping with a 'prompt' and a 'completion' string")
        if not q["completion"].strip():
            raise DataError(f"query {i}: the completion is empty; a query measures log p(completion | prompt)")
        out.append(
            {
                "prompt": str(q.get("prompt", "")),
                "completion": q["completion"],
                **{k: str(v) for k, v in q.items() if k not in ("prompt", "completion")},
            }
        )
    if not out:
        raise RequestError("no queries: give at least one prompt and completion")
    return out


def describe_plan(plan: Any) -> str:
    """One line on the refinement the cost model chose."""
    from influencer.units import cg_steps

    if plan.steps == 0:
        return f"none ({plan.reason}); the curvature's own answer"
    return (
        f"{cg_steps(plan.steps)} over {plan.sample} of the fit's sequences ({plan.reason}; predicted "
        f"{100 * plan.predicted:.0f}% of the scan's cost, allowed {100 * plan.share:.0f}%)"
    )


def scan_run(
    run: str | os.PathLike[str],
    queries: str | os.PathLike[str] | list[Mapping[str, str]],
    *,
    chat_template: bool = False,
    system: str | None = None,
    query_max_length: int | None = None,
    query_truncation: str = "error",
    rank: int | None = 32,
    top_k: int = 10,
    prefilter: int | None = None,
    tokens: bool = True,
    keep_scores: bool = False,
    refine: int | str = "auto",
    refine_sequences: int | None = None,
    self_correct: bool | str | None = "auto",
    split_completion: int = 0,
    precision: str = "float32",
    shard_size: int = 1024,
    n_train: int | None = None,
    data: str | os.PathLike[str] | None = None,
    data_options: Mapping[str, Any] | None = None,
    model: str | os.PathLike[str] | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    dtype: str | None = None,
    overwrite: bool = False,
    memory_budget: int | str | None = "auto",
    hooks: RunHooks | None = None,
) -> ScannedRun:
    """What :meth:`influencer.runs.Run.scan` does (see there), returning the scan with its pieces."""
    import influencer as inf
    import influencer.distributed as dist
    from influencer.data import encode_queries, sequence_digest
    from influencer.io import atomic_write_json
    from influencer.ledger import ResumeConflictError

    hooks = hooks or RunHooks()
    timer, run = hooks.timer, Path(run).expanduser()
    steps, correct, rank = refine_steps(refine), self_correction(self_correct), rank or None
    for name, value in (("top_k", top_k), ("shard_size", shard_size), ("batch_size", batch_size)):
        check_count(name, value)
    for name, value in (("prefilter", prefilter), ("n_train", n_train), ("refine_sequences", refine_sequences)):
        check_count(name, value)
    check_count("rank", rank, at_least=0)
    check_precision(precision)
    if refine_sequences is not None and steps == 0:
        raise RequestError("{} sets the refinement sample; it needs refine auto or N ≥ 1", "refine_sequences")
    budget = parse_budget(memory_budget)

    def refuse_finished() -> None:
        if dist.is_main() and (run / paths.SCAN).exists() and not overwrite:  # rank 0 decides about the run
            raise RequestError(f"{run / paths.SCAN} already holds a scan; pass {{}} to replace it", "overwrite")

    def check() -> tuple[dict[str, Any], list[dict[str, str]], str, str, dict[str, Any], Any]:
        record = paths.read_run(run)
        query_list = read_query_list(queries)
        source = model_source(model) if model is not None else record["model"]["source"]
        settings = scan_data_settings(record["data"], data, **dict(data_options or {}))
        refuse_finished()
        docs = read_documents(settings, timer)  # bad data fails before the model loads
        return record, query_list, resolve_device(device), source, settings, docs

    record, query_list, device_name, source, settings, docs = hooks.agree(check)
    with paths.locked_run(run, "scan"):  # until the scan is published: one writer per run
        refuse_finished()  # a scan finished before the lock was had
        batch = batch_size or record["fit"].get("batch_size", 8)

        def load() -> tuple[Any, ...]:
            net, tok = load_model_timed(timer, source, dtype or record["model"].get("dtype", "float32"), device_name)
            with timer.stage("load curvature"):
                curv = inf.Curvature.load(run / paths.CURVATURE, net)
            seqs = tokenize_documents(tok, settings, docs, timer)
            same_data = data is None and settings.get("sequences") == record["data"].get("sequences")
            if same_data and sequence_digest(seqs.batch) != record["data"].get("digest"):
                raise RequestError(
                    f"the training data at {settings['source']} changed since the fit (other tokens); pass {{}} "
                    "to scan it anyway",
                    "data",
                )
            hooks.say(f"data: {seqs.report.summary()}")
            qbatch, qreport = encode_queries(
                tok,
                query_list,
                max_length=query_max_length,
                truncation=query_truncation,
                chat_template=chat_template,
                system=system,
            )
            hooks.say(f"queries: {qreport.summary()}")
            check_positions(net, seqs.batch, "training sequences", "max_length")
            check_positions(net, qbatch, "queries", "query_max_length")
            refine_batch = None
            if steps != 0:  # the fit's sequences (the data the curvature describes), which the refinement samples
                refine_batch = seqs.batch if same_data else fit_sequences(record["data"], tok, timer).batch
            candidates = None
            if prefilter is not None and dist.is_main():  # rank 0 ranks the candidates, every rank scans them
                candidates = _prefilter(timer, tok, seqs, qbatch, prefilter)
            return net, tok, curv, seqs, qbatch, qreport, candidates, refine_batch

        net, tok, curv, seqs, qbatch, qreport, candidates, refine_batch = hooks.agree(load)
        if prefilter is not None and dist.world_size() > 1:
            candidates = dist.broadcast_tensors(None if candidates is None else {"c": candidates})["c"]
        task = inf.CausalLM(pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0)
        guard_memory(
            timer,
            budget,
            device_name,
            "scan",
            net,
            task,
            seqs.batch,
            curv.layer_names,
            strategy=curv.strategy,
            blocks=curv.blocks,
            rank=rank,
            n_queries=len(query_list),
            batch_size=batch,
            top_k=top_k,
        )

        def target() -> tuple[str, bool]:
            partial = paths.check_scan_target(run, overwrite=overwrite)
            return str(partial), (partial / "scan.json").is_file()

        # rank 0 checks (and with overwrite clears) the target; the others wait, then follow its decision
        where, resumed = dist.broadcast_object(dist.run_collectively(target))
        partial = Path(where)
        if resumed:
            hooks.say(f"resuming the unfinished scan in {partial}")
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
                refine=steps,
                n_queries=len(query_list),
                n_scan=n_scan,
                rank=rank,
                sample=refine_sequences,
                progress=hooks.progress,
            )
            if plan is not None:
                hooks.say(f"refinement: {describe_plan(plan)}")
        with timer.stage("influence", f"{len(query_list)} queries × {len(seqs)} sequences"):
            try:
                result = inf.scan(
                    net,
                    task,
                    inverse,
                    qbatch,
                    seqs.batch,
                    rank=rank,
                    top_k=top_k,
                    batch_size=batch,
                    candidates=candidates,
                    keep_scores=keep_scores,
                    tokens=tokens,
                    out_dir=partial,
                    shard_size=shard_size,
                    n_train=n_train,
                    refine=0,  # decided above, over the fit's sequences
                    self_correct=correct,
                    precision=precision,
                    progress=hooks.progress,
                )
            except ResumeConflictError as exc:
                raise RequestError(
                    f"{run / paths.SCAN_PARTIAL} holds an unfinished scan made with {exc.setting}="
                    f"{exc.saved!r:.60}, this one asks {exc.setting}={exc.asked!r:.60}: pass {{}} to discard it",
                    "overwrite",
                ) from None
        if split_completion > 0:
            _split_completion(timer, net, task, inverse, qbatch, seqs, tok, result, split_completion, batch)
            dist.run_collectively(lambda: result.save(partial))
        request = {
            "format": "influencer.scan-request",
            "version": 1,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "queries": query_list,
            "query_report": qreport.as_dict(),
            "chat_template": chat_template,
            "system": system,
            "model": source,
            "data": data_record(settings, docs, seqs),
            "settings": {
                "rank": rank,
                "top_k": top_k,
                "prefilter": prefilter,
                "tokens": tokens,
                "keep_scores": keep_scores,
                "batch_size": batch,
                "shard_size": shard_size,
                "refine": steps,
                "refine_sequences": refine_sequences,
                "refine_plan": None if plan is None else plan.to_dict(),
                "split_completion": split_completion,
                "precision": precision,
                "self_correct": {None: "auto", True: "on", False: "off"}[correct],
                "inverse": inverse.describe(),
                "n_train": result.n_train,
                "device": device_name,
                "resumed": resumed,
                "processes": dist.world_size(),
            },
            "versions": paths.versions(),
            "timings": timer.as_dict() if hasattr(timer, "as_dict") else {},
        }

        def publish() -> None:
            atomic_write_json(partial / paths.SCAN_REQUEST, request)
            paths.publish_scan(run)

        dist.run_collectively(publish)  # rank 0 writes; a failure fails every rank
    result.directory = run / paths.SCAN
    return ScannedRun(result, tok, seqs, query_list, request)


def _prefilter(timer: Any, tok: Any, seqs: Any, qbatch: dict[str, Any], n: int) -> Any:
    """Each query's BM25 top-``n`` training sequences (paper §3.2.1)."""
    from influencer.prefilter import BM25Index, completion_mask

    with timer.stage("prefilter", f"BM25 top {n}"):
        index = BM25Index(
            seqs.batch["input_ids"],
            attention_mask=seqs.batch["attention_mask"],
            vocab_size=max(len(tok), int(seqs.batch["input_ids"].max()) + 1),
            ignore_ids=tok.all_special_ids,
        )
        _, candidates = index.candidates(qbatch, n=n, query_mask=completion_mask(qbatch), per_query=True)
    return candidates


def _split_completion(
    timer: Any, net: Any, task: Any, inverse: Any, qbatch: Any, seqs: Any, tok: Any, result: Any, n: int, batch: int
) -> None:
    """Split each query's top-``n`` hits over its completion tokens; stored in ``result.meta["completion_split"]``."""
    from influencer.completion import completion_split
    from influencer.pieces import token_pieces

    hits = {q: [h.index for h in result.top(q, n)] for q in range(result.n_queries)}
    hits = {q: v for q, v in hits.items() if v}
    with timer.stage("completion split", f"{sum(map(len, hits.values()))} hits"):
        splits = completion_split(net, task, inverse, qbatch, seqs.batch, hits, batch_size=batch)
    for sp in splits:
        sp.texts = token_pieces(tok, sp.tokens)
    result.meta["completion_split"] = {str(sp.query): sp.to_json() for sp in splits}
