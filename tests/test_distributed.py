"""Scaling out: a 2-process gloo group equals one process; partitions + merge equal one run; the run-directory
lock; the distributed helpers are no-ops outside a process group."""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import dist_worker
import pytest
import torch
from safetensors.torch import load_file

import influencer as inf
import influencer.distributed as dist
from influencer.io import RunLock, RunLockedError

TESTS = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _operator_error(a: inf.Curvature, b: inf.Curvature) -> float:
    """Largest relative difference of (G + λ)⁻¹ V over the layers, for random V (eigenvector signs and rotations
    inside degenerate eigenspaces do not matter), and of the damping and eigenvalues."""
    assert list(a.layers) == list(b.layers)
    assert a.fingerprint == b.fingerprint
    assert (a.n_fit, a.strategy, a.blocks) == (b.n_fit, b.strategy, b.blocks)
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for name, f in a.layers.items():
        other = b.layers[name]
        assert f.tokens == other.tokens
        v = torch.randn(3, *f.shape, generator=g, dtype=torch.float64)
        x, y = a.precondition(name, v), b.precondition(name, v)
        worst = max(worst, float((x - y).norm() / y.norm()), abs(f.damping - other.damping) / other.damping)
        for key in ("eig_a", "eig_s", "lam"):
            p, q = getattr(f, key), getattr(other, key)
            if q is not None:
                worst = max(worst, float((p - q).abs().max() / q.abs().max()))
    return worst


def _same_top(a: inf.ScanResult, b: inf.ScanResult, rel: float = 1e-9) -> None:
    assert a.n_scanned == b.n_scanned
    for q in range(a.n_queries):
        for kwargs in ({}, {"negative": True}, {"band": "lower"}, {"band": "upper"}):
            ha, hb = a.top(q, **kwargs), b.top(q, **kwargs)
            assert [h.index for h in ha] == [h.index for h in hb], (q, kwargs)
            for x, y in zip(ha, hb, strict=True):
                assert x.score == pytest.approx(y.score, rel=rel)
                if y.tokens is not None:
                    atol = rel * float(y.tokens.abs().max()) + 1e-12  # relative to the hit's largest token
                    torch.testing.assert_close(x.tokens, y.tokens, rtol=rel, atol=atol)
        sa, sb = a.stats(q), b.stats(q)
        for key in sa:
            assert sa[key] == pytest.approx(sb[key], rel=rel, abs=1e-12)


def _tensors_equal(a: Path, b: Path) -> None:
    for name in ("factors.safetensors", "result.safetensors"):
        if (a / name).is_file():
            ta, tb = load_file(str(a / name)), load_file(str(b / name))
            assert ta.keys() == tb.keys()
            for key in ta:
                assert torch.equal(ta[key], tb[key]), key


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """The worker run by a 2-process gloo group and by one process."""
    two = tmp_path_factory.mktemp("two")
    port = _free_port()
    procs = []
    for r in range(2):
        env = {
            **os.environ,
            "RANK": str(r),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(r),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(TESTS / "dist_worker.py"), str(two)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-4000:]
    one = tmp_path_factory.mktemp("one")
    dist_worker.main(one)
    return two, one


def test_two_processes_agree_with_each_other_bitwise(runs) -> None:
    two, _ = runs
    for name in ("curv", "curv_resumable", "curv_partitions", "scan", "scan_sharded"):
        _tensors_equal(two / "r0" / name, two / "r1" / name)


def test_two_processes_equal_one_process(runs) -> None:
    two, one = runs
    single = inf.Curvature.load(one / "r0" / "curv")
    for name in ("curv", "curv_resumable", "curv_partitions"):
        err = _operator_error(inf.Curvature.load(two / "r0" / name), single)
        assert err < 1e-6, (name, err)
    assert _operator_error(inf.Curvature.load(one / "r0" / "curv_partitions"), single) < 1e-6
    ref = inf.ScanResult.load(one / "r0" / "scan")
    for name in ("scan", "scan_sharded"):
        _same_top(inf.ScanResult.load(two / "r0" / name), ref)
    torch.testing.assert_close(inf.ScanResult.load(two / "r0" / "scan").scores, ref.scores, rtol=1e-9, atol=1e-12)
    # the distributed run directories are complete and consistent
    fit = json.loads((two / "fit" / "fit.json").read_text())
    assert fit["done"] == ["covariance", "eigenvalues", "curvature"]
    assert not (two / "fit" / "partial").exists()
    scan = json.loads((two / "scan_dir" / "scan.json").read_text())
    assert scan["done"] == list(range(scan["shards"])) and scan["shards"] == 7


# --------------------------------------------------------------------------------------------------------
# Partitions + merge (one process)
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm():
    model, task, train, queries = dist_worker.setup()
    return model, task, train, queries, inf.fit_curvature(model, task, train, progress=False)


def test_fit_partitions_by_data_and_layer_group_equal_one_fit(lm, tmp_path: Path) -> None:
    model, task, train, _, ref = lm
    n = len(train)
    low, high = r"model\.layers\.[01]\.mlp\.", r"model\.layers\.2\.mlp\."
    cov = [
        inf.fit_partition(
            model, task, train, tmp_path / f"cov{i}", layers=g, data_range=r, batch_size=b, progress=False
        )
        for i, (g, r, b) in enumerate([(low, (0, 17), 5), (low, (17, n), 3), (high, (0, 30), 7), (high, (30, n), 2)])
    ]
    basis = inf.merge_fit(list(reversed(cov)))  # order of the paths does not matter
    assert not basis.complete
    with pytest.raises(ValueError, match="no eigenvalues"):
        basis.precondition(basis.layer_names[0], torch.zeros(basis.layers[basis.layer_names[0]].shape))
    basis.save(tmp_path / "basis")
    lam = [
        inf.fit_partition(
            model, task, train, tmp_path / f"lam{i}", layers=g, data_range=r, basis=tmp_path / "basis", progress=False
        )
        for i, (g, r) in enumerate([(low, (0, 9)), (low, (9, n)), (high, None)])
    ]
    merged = inf.merge_fit(lam, basis=tmp_path / "basis")
    assert merged.complete and merged.layer_names == ref.layer_names
    assert _operator_error(merged, ref) < 1e-9
    merged.bind(model)  # the rebuilt fingerprint is the one of a single fit
    # a finished partition returns at once
    again = inf.fit_partition(model, task, train, tmp_path / "lam2", layers=high, basis=basis, progress=False)
    assert again == tmp_path / "lam2"
    for strategy in ("kfac", "diagonal"):
        one = inf.fit_curvature(model, task, train, strategy=strategy, progress=False)
        parts = [
            inf.fit_partition(
                model, task, train, tmp_path / f"{strategy}{i}", strategy=strategy, data_range=r, progress=False
            )
            for i, r in enumerate([(0, 11), (11, n)])
        ]
        assert _operator_error(inf.merge_fit(parts), one) < 1e-9


def test_merge_fit_refuses_gaps_overlaps_and_mixed_settings(lm, tmp_path: Path) -> None:
    model, task, train, _, _ = lm
    n = len(train)

    def part(name: str, r: tuple[int, int], **kw) -> Path:
        return inf.fit_partition(model, task, train, tmp_path / name, data_range=r, progress=False, **kw)

    a, b, c = part("a", (0, 20)), part("b", (20, n)), part("c", (15, n))
    with pytest.raises(ValueError, match=r"sequences \[20, 37\) are in no partition"):
        inf.merge_fit([a])
    with pytest.raises(ValueError, match="overlap"):
        inf.merge_fit([a, c])
    with pytest.raises(ValueError, match="differ in seed"):
        inf.merge_fit([a, part("s", (20, n), seed=1)])
    with pytest.raises(ValueError, match="basis"):
        inf.merge_fit([part("l", (0, n), basis=inf.merge_fit([a, b]))])
    with pytest.raises(ValueError, match="data_range"):
        part("bad", (5, 5))
    with pytest.raises(ValueError, match="data_range"):
        part("a", (0, 21))


def test_scan_partitions_merge_to_one_scan(lm, tmp_path: Path) -> None:
    model, task, train, queries, curv = lm
    kw = {"rank": 4, "top_k": 5, "keep_scores": True, "batch_size": 4, "progress": False}
    ref = inf.scan(model, task, curv, queries, train, **kw)
    for i, r in enumerate([(0, 13), (13, 30), (30, len(train))]):
        inf.scan(model, task, curv, queries, train, data_range=r, out_dir=tmp_path / f"s{i}", shard_size=6, **kw)
    merged = inf.merge_scans([tmp_path / "s2", tmp_path / "s0", tmp_path / "s1"])
    _same_top(merged, ref, rel=1e-12)
    torch.testing.assert_close(merged.scores, ref.scores, rtol=1e-12, atol=1e-12, equal_nan=True)
    merged.save(tmp_path / "merged")
    _same_top(inf.ScanResult.load(tmp_path / "merged"), ref, rel=1e-12)
    with pytest.raises(ValueError, match="scanned once"):
        inf.merge_scans([tmp_path / "s0", tmp_path / "s0"])


# --------------------------------------------------------------------------------------------------------
# Lock and helpers
# --------------------------------------------------------------------------------------------------------


def test_lock_refuses_a_second_writer_and_takes_over_stale_locks(lm, tmp_path: Path) -> None:
    model, task, train, _, _ = lm
    run = tmp_path / "run"
    with RunLock(run, purpose="fit"):
        with pytest.raises(RunLockedError, match=rf"in use by pid {os.getpid()} on host {socket.gethostname()}"):
            RunLock(run).acquire()
        with pytest.raises(RunLockedError, match="fit"):
            inf.fit_curvature(model, task, train, out_dir=run, progress=False)
    # a lock file left by a dead process (no flock held) is taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run / "lock.json").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    inf.fit_curvature(model, task, train, out_dir=run, progress=False, strategy="diagonal")
    # a lock held by another live process
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import sys, time; sys.path.insert(0, {str(TESTS)!r}); "
            "from influencer.io import RunLock; l = RunLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(60)",
            str(run),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
            inf.scan(
                model,
                task,
                inf.fit_curvature(model, task, train, progress=False),
                {"input_ids": train[:1], "prompt_length": 3},
                train,
                out_dir=run,
                progress=False,
            )
    finally:
        holder.kill()
        holder.wait()


def test_helpers_are_no_ops_outside_a_process_group() -> None:
    assert not dist.is_distributed()
    assert (dist.rank(), dist.world_size(), dist.is_main()) == (0, 1, True)
    t = torch.arange(4.0)
    assert dist.all_reduce_sum_(t) is t and torch.equal(t, torch.arange(4.0))
    assert dist.broadcast_(t, 0) is t
    dist.barrier()
    assert dist.all_gather_object({"a": 1}) == [{"a": 1}]
    assert dist.broadcast_object([1, 2]) == [1, 2]
    assert dist.all_gather_tensors({"x": t})[0]["x"] is t
    with dist.main_process_first():
        pass
    assert dist.only_main(lambda: 5)() == 5
    assert dist.init() is False
    assert dist.shard_range(0, 10) == (0, 10)
    # shards of any range cover it exactly, in order
    for n in (0, 1, 7, 10):
        for w in (1, 2, 3, 4):
            parts = [dist.shard_range(3, 3 + n, rank_=r, world=w) for r in range(w)]
            assert parts[0][0] == 3 and parts[-1][1] == 3 + n
            assert all(a[1] == b[0] for a, b in itertools.pairwise(parts))
    owners = dist.assign([1.0, 8.0, 1.0, 1.0], world=2)
    assert owners[1] != owners[0] and owners.count(owners[1]) == 1


def test_readme_partition_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import re

    text = (TESTS.parent / "README.md").read_text()
    section = text.split("## Scaling out", 1)[1].split("## Layout", 1)[0]
    block = next(b for b in re.findall(r"```python\n(.*?)```", section, re.S) if "fit_partition" in b)
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(block, "README partitions example", "exec"), ns)
    one = inf.fit_curvature(ns["model"], ns["task"], (ns["X"], ns["Y"]), progress=False)
    assert _operator_error(ns["curv"], one) < 1e-5  # float32
    ref = inf.scan(ns["model"], ns["task"], one, ns["queries"], (ns["X"], ns["Y"]), progress=False)
    assert [h.index for h in ns["result"].top(0)] == [h.index for h in ref.top(0)]


def test_partition_state_lives_in_its_ledger(lm, tmp_path: Path) -> None:
    """partition.json is the partition's ledger: settings (another partition into the same folder is refused naming
    the setting), done-records (an unfinished partition is not merged; running it again finishes it) and the
    checksum of its sums."""
    from influencer.ledger import Ledger, ResumeConflictError

    model, task, train, _, _ = lm
    n = len(train)
    whole = inf.fit_partition(model, task, train, tmp_path / "whole", progress=False)
    record = Ledger.read(whole / "partition.json")
    assert record["done"] == ["sums"] and len(record["sha256_tensors"]) == 64
    assert record["config"]["data_range"] == [0, n]
    with pytest.raises(ResumeConflictError) as info:
        inf.fit_partition(model, task, train, whole, seed=5, progress=False)
    assert info.value.setting == "seed" and (info.value.saved, info.value.asked) == (0, 5)
    reference = inf.merge_fit([whole])
    # the state a kill between the ledger's opening and the commit leaves: settings recorded, nothing done
    Ledger(whole / "partition.json", "fit partition", record["config"], format=record["format"]).mark([])
    with pytest.raises(FileNotFoundError, match="unfinished"):
        inf.merge_fit([whole])
    inf.fit_partition(model, task, train, whole, progress=False)  # finishes it
    again = inf.merge_fit([whole])
    assert all(torch.equal(again.layers[k].eig_a, reference.layers[k].eig_a) for k in reference.layers)
