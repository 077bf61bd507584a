"""A run directory as an object: :class:`Run` creates one (``Run.fit``), opens one, scans it and reports it —
what the ``influencer`` commands do, callable from Python."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from influencer.runs.checks import RunHooks, _NoTimer
from influencer.runs.data import read_documents, tokenize_documents
from influencer.runs.paths import CURVATURE, REPORT, SCAN, RunDirError, locked_run, read_run, read_scan_request


class Run:
    """A run directory (``run.json``, ``curvature/``, ``scan/``, ``report.html``) as an object.

    ``Run.fit(model, data, out)`` fits the curvature and creates one; ``Run.open(path)`` opens one (checking it
    is one); ``run.scan(queries)`` scores the training data against queries and writes ``scan/``;
    ``run.report()`` writes the HTML page. ``record`` (run.json), ``curvature(model)``, ``result()`` (the
    finished scan), ``request()`` (its request.json), ``training(tokenizer)`` (the scanned sequences, checked
    unchanged) read it. Every writer holds the run's lock; a killed fit or scan resumes when asked again with
    the same settings, and other settings are refused naming the one that differs. ``hooks``
    (:class:`influencer.runs.RunHooks`): stage timer, messages, progress bars.

    Example::

        run = Run.fit("smollm2-135m", "kjv", "runs/kjv", data_options={"sequences": 256})
        result = run.scan([{"prompt": "In the beginning God created", "completion": " the heaven"}])
        run.report()
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path).expanduser()
        self.record = read_run(self.path)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Run:
        return cls(path)

    @classmethod
    def fit(
        cls,
        model: str | os.PathLike[str],
        data: str | os.PathLike[str],
        out: str | os.PathLike[str],
        *,
        data_options: Mapping[str, Any] | None = None,
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
    ) -> Run:
        """Fit the curvature of ``model`` (a local Hugging Face folder or ``smollm2-135m``) on ``data`` (a file,
        folder, local Hugging Face dataset or ``kjv``) and write the run directory ``out`` atomically.

        ``data_options``: how the data is read and tokenized (:func:`influencer.runs.data_settings`: format,
        field, text_unit, split, sequences, max_length, packing, truncation, bos, eos). ``layers``: a preset
        (mlp, attention, all) or a regex of module names; ``strategy`` / ``fisher`` / ``damping`` /
        ``damping_factor`` / ``blocks`` / ``n_train`` / ``seed`` / ``precision`` (of the Λ pass: "float32" or
        "bfloat16"): as :func:`influencer.fit_curvature`.
        ``memory_budget``: "auto" (the memory available), "off", a size such as "20GB" or bytes; the planned
        peak is checked against it before the fit starts. Everything is checked before the model's weights are
        read; a killed fit resumes from its last checkpoint (every ``checkpoint_every`` sequences) when called
        again with the same settings; ``overwrite`` replaces an earlier fit (never one a live process holds).
        """
        from influencer.runs.data import data_settings
        from influencer.runs.fitting import fit_run

        settings = data_settings(data, **dict(data_options or {}))
        path = fit_run(
            model,
            settings,
            out,
            overwrite=overwrite,
            layers=layers,
            strategy=strategy,
            fisher=fisher,
            damping=damping,
            damping_factor=damping_factor,
            blocks=blocks,
            n_train=n_train,
            seed=seed,
            batch_size=batch_size,
            checkpoint_every=checkpoint_every,
            device=device,
            dtype=dtype,
            precision=precision,
            memory_budget=memory_budget,
            hooks=hooks,
        )
        return cls(path)

    def scan(self, queries: Any, *, hooks: RunHooks | None = None, **options: Any) -> Any:
        """Score the run's training sequences against ``queries`` (a JSON Lines file or a list of
        {"prompt", "completion"} mappings) and write ``scan/``; returns the :class:`influencer.ScanResult`.

        Options (see :func:`influencer.runs.scan_run` for all): ``rank`` (32; 0 or None exact), ``top_k``,
        ``prefilter`` (BM25 top N per query), ``tokens`` (per-token influence of hits), ``keep_scores``,
        ``refine`` ("auto", N CG steps, 0 = the paper's plain estimate), ``self_correct`` ("auto", "on", "off"),
        ``chat_template``, ``precision`` ("float32", or "bfloat16": the contraction in bf16, see
        :func:`influencer.scan`), ``data`` + ``data_options`` (another data set), ``overwrite``, ``memory_budget``.
        An interrupted scan resumes when called again with the same queries and settings.
        """
        from influencer.runs.scanning import scan_run

        return scan_run(self.path, queries, hooks=hooks, **options).result

    def curvature(self, model: Any = None) -> Any:
        """The fitted curvature (checked against ``model`` when given)."""
        from influencer.curvature import Curvature

        return Curvature.load(self.path / CURVATURE, model)

    def request(self) -> dict[str, Any]:
        return read_scan_request(self.path)

    def result(self) -> Any:
        """The finished scan (:class:`influencer.ScanResult`); RunDirError when there is none."""
        from influencer.scan import ScanResult

        self.request()  # the clear error when the run has no finished scan
        return ScanResult.load(self.path / SCAN)

    def training(self, tokenizer: Any, timer: Any = None) -> Any:
        """The sequences the scan scored (:class:`influencer.data.Sequences`), read and tokenized as the scan did;
        RunDirError when the data changed since (its texts would be shown against the wrong scores)."""
        from influencer.data import sequence_digest

        data = self.request()["data"]
        seqs = tokenize_documents(tokenizer, data, read_documents(data, timer), timer)
        if sequence_digest(seqs.batch) != data.get("digest"):
            raise RunDirError(
                f"the training data at {data['source']} changed since the scan; the report would show the wrong texts"
            )
        return seqs

    def report(
        self, out: str | os.PathLike[str] | None = None, *, top: int = 10, title: str | None = None, timer: Any = None
    ) -> Path:
        """Write the HTML report of the scan (``RUN/report.html`` by default, atomically); returns its path.
        Holds the run's lock while it reads, so a scan cannot replace ``scan/`` underneath."""
        from influencer.models import describe_model, load_tokenizer
        from influencer.pieces import token_pieces
        from influencer.report import write_report
        from influencer.units import units_note

        timer = timer or _NoTimer()
        target = Path(out).expanduser() if out is not None else self.path / REPORT
        if target.is_dir():
            raise RunDirError(f"{target} is a directory; give a file name with --out")
        request = self.request()
        with locked_run(self.path, "report"):
            with timer.stage("load scan"):
                result = self.result()
            with timer.stage("load tokenizer"):
                tok = load_tokenizer(request.get("model") or self.record["model"]["source"])
            seqs = self.training(tok, timer)
            ids, mask = seqs.batch["input_ids"], seqs.batch["attention_mask"]
            fit = self.record["fit"]
            model = self.record["model"]
            notes = [
                f"model: {model.get('description') or describe_model(model['source'])} ({model['class']})",
                f"curvature: {fit['strategy']} ({fit['fisher']} Fisher) on {len(fit['tracked_layers'])} layers "
                f"({fit['layers']}), fitted on {fit['n_fit']} sequences",
                f"data: {request['data']['source']} ({seqs.report.summary()})",
            ]
            if request["settings"].get("prefilter"):
                notes.append(f"BM25 prefilter: top {request['settings']['prefilter']} sequences per query were scored")
            notes.append(units_note(result.meta.get("inverse"), result.n_train, result.meta.get("self_correction")))
            with timer.stage("write report"):
                target.parent.mkdir(parents=True, exist_ok=True)
                return write_report(
                    result,
                    target,
                    queries=request["queries"],
                    train_tokens=lambda i: token_pieces(tok, ids[i, : int(mask[i].sum())].tolist()),
                    train_text=lambda i: tok.decode(ids[i, : int(mask[i].sum())].tolist()),
                    train_source=lambda i: str(seqs.labels[i]),
                    title=title or f"influencer report: {self.path.name}",
                    top=top,
                    notes=notes,
                )
