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
from pathlib import Path

import pytest
import reference as ref
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


def _token_case(case: str):
    """(model, task, train, queries) for the token-by-token check: ragged, loss-masked sequences for the LMs."""
    if case == "shared-mlp":
        x, y = zoo.regression_data(8, seed=5)
        return zoo.SharedMLP(), inf.Regression(), (x, y), (x[:2] * 0.8, y[:2])
    model = zoo.tiny_llama(hidden=8, intermediate=12) if case == "llama" else zoo.tiny_gpt2(hidden=8)
    ids = zoo.token_data(6, t=9, seed=7)
    train = [{"input_ids": ids[i, : 4 + i]} for i in range(6)]
    train[2]["loss_mask"] = torch.tensor([0, 0, 0, 1, 1, 0])  # tokens 1, 2 and 5 are no targets
    queries = {"input_ids": zoo.token_data(2, t=7, seed=4), "prompt_length": torch.tensor([2, 4])}
    return model, inf.CausalLM(), train, queries


@pytest.mark.parametrize(
    ("case", "strategy"), [("llama", "ekfac"), ("llama", "identity"), ("gpt2", "kfac"), ("shared-mlp", "diagonal")]
)
def test_token_values_equal_the_reference_position_by_position(case: str, strategy: str) -> None:
    """Hit.layer_tokens[l, t] = ⟨P_l, g_{l,t} ā_{l,t}ᵀ⟩ (Eq. 31) with P_l = −(G_l + λ_l)⁻¹ ∇_l f, value by value, and
    the value at position t belongs to the token at t (the one whose representation predicts token t + 1).

    The reference differentiates the loss along P_l applied at one position at a time (no g or ā formed) and
    builds (G_l + λ_l) from its own factors (reference.strategy_curvature, empirical Fisher)."""
    model, task, train, queries = _token_case(case)
    layers = [x.name for x in inf.select_layers(model, "all")]
    layers += ["lm_head"] if isinstance(task, inf.CausalLM) else []  # an output head is tracked only by name
    curv = inf.fit_curvature(model, task, train, strategy=strategy, fisher="empirical", layers=layers, progress=False)
    n = len(ref.examples(task, train))
    result = inf.scan(
        model,
        task,
        curv,
        queries,
        train,
        rank=None,
        top_k=n,
        batch_size=4,
        refine=0,
        self_correct=False,
        progress=False,
    )
    names = result.layer_names
    shapes = ref.layer_matrix_shapes(model, names)
    damped = ref.strategy_curvature(model, task, train, names, strategy)
    gq = ref.per_example_grads(model, task, queries, names, loss="measurement", queries=True)
    for q, v in enumerate(gq):
        precond = [
            -torch.linalg.solve(m, v_l.reshape(-1)).reshape(v_l.shape)
            for m, v_l in zip(damped, ref.split_by_layer(v, shapes), strict=True)
        ]
        expected = ref.token_influence(model, task, train, names, precond)  # per sequence [L, T]
        hits = result.top(q)
        assert sorted(h.index for h in hits) == list(range(n))
        for h in hits:
            want = expected[h.index]
            assert h.layer_tokens.shape == want.shape  # one value per real token (padding trimmed)
            scale = float(want.abs().max())
            torch.testing.assert_close(h.layer_tokens, want, rtol=1e-9, atol=1e-12 * scale)
            torch.testing.assert_close(h.tokens, want.sum(0), rtol=1e-9, atol=1e-12 * scale)
            if isinstance(task, inf.CausalLM):
                # the position rule, spelled out on the output layer: the last token predicts nothing, and a
                # token whose successor is no target (loss_mask) has no output-layer value either
                head = h.layer_tokens[names.index("lm_head")]
                targets = ref.examples(task, train)[h.index].y[0]
                assert (head != 0).tolist() == [*targets[1:].tolist(), False]


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
    with pytest.raises(ValueError, match="queries="):
        inf.scan(model, task, curv, other_queries, train, rank=4, top_k=3, out_dir=out, shard_size=10, progress=False)
    with pytest.raises(ValueError, match="top_k=3, but this run asks top_k=5"):
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
    import os, signal, sys, torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    import zoo, influencer as inf

    class Rows(torch.utils.data.Dataset):
        # the training rows; reading row `kill_at` SIGKILLs this very process: a crash at a fixed point of the scan
        def __init__(self, ids, kill_at):
            self.ids, self.kill_at = ids, kill_at
        def __len__(self):
            return len(self.ids)
        def __getitem__(self, i):
            if i == self.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return self.ids[i]

    model = zoo.tiny_llama(hidden=16, intermediate=32, layers=2)
    task = inf.CausalLM()
    train = zoo.token_data({n}, t=9)
    queries = {{"input_ids": zoo.token_data(3, t=8, seed=3), "prompt_length": 3}}
    curv = inf.fit_curvature(model, task, train, progress=False)
    r = inf.scan(model, task, curv, queries, Rows(train, {kill_at}), rank=4, top_k=5, out_dir={out!r}, shard_size=8,
                 batch_size=4, refine=0, progress=False, tokens=False)
    print("TOP", [h.index for h in r.top(0)])
""")


def _run_scan(out: Path, n: int, kill_at: int | None = None) -> subprocess.Popen:
    code = _SCRIPT.format(tests=str(Path(__file__).parent), n=n, out=str(out), kill_at=kill_at)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
    )


def test_sigkill_mid_scan_then_resume(tmp_path: Path) -> None:
    """SIGKILL while the scan reads row 36 (inside shard 4 of 8-row shards, so shards 0-3 are committed), then
    the same call again: finished shards are not recomputed and the result equals an uninterrupted scan."""
    out = tmp_path / "killed"
    killed = _run_scan(out, 80, kill_at=36)
    _, stderr = killed.communicate(timeout=600)
    assert killed.returncode == -signal.SIGKILL, stderr
    done_before = json.loads((out / "scan.json").read_text())["done"]
    assert done_before == [0, 1, 2, 3]
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    resumed = _run_scan(out, 80)
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr
    for name in (f"{s:06d}.safetensors" for s in done_before):  # finished shards were not recomputed
        assert (out / "shards" / name).stat().st_mtime_ns == stamps[name]
    assert json.loads((out / "scan.json").read_text())["done"] == list(range(10))
    clean = _run_scan(tmp_path / "clean", 80)
    clean_out, err = clean.communicate(timeout=600)
    assert clean.returncode == 0, err
    assert stdout.split("TOP")[1] == clean_out.split("TOP")[1]
    a = inf.ScanResult.load(out)
    b = inf.ScanResult.load(tmp_path / "clean")
    assert torch.equal(a.state.top.values, b.state.top.values)
    assert torch.equal(a.state.total, b.state.total)


def _cpu_bytes(fn) -> tuple[int, int]:
    """(peak, final) bytes of torch's CPU allocations made while ``fn`` runs, from every allocation and free the
    profiler's memory events record: an exact account of tensor memory (unlike the process RSS, whose peak may
    have been reached before ``fn`` and which moves with the allocator's caching)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        kept = fn()  # held until the end: what the result retains counts in the final bytes
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    assert events, "the profiler recorded no memory events"
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    del kept
    return peak, live


def test_scan_memory_does_not_grow_with_n() -> None:
    """Without keep_scores no [Q, N] score matrix (nor a growing list of its chunks) is ever held: the scan's peak
    and retained tensor memory grow by far less than a float32 [Q, ΔN] matrix when N quadruples, while keeping
    the scores (the same instrument, keep_scores=True) grows by at least that much."""
    model = zoo.tiny_llama(hidden=32, intermediate=64, layers=2, dtype=torch.float32)
    task = inf.CausalLM()
    curv = inf.fit_curvature(model, task, zoo.token_data(64, t=16), progress=False)
    q = 64
    queries = {"input_ids": zoo.token_data(q, t=12, seed=3), "prompt_length": 6}
    store = inf.QueryStore.build(model, task, curv, queries, rank=8)
    usage = {}
    for n in (256, 1024):
        train = zoo.token_data(n, t=16, seed=1)
        for keep in (False, True):
            usage[n, keep] = _cpu_bytes(
                lambda train=train, keep=keep: inf.scan(
                    model,
                    task,
                    curv,
                    queries,
                    train,
                    store=store,
                    top_k=10,
                    batch_size=32,
                    keep_scores=keep,
                    tokens=False,
                    progress=False,
                )
            )
    matrix = q * (1024 - 256) * 4  # a float32 [Q, N] matrix grows by 192 KiB from N = 256 to 1024
    print(f"\nscan tensor memory (peak, retained) in bytes: {usage}; a float32 [Q, ΔN] matrix is {matrix}")
    for i in (0, 1):  # peak and retained
        assert usage[1024, False][i] - usage[256, False][i] < matrix / 8
    assert usage[1024, True][0] - usage[256, True][0] >= matrix


def _top_level_ops(fn) -> int:
    """aten operators dispatched by ``fn()`` at the top level (torch.profiler; nested calls not double-counted)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None)


@pytest.mark.parametrize("contraction", ["tokens", "materialize"])
def test_scan_dispatches_at_most_three_training_passes_of_operators_per_batch(lm, contraction) -> None:
    """Per batch of training sequences (marginal: 4 batches − 1 batch, so setup is not counted), the scan dispatches
    at most 3× the operators of a plain forward + backward with parameter gradients (issue 19)."""
    model, task, train, queries, curv, _ = lm
    store = inf.QueryStore.build(model, task, curv, queries, rank=4)
    one, four = train[:6], train[:24]  # token ids [n, T]: 1 and 4 batches of 6

    def floor(data) -> None:
        for i in range(0, len(data), 6):
            model.zero_grad(set_to_none=True)
            ids = data[i : i + 6]
            logits = model(input_ids=ids).logits
            torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        model.zero_grad(set_to_none=True)

    def scan(data) -> None:
        inf.scan(
            model,
            task,
            curv,
            queries,
            data,
            store=store,
            rank=4,
            batch_size=6,
            tokens=False,
            refine=0,
            contraction=contraction,
            progress=False,
        )

    floor(one)  # warm-up (lazy initialisation dispatches extra operators once)
    scan(one)
    per_floor = (_top_level_ops(lambda: floor(four)) - _top_level_ops(lambda: floor(one))) / 3
    per_scan = (_top_level_ops(lambda: scan(four)) - _top_level_ops(lambda: scan(one))) / 3
    assert per_floor > 0 and per_scan <= 3 * per_floor, (per_scan, per_floor)


def _kept_scan(model, task, curv, queries, train, **options) -> inf.ScanResult:
    """A plain-inverse scan (no refinement, no token pass) that keeps the full score matrix."""
    return inf.scan(
        model, task, curv, queries, train, tokens=False, keep_scores=True, refine=0, progress=False, **options
    )


@pytest.mark.parametrize("contraction", ["tokens", "materialize"])
def test_bfloat16_contraction_is_close_to_float32(contraction) -> None:
    """precision="bfloat16": every score within 2 % (relative to the query's score vector) of the float32 scan,
    the same top hit, and far closer to it than rank-k compression is to the exact queries."""
    model = zoo.tiny_llama(hidden=32, intermediate=96, layers=2, dtype=torch.float32)
    task = inf.CausalLM()
    train = zoo.token_data(40, t=12)
    queries = {"input_ids": zoo.token_data(4, t=8, seed=3), "prompt_length": torch.tensor([2, 3, 4, 2])}
    curv = inf.fit_curvature(model, task, train, layers="mlp", progress=False)

    def run(precision: str, rank: int | None = 8) -> inf.ScanResult:
        return _kept_scan(
            model, task, curv, queries, train, rank=rank, top_k=3, contraction=contraction, precision=precision
        )

    fp32, bf16, exact = run("float32"), run("bfloat16"), run("float32", rank=None)
    assert bf16.meta["precision"] == "bfloat16" and bf16.scores.dtype == torch.float32

    def rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a - b).norm(dim=1) / b.norm(dim=1)

    assert (rel(bf16.scores, fp32.scores) < 0.02).all()
    assert (rel(bf16.scores, fp32.scores) < rel(fp32.scores, exact.scores)).all()
    assert [h.index for h in bf16.top(0, 1)] == [h.index for h in fp32.top(0, 1)]
    with pytest.raises(ValueError, match="precision"):
        run("float8")


@pytest.mark.parametrize("contraction", ["tokens", "materialize"])
@pytest.mark.parametrize("rank", [None, 3])
def test_fused_layers_equal_per_layer_scoring(lm, contraction, rank) -> None:
    """Layers of one shape scored together (one batched product per batch) give the per-layer scan's numbers:
    totals, every layer's part of every kept hit, and the kept indices."""
    model, task, train, queries, curv, _ = lm

    def run(fuse: bool) -> inf.ScanResult:
        return _kept_scan(
            model,
            task,
            curv,
            queries,
            train,
            rank=rank,
            top_k=4,
            contraction=contraction,
            fuse_layers=fuse,
            batch_size=7,
        )

    fused, alone = run(True), run(False)
    assert fused.meta["fused_layers"] == 9 and alone.meta["fused_layers"] == 0  # 3 blocks × (gate, up, down)
    assert torch.allclose(fused.scores, alone.scores, rtol=1e-10, atol=1e-12)
    for q in range(fused.n_queries):
        a, b = fused.top(q, 4), alone.top(q, 4)
        assert [h.index for h in a] == [h.index for h in b]
        for x, y in zip(a, b, strict=True):
            assert x.layers.keys() == y.layers.keys()
            assert all(abs(x.layers[k] - y.layers[k]) <= 1e-10 * max(1.0, abs(y.layers[k])) for k in x.layers)
