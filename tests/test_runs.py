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


# ------------------------------------------------------------------------------------ Run.fit / Run.scan


class _Hooks:
    """Hooks that record what a run reports: stages entered and messages said."""

    def __init__(self) -> None:
        self.stages: list[str] = []
        self.said: list[str] = []

    def make(self):
        import contextlib
        import types

        from influencer.runs import RunHooks

        @contextlib.contextmanager
        def stage(name: str, detail: str = ""):
            self.stages.append(name)
            yield types.SimpleNamespace(detail=detail)

        return RunHooks(timer=types.SimpleNamespace(stage=stage), say=self.said.append)


def test_run_fit_and_scan_from_python_match_the_command_line(ws, tmp_path) -> None:  # noqa: F811
    """The library's Run.fit writes the run the command line writes (same settings → the same factors, bit for
    bit), and Run.scan returns the scan `influencer scan` writes (same hits, same scores)."""
    from influencer.io import load_tensors

    seen = _Hooks()
    run = Run.fit(ws.model, str(ws.train), tmp_path / "lib", batch_size=8, seed=3, hooks=seen.make())
    assert isinstance(run, Run) and run.path == tmp_path / "lib"
    assert {"read data", "load model", "tokenize", "fit", "save"} <= set(seen.stages)
    assert any(s.startswith("data: ") for s in seen.said)
    cli, lib = (load_tensors(p / "curvature" / "factors.safetensors") for p in (ws.run, run.path))
    assert cli.keys() == lib.keys() and all(torch.equal(cli[k], lib[k]) for k in cli)
    assert run.record["data"]["digest"] == Run.open(ws.run).record["data"]["digest"]

    result = run.scan(QUERIES, tokens=False, hooks=seen.make())
    assert isinstance(result, inf.ScanResult) and result.directory == run.path / "scan"
    assert run.request()["settings"]["rank"] == 32 and run.request()["queries"][0]["prompt"] == QUERIES[0]["prompt"]
    other = tmp_path / "cli"
    shutil.copytree(ws.run, other)
    ok(invoke("scan", other, "--queries", ws.queries, "--no-tokens"))
    theirs = Run.open(other).result()
    for q in range(len(QUERIES)):
        mine, cli_hits = result.top(q, 5), theirs.top(q, 5)
        assert [h.index for h in mine] == [h.index for h in cli_hits]
        assert torch.allclose(torch.tensor([h.score for h in mine]), torch.tensor([h.score for h in cli_hits]))
    # a second scan is refused until asked to overwrite; then it replaces the first
    from influencer.runs import RequestError

    with pytest.raises(RequestError, match="already holds a scan; pass overwrite"):
        run.scan(QUERIES[:1], tokens=False)
    again = run.scan(QUERIES[:1], tokens=False, overwrite=True, rank=0)
    assert again.n_queries == 1 and run.request()["settings"]["rank"] is None


@pytest.mark.parametrize(
    ("call", "parameter", "expect"),
    [
        (lambda m, d, o: Run.fit(m, d, o, damping_factor=float("nan")), "damping_factor", "finite"),
        (lambda m, d, o: Run.fit(m, d, o, damping=-1.0), "damping", "≥ 0"),
        (lambda m, d, o: Run.fit(m, d, o, batch_size=0), "batch_size", "≥ 1"),
        (lambda m, d, o: Run.fit(m, d, o, layers=""), "layers", "empty"),
        (lambda m, d, o: Run.fit(m, d, o, precision="fp8"), "precision", "float32 or bfloat16"),
        (lambda m, d, o: Run.fit(m, d, o, memory_budget="lots"), "memory_budget", "memory_budget"),
        (lambda m, d, o: Run.fit(m, d, o, memory_budget=1 << 20), None, "would peak at"),
        (lambda m, d, o: Run.fit(m, d, o, data_options={"packing": True, "max_length": None}), "max_length", "packing"),
    ],
)
def test_run_fit_refuses_bad_requests_naming_the_parameter(ws, tmp_path, call, parameter, expect) -> None:  # noqa: F811
    """Bad requests to the library raise before anything is written, naming the parameter as Python spells it."""
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=expect) as info:
        call(ws.model, str(ws.train), out)
    if parameter is not None:
        from influencer.runs import RequestError

        assert isinstance(info.value, RequestError) and info.value.parameter == parameter
        assert parameter in str(info.value) and "--" not in str(info.value)
    assert not out.exists() or not any(out.iterdir())


def test_run_scan_refuses_bad_requests_before_loading(ws, tmp_path) -> None:  # noqa: F811
    from influencer.data import DataError
    from influencer.runs import RequestError

    path = tmp_path / "run"
    shutil.copytree(ws.run, path)
    run = Run.open(path)
    before = sorted(p.name for p in path.iterdir())
    for kwargs, match in [
        ({"refine": "lots"}, "refine takes"),
        ({"self_correct": "maybe"}, "self_correct takes"),
        ({"top_k": 0}, "top_k must be ≥ 1"),
        ({"data_options": {"max_length": 9}}, "need data"),
        ({"refine": 0, "refine_sequences": 4}, "refine_sequences sets"),
    ]:
        with pytest.raises(RequestError, match=match):
            run.scan(QUERIES, **kwargs)
    with pytest.raises(DataError, match="completion is empty"):
        run.scan([{"prompt": "x", "completion": "  "}])
    with pytest.raises(RequestError, match="no queries"):
        run.scan([])
    assert sorted(p.name for p in path.iterdir()) == before
