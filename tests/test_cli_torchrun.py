"""The command line under torchrun: ``torchrun --standalone --nproc-per-node 2 -m influencer fit|scan …`` (gloo on
the CPU) writes the same run as one process, prints its tables once, and a refused request ends every process
with one ``error: …`` line.

The model is the tiny local Hugging Face Llama of tests/tiny_hf.py; the single-process runs go through the same
typer app in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
typer_testing = pytest.importorskip("typer.testing")

from test_distributed import _operator_error  # noqa: E402
from tiny_hf import tiny_model_folder  # noqa: E402

import influencer as inf  # noqa: E402
from influencer.cli import app  # noqa: E402
from influencer.data import kjv_verses  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"
QUERIES = [
    {"prompt": "In the beginning God created", "completion": " the heaven and the earth."},
    {"prompt": "And God said,", "completion": " Let there be light."},
]


def _torchrun() -> list[str]:
    """torchrun next to this Python (a virtual environment's bin/), else the module it runs."""
    script = Path(sys.executable).with_name("torchrun")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "torch.distributed.run"]


def torchrun(*args: object, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = [*_torchrun(), "--standalone", "--nproc-per-node", "2", "-m", "influencer", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)


def invoke(*args: object) -> str:
    result = typer_testing.CliRunner(env={"COLUMNS": "200"}).invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    return result.output


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> types.SimpleNamespace:
    """A tiny model folder, data and queries; a fit + scan by one process and by a 2-process torchrun job."""
    if not torch.distributed.is_available():
        pytest.skip("this torch has no torch.distributed")
    root = tmp_path_factory.mktemp("torchrun")
    model = tiny_model_folder(root / "tiny")
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps({"text": v["text"]}) + "\n" for v in kjv_verses(24)), encoding="utf-8")
    queries = root / "q.jsonl"
    queries.write_text("".join(json.dumps(q) + "\n" for q in QUERIES), encoding="utf-8")
    fit_args = [model, train, "--batch-size", "4", "--seed", "3"]  # 6 batches, uneven over the ranks' shares
    scan_args = ["--queries", queries, "--rank", "4", "--top-k", "5", "--shard-size", "5"]
    one, two = root / "one", root / "two"
    invoke("fit", *fit_args, "--out", one)
    invoke("scan", one, *scan_args)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(
        {
            "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1",
            "COLUMNS": "200",
        }
    )
    fit = torchrun("fit", *fit_args, "--out", two, "--device", "cpu", env=env)
    assert fit.returncode == 0, fit.stderr[-4000:]
    scan = torchrun("scan", two, *scan_args, "--device", "cpu", env=env)
    assert scan.returncode == 0, scan.stderr[-4000:]
    return types.SimpleNamespace(root=root, one=one, two=two, fit=fit, scan=scan, env=env, scan_args=scan_args)


def test_torchrun_fit_equals_one_process(ws) -> None:
    err = _operator_error(inf.Curvature.load(ws.two / "curvature"), inf.Curvature.load(ws.one / "curvature"))
    assert err < 1e-6, err
    one, two = (json.loads((d / "run.json").read_text()) for d in (ws.one, ws.two))
    assert two["fit"]["processes"] == 2 and one["fit"]["processes"] == 1
    assert two["data"]["digest"] == one["data"]["digest"]
    assert sorted(p.name for p in ws.two.iterdir()) == ["curvature", "run.json", "scan"]  # no temporary leftovers


def test_torchrun_scan_equals_one_process(ws) -> None:
    a, b = inf.ScanResult.load(ws.two / "scan"), inf.ScanResult.load(ws.one / "scan")
    assert a.n_scanned == b.n_scanned == 24
    for q in range(len(QUERIES)):
        # float32 scores from curvatures equal up to summation order: equal relative to the query's largest score
        scale = max(abs(h.score) for h in [*b.top(q), *b.top(q, negative=True)])
        for kwargs in ({}, {"negative": True}, {"band": "lower"}, {"band": "upper"}):
            ha, hb = a.top(q, **kwargs), b.top(q, **kwargs)
            assert [h.index for h in ha] == [h.index for h in hb], (q, kwargs)
            for x, y in zip(ha, hb, strict=True):
                assert abs(x.score - y.score) < 1e-6 * scale, (q, kwargs, x.score, y.score)
    request = json.loads((ws.two / "scan" / "request.json").read_text())
    assert request["settings"]["processes"] == 2
    assert not (ws.two / "scan.partial").exists()
    state = json.loads((ws.two / "scan" / "scan.json").read_text())
    assert state["done"] == list(range(5)) == list(range(state["shards"]))  # 24 sequences in shards of 5


def test_torchrun_prints_one_copy_of_the_output(ws) -> None:
    fit_out, scan_out = ws.fit.stdout, ws.scan.stdout
    assert fit_out.count("fit timings (rank 0 of 2 processes)") == 1, fit_out
    assert fit_out.count("data: 24 documents") == 1 and fit_out.count("fitted ekfac") == 1, fit_out
    assert scan_out.count("scan timings (rank 0 of 2 processes)") == 1, scan_out
    for q in range(1, len(QUERIES) + 1):
        assert scan_out.count(f"Query {q} ") == 1, scan_out
    assert scan_out.count("wrote ") == 1, scan_out
    for proc in (ws.fit, ws.scan):
        assert "error" not in proc.stderr.lower() and "Traceback" not in proc.stderr, proc.stderr


def test_torchrun_refusal_ends_every_process_with_one_error_line(ws) -> None:
    before = (ws.two / "scan" / "result.safetensors").read_bytes()
    proc = torchrun("scan", ws.two, *ws.scan_args, "--device", "cpu", env=ws.env)  # already holds a scan
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {ws.two / 'scan'} already holds a scan; pass --overwrite to replace it"], proc.stderr
    assert proc.stdout.strip() == ""
    assert (ws.two / "scan" / "result.safetensors").read_bytes() == before
