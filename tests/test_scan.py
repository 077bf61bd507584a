"""Streaming scan: equals the exact pairwise scores at full rank; rank-k convergence; layer/token sums;
bands; prefilter candidates; memory independent of N; resumable after SIGKILL."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import zoo

import influencer as inf
from influencer.scan import BANDS, contraction_costs


@pytest.fixture(scope="module")
def lm():
    model = zoo.tiny_llama(hidden=16, intermediate=32, layers=3)
    task = inf.CausalLM()
    train = zoo.token_data(48, t=9)
    queries = {"input_ids": zoo.token_data(6, t=8, seed=3), "prompt_length": torch.tensor([2, 3, 4, 2, 5, 3])}
    curv = inf.fit_curvature(model, task, train, progress=False)
    full = inf.pairwise_scores(model, task, curv, queries, train, progress=False)
    return model, task, train, queries, curv, full


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


@pytest.mark.parametrize("contraction", [None, "tokens", "materialize"])
def test_full_rank_scan_equals_pairwise_top_k(lm, contraction) -> None:
    model, task, train, queries, curv, full = lm
    result = inf.scan(
        model,
        task,
        curv,
        queries,
        train,
        rank=None,
        top_k=7,
        batch_size=5,
        contraction=contraction,
        keep_scores=True,
        progress=False,
    )
    torch.testing.assert_close(result.scores, full.total, rtol=1e-9, atol=1e-9)
    for q in range(full.total.shape[0]):
        for negative in (False, True):
            values, idx = torch.topk(full.total[q], 7, largest=not negative)
            hits = result.top(q, negative=negative)
            assert [h.index for h in hits] == idx.tolist()
            torch.testing.assert_close(
                torch.tensor([h.score for h in hits], dtype=values.dtype), values, rtol=1e-5, atol=0
            )
            for h in hits:  # per-layer values of each hit are the pairwise per-layer scores
                for name, v in h.layers.items():
                    assert v == pytest.approx(float(full.per_layer[name][q, h.index]), rel=1e-6, abs=1e-9)
        stats = result.stats(q)
        assert stats["count"] == 48
        assert stats["sum"] == pytest.approx(float(full.total[q].sum()), rel=1e-9)
        assert stats["positive_sum"] == pytest.approx(float(full.total[q].clamp_min(0).sum()), rel=1e-9)


def test_rank_k_converges_to_full_rank(lm) -> None:
    model, task, train, queries, curv, full = lm
    curve = {}
    for k in (1, 2, 4, 8, 16):
        r = inf.scan(model, task, curv, queries, train, rank=k, keep_scores=True, tokens=False, progress=False)
        curve[k] = _pearson(r.scores, full.total)
    print(
        "\ntiny Llama (3 layers, MLP 16→32): Pearson(rank-k, exact) by k:",
        ", ".join(f"{k}: {v:.4f}" for k, v in curve.items()),
    )
    values = list(curve.values())
    assert all(b >= a - 1e-6 for a, b in itertools.pairwise(values))
    assert curve[8] >= 0.99
    assert curve[16] == pytest.approx(1.0, abs=1e-9)  # k·(d_out + w) ≥ d_out·w: stored exactly
    store = inf.QueryStore.build(model, task, curv, queries, rank=4)
    assert store.nbytes() < store.exact_nbytes()
    assert "at rank 4" in store.memory_report()
    # built in chunks of 4 queries (bounded memory) == built at once
    chunked = inf.QueryStore.build(model, task, curv, queries, rank=4, batch_size=4)
    whole = inf.QueryStore.build(model, task, curv, queries, rank=4, batch_size=6)
    assert chunked.n_queries == whole.n_queries == 6
    for name, x in whole.layers.items():
        torch.testing.assert_close(chunked.layers[name].to_dense(), x.to_dense(), rtol=1e-5, atol=1e-7)


def test_layer_and_token_sums_equal_sequence_score(lm) -> None:
    model, task, train, queries, curv, _full = lm
    result = inf.scan(model, task, curv, queries, train, rank=4, top_k=4, progress=False)
    lengths = torch.full((48,), 9)
    for q in range(6):
        for hits in (result.top(q), result.top(q, negative=True), result.top(q, band="middle")):
            for h in hits:
                assert sum(h.layers.values()) == pytest.approx(h.score, rel=1e-5)
                assert h.tokens is not None and h.tokens.shape == (int(lengths[h.index]),)
                assert float(h.tokens.sum()) == pytest.approx(h.score, rel=1e-5)
                assert h.layer_tokens.shape == (len(curv.layers), int(lengths[h.index]))
                layer_sums = h.layer_tokens.sum(1)
                torch.testing.assert_close(
                    layer_sums, torch.tensor(list(h.layers.values()), dtype=torch.float64), rtol=1e-5, atol=1e-9
                )
                assert isinstance(h.spurious, bool)


def test_bands_rerank_by_layer_thirds(lm) -> None:
    model, task, train, queries, curv, full = lm
    result = inf.scan(model, task, curv, queries, train, rank=None, top_k=5, tokens=False, progress=False)
    names = list(full.per_layer)
    thirds = {"lower": names[:3], "middle": names[3:6], "upper": names[6:]}
    for band in BANDS:
        band_scores = sum(full.per_layer[n] for n in thirds[band])
        for q in range(6):
            assert [h.index for h in result.top(q, band=band)] == torch.topk(band_scores[q], 5).indices.tolist()


def test_candidates_restrict_pairs(lm) -> None:
    model, task, train, queries, curv, full = lm
    cands = [torch.arange(q, 48, 3) for q in range(6)]
    result = inf.scan(
        model,
        task,
        curv,
        queries,
        train,
        rank=None,
        top_k=3,
        candidates=cands,
        tokens=False,
        keep_scores=True,
        progress=False,
    )
    for q in range(6):
        masked = torch.full((48,), float("-inf"), dtype=torch.float64)
        masked[cands[q]] = full.total[q, cands[q]]
        assert [h.index for h in result.top(q)] == torch.topk(masked, 3).indices.tolist()
        assert result.stats(q)["count"] == len(cands[q])
    assert result.meta["prefiltered"]
    unfiltered = inf.scan(model, task, curv, queries, train, rank=None, top_k=3, tokens=False, progress=False)
    shares = result.overlap(unfiltered)
    for q in range(6):
        expected = len({h.index for h in result.top(q)} & {h.index for h in unfiltered.top(q)}) / 3
        assert shares[q] == pytest.approx(expected)
    with pytest.raises(ValueError, match="outside"):
        inf.scan(model, task, curv, queries, train, candidates=[torch.tensor([99])] * 6, progress=False)


def test_save_load_and_resume_skip(lm, tmp_path: Path) -> None:
    model, task, train, queries, curv, _full = lm
    out = tmp_path / "scan"
    first = inf.scan(model, task, curv, queries, train, rank=4, top_k=3, out_dir=out, shard_size=10, progress=False)
    loaded = inf.ScanResult.load(out)
    assert [h.index for h in loaded.top(2)] == [h.index for h in first.top(2)]
    assert loaded.token_scores.keys() == first.token_scores.keys()
    manifest = json.loads((out / "scan.json").read_text())
    assert manifest["done"] == [0, 1, 2, 3, 4]
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    again = inf.scan(model, task, curv, queries, train, rank=4, top_k=3, out_dir=out, shard_size=10, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()} == stamps
    assert torch.equal(again.state.top.values, first.state.top.values)
    other_queries = {**queries, "prompt_length": torch.tensor([3, 3, 4, 2, 5, 3])}
    with pytest.raises(ValueError, match="other queries"):
        inf.scan(model, task, curv, other_queries, train, rank=4, top_k=3, out_dir=out, shard_size=10, progress=False)
    with pytest.raises(ValueError, match="different settings"):
        inf.scan(model, task, curv, queries, train, rank=4, top_k=5, out_dir=out, shard_size=10, progress=False)


def test_shared_layer_and_conv1d_token_sums() -> None:
    model = zoo.SharedMLP()
    x, y = zoo.regression_data(20, seed=5)
    task = inf.Regression()
    curv = inf.fit_curvature(model, task, (x, y), progress=False)
    full = inf.pairwise_scores(model, task, curv, (x[:3], y[:3]), (x, y), progress=False)
    result = inf.scan(model, task, curv, (x[:3], y[:3]), (x, y), rank=None, top_k=4, progress=False)
    for q in range(3):
        for h in result.top(q):
            assert h.score == pytest.approx(float(full.total[q, h.index]), rel=1e-9)
            assert float(h.tokens.sum()) == pytest.approx(h.score, rel=1e-9)
    gpt2 = zoo.tiny_gpt2(hidden=8)
    ids = zoo.token_data(12, t=6)
    q = {"input_ids": zoo.token_data(2, t=6, seed=8), "prompt_length": 3}
    c = inf.fit_curvature(gpt2, inf.CausalLM(), ids, progress=False)
    f = inf.pairwise_scores(gpt2, inf.CausalLM(), c, q, ids, progress=False)
    r = inf.scan(gpt2, inf.CausalLM(), c, q, ids, rank=None, top_k=3, progress=False)
    for h in r.top(1):
        assert h.score == pytest.approx(float(f.total[1, h.index]), rel=1e-9)
        assert float(h.tokens.sum()) == pytest.approx(h.score, rel=1e-9)


def test_cost_model() -> None:
    # many queries, short rank: per-token contraction; few tokens + exact queries: either; long T: materialize
    low = contraction_costs(q=1, k=32, t=48, d_out=1536, w=577)
    assert low["tokens"] < low["materialize"]
    many = contraction_costs(q=256, k=32, t=48, d_out=1536, w=577)
    assert many["materialize"] < many["tokens"]


_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    import zoo, influencer as inf
    model = zoo.tiny_llama(hidden=16, intermediate=32, layers=2)
    task = inf.CausalLM()
    train = zoo.token_data({n}, t=9)
    queries = {{"input_ids": zoo.token_data(3, t=8, seed=3), "prompt_length": 3}}
    curv = inf.fit_curvature(model, task, train, progress=False)
    r = inf.scan(model, task, curv, queries, train, rank=4, top_k=5, out_dir={out!r}, shard_size=8,
                 batch_size=4, progress=False, tokens=False)
    print("TOP", [h.index for h in r.top(0)])
""")


def _run_scan(out: Path, n: int, **popen) -> subprocess.Popen:
    code = _SCRIPT.format(tests=str(Path(__file__).parent), n=n, out=str(out))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True, **popen
    )


def test_sigkill_mid_scan_then_resume(tmp_path: Path) -> None:
    out = tmp_path / "killed"
    proc = _run_scan(out, 400)
    manifest = out / "scan.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if manifest.is_file() and len(json.loads(manifest.read_text())["done"]) >= 3:
            break
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the scan finished before it could be killed: make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = json.loads(manifest.read_text())["done"]
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    assert 3 <= len(done_before) < 50
    resumed = _run_scan(out, 400)
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr
    for name in (f"{s:06d}.safetensors" for s in done_before):  # finished shards were not recomputed
        assert (out / "shards" / name).stat().st_mtime_ns == stamps[name]
    clean = _run_scan(tmp_path / "clean", 400)
    clean_out, err = clean.communicate(timeout=600)
    assert clean.returncode == 0, err
    assert stdout.split("TOP")[1] == clean_out.split("TOP")[1]
    a = inf.ScanResult.load(out)
    b = inf.ScanResult.load(tmp_path / "clean")
    assert torch.equal(a.state.top.values, b.state.top.values)
    assert torch.equal(a.state.total, b.state.total)


_MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    import zoo, influencer as inf
    model = zoo.tiny_llama(hidden=32, intermediate=64, layers=2, dtype=torch.float32)
    task = inf.CausalLM()
    curv = inf.fit_curvature(model, task, zoo.token_data(64, t=16), progress=False)
    queries = {{"input_ids": zoo.token_data(64, t=12, seed=3), "prompt_length": 6}}
    store = inf.QueryStore.build(model, task, curv, queries, rank=8)
    train = zoo.token_data({n}, t=16, seed=1)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = inf.scan(model, task, curv, queries, train, store=store, top_k=10, batch_size=32, progress=False,
                 tokens=False)
    print("RSS", base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")


def test_scan_memory_does_not_grow_with_n(tmp_path: Path) -> None:
    peaks = {}
    for n in (2000, 8000):
        code = _MEMORY_SCRIPT.format(tests=str(Path(__file__).parent), n=n)
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert out.returncode == 0, out.stderr
        _base, peak = map(int, out.stdout.split("RSS")[1].split())
        peaks[n] = peak
    print(f"\npeak RSS of a 64-query scan: N=2000 {peaks[2000] / 1024:.0f} MiB, N=8000 {peaks[8000] / 1024:.0f} MiB")
    # a [Q, N] float64 matrix at 4N would add 64·8000·8 B ≈ 4 MiB over N; allow 3 MiB of allocator noise
    assert peaks[8000] - peaks[2000] < 3 * 1024
