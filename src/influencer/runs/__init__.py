"""Run directories: what ``influencer fit`` writes and ``scan`` / ``report`` read, as files and as an object.

::

    RUN_DIR/
      run.json              model source, data source and settings, sizes, versions, stage timings
      curvature/            Curvature.save: manifest.json + factors.safetensors
      scan/                 ScanResult.save + the scan's query store and shards, request.json (queries, settings)
      scan.partial/         an unfinished (resumable) scan; renamed to scan/ when complete
      report.html           influencer report

Every write is atomic: a fit fills a temporary sibling folder and renames it into place; a scan is renamed from
``scan.partial`` only when complete. Nothing is written before the inputs have been checked.

Modules: :mod:`.paths` (layout, lock, checked moves), :mod:`.checks` (hooks and checks before the expensive
part), :mod:`.data` (data settings), :mod:`.fitting` and :mod:`.scanning` (the two applications), :mod:`.run`
(:class:`Run`).
"""

from influencer.runs.checks import RequestError, RunHooks
from influencer.runs.data import data_settings, read_documents, tokenize_documents
from influencer.runs.paths import (
    CURVATURE,
    REPORT,
    RUN_FILE,
    SCAN,
    SCAN_PARTIAL,
    SCAN_REQUEST,
    RunDirError,
    check_fit_target,
    check_scan_target,
    check_writable,
    discard_partial,
    fit_partial,
    locked_run,
    publish_scan,
    read_run,
    read_scan_request,
    versions,
    write_fit,
)
from influencer.runs.run import Run
from influencer.runs.scanning import ScannedRun, scan_run

__all__ = [
    "CURVATURE",
    "REPORT",
    "RUN_FILE",
    "SCAN",
    "SCAN_PARTIAL",
    "SCAN_REQUEST",
    "RequestError",
    "Run",
    "RunDirError",
    "RunHooks",
    "ScannedRun",
    "check_fit_target",
    "check_scan_target",
    "check_writable",
    "data_settings",
    "discard_partial",
    "fit_partial",
    "locked_run",
    "publish_scan",
    "read_documents",
    "read_run",
    "read_scan_request",
    "scan_run",
    "tokenize_documents",
    "versions",
    "write_fit",
]
