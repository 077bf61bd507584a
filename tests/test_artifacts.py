"""Every artifact verifies itself on load: a flipped byte anywhere in any file of a curvature, a fit partition,
a fit checkpoint, a query store, a scan (result, shards, progress record) or a score matrix is refused with an
error naming the file — never loaded as different numbers. A changed setting on resume is refused naming it."""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import zoo

import influencer as inf
from influencer.curvature.checkpoint import _Checkpoint
from influencer.curvature.sums import _Sums
from influencer.io import CorruptArtifactError, atomic_save_tensors, atomic_write_json, load_tensors, read_json
from influencer.ledger import ResumeConflictError, check_resume


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """One of every artifact, written by the library's own save paths."""
    root = tmp_path_factory.mktemp("artifacts")
    model = zoo.tiny_llama(hidden=16, intermediate=32, layers=2)
    task = inf.CausalLM()
    train = zoo.token_data(12, t=7)
    queries = {"input_ids": zoo.token_data(3, t=6, seed=3), "prompt_length": torch.tensor([2, 3, 2])}
    curv = inf.fit_curvature(model, task, train, progress=False)
    curv.save(root / "curvature")
    kwargs = dict(rank=2, top_k=3, shard_size=5, keep_scores=True, refine=0, progress=False)
    inf.scan(model, task, curv, queries, train, out_dir=root / "scan", **kwargs)
    inf.pairwise_scores(model, task, curv, queries, train, progress=False).save(root / "scores")
    inf.fit_partition(model, task, train, root / "partition", strategy="kfac", progress=False)
    return root, model, task, train, queries, curv, kwargs


NAMES = [
    "curvature/manifest.json",
    "curvature/factors.safetensors",
    "scan/queries.json",
    "scan/queries.safetensors",
    "scan/result.json",
    "scan/result.safetensors",
    "scan/shards/000001.safetensors",
    "scan/scan.json",
    "scores/scores.json",
    "scores/scores.safetensors",
    "partition/partition.json",
    "partition/sums.safetensors",
]


def _loaders(made) -> dict[str, Callable[[Path], object]]:
    _, model, task, train, queries, curv, kwargs = made

    def scan_scores(d: Path) -> object:
        return inf.ScanResult.load(d).scores

    def resume(d: Path) -> object:
        return inf.scan(model, task, curv, queries, train, out_dir=d, **kwargs)

    return {
        "curvature/manifest.json": lambda d: inf.Curvature.load(d, model),
        "curvature/factors.safetensors": lambda d: inf.Curvature.load(d, model),
        "scan/queries.json": inf.QueryStore.load,
        "scan/queries.safetensors": inf.QueryStore.load,
        "scan/result.json": inf.ScanResult.load,
        "scan/result.safetensors": inf.ScanResult.load,
        "scan/shards/000001.safetensors": scan_scores,
        "scan/scan.json": resume,
        "scores/scores.json": inf.Scores.load,
        "scores/scores.safetensors": inf.Scores.load,
        "partition/partition.json": lambda d: inf.merge_fit([d]),
        "partition/sums.safetensors": lambda d: inf.merge_fit([d]),
    }


def _positions(size: int, rng: random.Random, n: int = 12) -> list[int]:
    """Byte offsets to damage: the first bytes (a safetensors header, JSON keys), the last, and random ones."""
    head = list(range(min(size, 24)))
    return sorted({*rng.sample(head, min(len(head), 6)), size - 1, *(rng.randrange(size) for _ in range(n))})


@pytest.mark.parametrize("name", NAMES)
def test_a_flipped_byte_is_detected_on_load(made, tmp_path, name) -> None:
    root = made[0]
    load = _loaders(made)[name]
    top = name.split("/")[0]
    clean = tmp_path / "clean"
    shutil.copytree(root / top, clean / top)
    load(clean / top)  # the undamaged artifact loads
    original = (root / name).read_bytes()
    rng = random.Random(name)
    for pos in _positions(len(original), rng):
        for mask in (0x01, 0x80):
            work = tmp_path / f"flip{pos}_{mask}"
            shutil.copytree(root / top, work / top)
            damaged = bytearray(original)
            damaged[pos] ^= mask
            (work / name).write_bytes(bytes(damaged))
            with pytest.raises((ValueError, FileNotFoundError, KeyError)) as info:
                load(work / top)
            message = str(info.value)
            assert Path(name).name in message or f"{work / top}'" in message, (pos, mask, message)
            shutil.rmtree(work)


def test_checksums_round_trip_and_mismatch(tmp_path) -> None:
    tensors = {"a": torch.randn(3, 4, dtype=torch.float64), "b": torch.arange(5), "c": torch.zeros(0)}
    digest = atomic_save_tensors(tmp_path / "t.safetensors", tensors)
    back = load_tensors(tmp_path / "t.safetensors", expect=digest, required=True)
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    with pytest.raises(CorruptArtifactError, match="does not match"):
        load_tensors(tmp_path / "t.safetensors", expect="0" * 64)
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "plain.safetensors"))  # written by someone else: no checksum
    assert load_tensors(tmp_path / "plain.safetensors").keys() == tensors.keys()
    with pytest.raises(CorruptArtifactError, match="no checksum"):
        load_tensors(tmp_path / "plain.safetensors", required=True)

    atomic_write_json(tmp_path / "m.json", {"version": 2, "x": [1, 2]}, seal=True)
    assert read_json(tmp_path / "m.json", sealed=True) == {"version": 2, "x": [1, 2]}
    text = (tmp_path / "m.json").read_text().replace('"x": [\n    1', '"x": [\n    3')
    (tmp_path / "m.json").write_text(text)
    with pytest.raises(CorruptArtifactError, match="edited"):
        read_json(tmp_path / "m.json", sealed=True)
    atomic_write_json(tmp_path / "old.json", {"version": 1, "x": 1})  # a format from before checksums
    assert read_json(tmp_path / "old.json", sealed=True, legacy_below=2) == {"version": 1, "x": 1}
    with pytest.raises(CorruptArtifactError, match="no checksum"):
        read_json(tmp_path / "old.json", sealed=True)


def test_a_damaged_fit_checkpoint_is_refused(tmp_path) -> None:
    sums = _Sums.__new__(_Sums)  # only its state is used: a stand-in with two tensors
    state = ({"x": torch.randn(4)}, {"n": 1})
    sums.state = lambda: state  # type: ignore[method-assign]
    sums.load_state = lambda t, m: None  # type: ignore[method-assign]
    ckpt = _Checkpoint(tmp_path, "covariance", {"k": 1}, every=1)
    ckpt.save(sums, 3)
    assert _Checkpoint(tmp_path, "covariance", {"k": 1}, every=1).restore(sums, 0) == 3
    (file,) = tmp_path.glob("*.safetensors")
    data = bytearray(file.read_bytes())
    data[-1] ^= 0x01
    file.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match=file.name):
        _Checkpoint(tmp_path, "covariance", {"k": 1}, every=1).restore(sums, 0)


def test_a_changed_setting_is_named() -> None:
    with pytest.raises(ResumeConflictError) as info:
        check_resume(
            "d", "scan", {"rank": 32, "layers": ["a"], "x": {"y": 1}}, {"rank": 8, "layers": ["a"], "x": {"y": 1}}
        )
    assert info.value.setting == "rank" and (info.value.saved, info.value.asked) == (32, 8)
    assert "rank=32" in str(info.value) and "rank=8" in str(info.value)
    with pytest.raises(ResumeConflictError, match=r"x\.y=1"):
        check_resume("d", "fit", {"x": {"y": 1}}, {"x": {"y": 2}})
    check_resume("d", "fit", {"a": 1}, {"a": 1})


def test_scan_resumed_with_another_rank_is_refused(made, tmp_path) -> None:
    root, model, task, train, queries, curv, kwargs = made
    shutil.copytree(root / "scan", tmp_path / "scan")
    with pytest.raises(ResumeConflictError, match=r"rank=2.*rank=4"):
        inf.scan(model, task, curv, queries, train, out_dir=tmp_path / "scan", **{**kwargs, "rank": 4})


def test_curvature_with_a_damping_that_is_not_finite_is_refused(made, tmp_path) -> None:
    root, model, *_ = made
    shutil.copytree(root / "curvature", tmp_path / "c")
    m = read_json(tmp_path / "c" / "manifest.json", sealed=True)
    first = next(iter(m["layers"]))
    m["layers"][first]["damping"] = -1.0
    atomic_write_json(tmp_path / "c" / "manifest.json", m, seal=True)  # a consistent but wrong manifest
    with pytest.raises(CorruptArtifactError, match="damping"):
        inf.Curvature.load(tmp_path / "c", model)
    with pytest.raises(ValueError, match="finite"):
        inf.fit_curvature(model, inf.CausalLM(), zoo.token_data(4, t=5), damping_factor=float("nan"), progress=False)


def test_artifacts_follow_the_umask(made, tmp_path) -> None:
    """Atomic writes go through mkstemp/mkdtemp (0600/0700); the final files get what the umask gives."""
    import os

    curv = made[5]
    old = os.umask(0o027)
    try:
        curv.save(tmp_path / "c")
        atomic_write_json(tmp_path / "m.json", {"a": 1})
    finally:
        os.umask(old)
    for path in (tmp_path / "c" / "manifest.json", tmp_path / "c" / "factors.safetensors", tmp_path / "m.json"):
        assert path.stat().st_mode & 0o777 == 0o640, (path, oct(path.stat().st_mode))
