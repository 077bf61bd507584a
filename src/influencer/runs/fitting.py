"""Fit the curvature of a model on a data set and write a run directory: every check first, then the lock, the
resumable fit (checkpoints in a sibling folder), and one atomic write of ``run.json`` + ``curvature/``."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from influencer.runs import paths
from influencer.runs.checks import (
    RequestError,
    RunHooks,
    check_count,
    check_layers_early,
    check_number,
    check_precision,
    guard_memory,
    load_model_timed,
    model_source,
    parse_budget,
    resolve_device,
    select_layers_checked,
)
from influencer.runs.data import data_record, data_settings, read_documents, tokenize_documents


def fit_run(
    model: str | os.PathLike[str],
    data: str | os.PathLike[str] | dict[str, Any],
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    layers: str = "mlp",
    strategy: str = "ekfac",
    fisher: str = "true",
    damping: float | None = None,
    damping_factor: float = 0.1,
    blocks: int = 1,
    n_train: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    checkpoint_every: int = 1024,
    device: str = "auto",
    dtype: str = "float32",
    precision: str = "float32",
    memory_budget: int | str | None = "auto",
    hooks: RunHooks | None = None,
) -> paths.Path:
    """What :meth:`influencer.runs.Run.fit` does (see there); returns the run directory's path."""
    import influencer as inf
    import influencer.distributed as dist
    from influencer.models import describe_model

    hooks = hooks or RunHooks()
    timer = hooks.timer

    def check() -> tuple[Path, str, str, dict[str, Any], int | None, Any]:
        # rank 0 decides about the run directory (it alone writes it); the other checks run everywhere
        check_number("damping", damping, at_least=0)
        check_number("damping_factor", damping_factor, above=0)
        for name, value in (("blocks", blocks), ("batch_size", batch_size), ("checkpoint_every", checkpoint_every)):
            check_count(name, value)
        check_count("n_train", n_train)
        check_precision(precision)
        budget = parse_budget(memory_budget)
        target = paths.check_fit_target(out, overwrite=overwrite) if dist.is_main() else Path(out).expanduser()
        settings = dict(data) if isinstance(data, dict) else data_settings(data)
        source = model_source(model)
        check_layers_early(source, layers)  # before the weights are read
        docs = read_documents(settings, timer)  # bad data fails before the model loads
        return target, resolve_device(device), source, settings, budget, docs

    target, device_name, source, settings, budget, docs = hooks.agree(check)
    with paths.locked_run(target, "fit"):  # until the run directory is written
        if dist.is_main():  # another fit may have finished between the check and the lock
            paths.check_fit_target(out, overwrite=overwrite)
        partial = paths.fit_partial(target)  # checkpoints and finished stages until the run is written
        if overwrite and dist.is_main():
            paths.discard_partial(partial)
        elif partial.exists():
            hooks.say(f"resuming the unfinished fit in {partial}")

        def load() -> tuple[Any, Any, Any, list[Any]]:
            from influencer.runs.checks import check_positions

            net, tok = load_model_timed(timer, source, dtype, device_name)
            seqs = tokenize_documents(tok, settings, docs, timer)
            hooks.say(f"data: {seqs.report.summary()}")
            check_positions(net, seqs.batch, "training sequences", "max_length")
            return net, tok, seqs, select_layers_checked(net, layers)

        net, tok, seqs, tracked = hooks.agree(load)
        task = inf.CausalLM(pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0)
        names = [x.name for x in tracked]
        guard_memory(
            timer,
            budget,
            device_name,
            "fit",
            net,
            task,
            seqs.batch,
            names,
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
                layers=names,
                blocks=blocks,
                batch_size=batch_size,
                n_train=n_train,
                seed=seed,
                out_dir=partial,
                checkpoint_every=checkpoint_every,
                progress=hooks.progress,
                precision=precision,
            )
        record = {
            "format": paths.FORMAT,
            "version": paths.VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model": {
                "source": source,
                "description": describe_model(source),
                "class": type(net).__name__,
                "dtype": dtype,
                "device": device_name,
                "parameters": sum(p.numel() for p in net.parameters()),
            },
            "data": data_record(settings, docs, seqs),
            "fit": {
                "strategy": strategy,
                "fisher": fisher,
                "layers": layers,
                "tracked_layers": curv.layer_names,
                "damping": damping,
                "damping_factor": damping_factor,
                "blocks": blocks,
                "seed": seed,
                "precision": precision,
                "batch_size": batch_size,
                "n_fit": curv.n_fit,
                "n_train": curv.n_train,
                "factor_bytes": curv.nbytes(),
                "processes": dist.world_size(),
            },
            "versions": paths.versions(),
        }
        with timer.stage("save"):
            record["timings"] = timer.as_dict() if hasattr(timer, "as_dict") else {}

            def write(tmp: Path) -> None:
                curv.save(tmp / paths.CURVATURE)
                (tmp / paths.RUN_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

            dist.run_collectively(lambda: paths.write_fit(target, write))  # rank 0 writes; a failure fails all
            if dist.is_main():
                shutil.rmtree(partial, ignore_errors=True)
    return target


@contextlib.contextmanager
def _resumable(partial: Path) -> Any:
    """An unfinished fit with other settings is refused naming the setting (``overwrite`` discards it)."""
    from influencer.ledger import ResumeConflictError

    try:
        yield
    except ResumeConflictError as exc:
        raise RequestError(
            f"{partial} holds an unfinished fit made with {exc.setting}={exc.saved!r:.60}, this one asks "
            f"{exc.setting}={exc.asked!r:.60}: run the same fit to finish it, or pass {{}} to discard it",
            "overwrite",
        ) from None
