"""CUDA (skipped without a GPU): fits, scans and query refinement on the GPU equal the CPU ones; bf16 autocast
runs and stays close, as do the bf16 precisions of the fit and the scan; a 2-process group with the model on the
GPU equals one CPU process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dist_worker
import pytest
import torch
import zoo
from test_distributed import _free_port, _operator_error, _same_top

import influencer as inf

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def both():
    cpu = zoo.tiny_llama(hidden=32, intermediate=64, layers=2, dtype=torch.float32)
    gpu = zoo.tiny_llama(hidden=32, intermediate=64, layers=2, dtype=torch.float32).cuda()
    train = zoo.token_data(40, t=12)
    queries = {"input_ids": zoo.token_data(3, t=10, seed=3), "prompt_length": 4}
    return cpu, gpu, inf.CausalLM(), train, queries


def test_gpu_fit_and_scan_equal_cpu(both, tmp_path: Path) -> None:
    cpu, gpu, task, train, queries = both
    c_cpu = inf.fit_curvature(cpu, task, train, progress=False)
    c_gpu = inf.fit_curvature(gpu, task, train, progress=False)
    assert _operator_error(c_gpu, c_cpu) < 1e-3
    resumable = inf.fit_curvature(gpu, task, train, progress=False, out_dir=tmp_path / "fit", checkpoint_every=7)
    assert _operator_error(resumable, c_cpu) < 1e-3
    parts = [
        inf.fit_partition(gpu, task, train, tmp_path / f"p{i}", data_range=r, progress=False)
        for i, r in enumerate([(0, 15), (15, 40)])
    ]
    basis = inf.merge_fit(parts)
    lam = [inf.fit_partition(gpu, task, train, tmp_path / "l", basis=basis, progress=False)]
    assert _operator_error(inf.merge_fit(lam, basis=basis), c_cpu) < 1e-3
    s_cpu = inf.scan(cpu, task, c_cpu, queries, train, rank=None, top_k=5, progress=False)
    s_gpu = inf.scan(
        gpu, task, c_cpu, queries, train, rank=None, top_k=5, progress=False, out_dir=tmp_path / "scan", shard_size=9
    )
    _same_top(s_gpu, s_cpu, rel=1e-3)


def test_refinement_on_the_gpu_equals_cpu(both) -> None:
    cpu, gpu, task, train, queries = both
    curv = inf.fit_curvature(cpu, task, train, progress=False)
    r_cpu = inf.preconditioned_queries(cpu, task, inf.RefinedInverse(cpu, task, curv, train, steps=5), queries)
    gpu_inverse = inf.RefinedInverse(gpu, task, curv.to("cuda"), train, steps=5)
    r_gpu = inf.preconditioned_queries(gpu, task, gpu_inverse, queries)
    for name, p in r_cpu.items():
        assert r_gpu[name].is_cuda
        assert float((r_gpu[name].cpu() - p).norm() / p.norm()) < 1e-3


def test_bf16_autocast_runs_and_stays_close(both) -> None:
    _, gpu, task, train, queries = both
    ref = inf.fit_curvature(gpu, task, train, progress=False)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        curv = inf.fit_curvature(gpu, task, train, progress=False)
        result = inf.scan(gpu, task, curv, queries, train, rank=None, top_k=5, keep_scores=True, progress=False)
    for f in curv.layers.values():  # the math ran in float32 / float64 whatever the autocast
        assert f.lam is not None and f.lam.dtype == torch.float32 and f.qa[0].dtype == torch.float32
    full = inf.scan(gpu, task, ref, queries, train, rank=None, top_k=5, keep_scores=True, progress=False)
    corr = torch.corrcoef(torch.stack([result.scores.flatten(), full.scores.flatten()]))[0, 1]
    print(f"\nbf16 autocast vs float32: operator error {_operator_error(curv, ref):.3f}, score Pearson {corr:.4f}")
    assert corr > 0.95  # bf16 rounding of the activations perturbs small eigenvalues, not the scores


def test_bf16_precision_on_the_gpu_stays_close(both) -> None:
    """fit(precision="bfloat16") and scan(precision="bfloat16") on the GPU (the batched Λ kernel): within the CPU
    bounds of tests/test_precision.py."""
    _, gpu, task, train, queries = both
    ref = inf.fit_curvature(gpu, task, train, fisher="empirical", progress=False)
    low = inf.fit_curvature(gpu, task, train, fisher="empirical", precision="bfloat16", progress=False)
    err = torch.cat(
        [((low.layers[n].lam - f.lam).abs() / (f.lam + f.damping)).flatten() for n, f in ref.layers.items()]
    )
    assert float(err.mean()) < 1e-2 and float(err.max()) < 0.1
    kw = dict(rank=None, top_k=5, keep_scores=True, tokens=False, progress=False)
    s_ref = inf.scan(gpu, task, ref, queries, train, **kw).scores
    s_low = inf.scan(gpu, task, low, queries, train, precision="bfloat16", **kw).scores
    assert float(((s_low - s_ref).norm(dim=1) / s_ref.norm(dim=1)).max()) < 2e-2


def test_two_processes_on_the_gpu_equal_one_cpu_process(tmp_path: Path) -> None:
    port = _free_port()
    procs = []
    for r in range(2):
        env = {
            **os.environ,
            "RANK": str(r),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "INFLUENCER_TEST_DEVICE": "cuda",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(TESTS / "dist_worker.py"), str(tmp_path / "two")],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-4000:]
    dist_worker.main(tmp_path / "one")  # CPU, one process
    single = inf.Curvature.load(tmp_path / "one" / "r0" / "curv")
    for name in ("curv", "curv_resumable", "curv_partitions"):
        assert _operator_error(inf.Curvature.load(tmp_path / "two" / "r0" / name), single) < 1e-6
    _same_top(
        inf.ScanResult.load(tmp_path / "two" / "r0" / "scan"),
        inf.ScanResult.load(tmp_path / "one" / "r0" / "scan"),
        rel=1e-5,
    )  # GPU vs CPU float32 sums
