"""influencer.runs.Run: a run directory as a Python object — what the command line wrote, read back and reported."""

from __future__ import annotations

import shutil

import pytest
import torch
from test_cli import (
    QUERIES,
    invoke,
    ok,
    ws,  # noqa: F401  (the shared fixture: a tiny model folder, data and one fitted run)
)

import influencer as inf
from influencer.runs import Run, RunDirError


def test_a_run_reads_back_what_the_command_line_wrote(ws, tmp_path) -> None:  # noqa: F811
    pytest.importorskip("jinja2")
    path = tmp_path / "run"
    shutil.copytree(ws.run, path)
    run = Run.open(path)
    assert run.record["fit"]["strategy"] == "ekfac" and run.record["model"]["source"] == str(ws.model)
    with pytest.raises(RunDirError, match="no finished scan"):
        run.result()
    ok(invoke("scan", path, "--queries", ws.queries, "--no-tokens"))
    result = run.result()
    assert isinstance(result, inf.ScanResult) and result.n_queries == len(QUERIES)
    assert [q["completion"] for q in run.request()["queries"]] == [q["completion"] for q in QUERIES]
    from influencer.models import load_model

    model, _ = load_model(ws.model)
    curv = run.curvature(model)  # checked against the model it was fitted on
    assert curv.layer_names == run.record["fit"]["tracked_layers"]
    page = run.report(top=3)
    assert page == path / "report.html" and "<html" in page.read_text(encoding="utf-8")
    # the page shows the scan's hits, whose scores the library reproduces from the run's own pieces
    first = result.top(0, 1)[0]
    assert f"training sequence <strong>{first.index}</strong>" in page.read_text(encoding="utf-8")
    assert torch.isfinite(torch.tensor(first.score))
    with pytest.raises(RunDirError, match="is a directory"):
        run.report(tmp_path)


def test_open_refuses_what_is_not_a_run(tmp_path) -> None:
    with pytest.raises(RunDirError, match="no such run directory"):
        Run.open(tmp_path / "missing")
    with pytest.raises(RunDirError, match="not a complete run directory"):
        Run.open(tmp_path)
