"""The query store's fast paths against independent references: the randomized truncated SVD against float64
``torch.linalg.svd`` (stated error bound), the eigenbasis path against the generic dense solve (every strategy,
blocks, exact and low rank), layers compressed in stacks against one at a time, and chunk invariance."""

from __future__ import annotations

import pytest
import torch
import zoo

import influencer as inf
from influencer.queries import QueryStore, preconditioned_queries, truncated_svd

BOUND = 1.02  # randomized: ‖p − LR‖_F ≤ BOUND · ‖p − p_k‖_F + FLOOR · ‖p‖_F (2 power iterations, 8 oversampled)
FLOOR = 1e-5  # float32 rounding


def _optimal_error(p: torch.Tensor, k: int) -> torch.Tensor:
    """‖p − p_k‖_F per matrix from the float64 singular values (Eckart–Young)."""
    s = torch.linalg.svdvals(p.double())
    return s[..., k:].pow(2).sum(-1).sqrt()


def _spectrum(b: int, m: int, n: int, decay: float | None, rank: int | None, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if rank is not None:
        return torch.randn(b, m, rank, generator=g) @ torch.randn(b, rank, n, generator=g)
    if decay is None:
        return torch.randn(b, m, n, generator=g)
    r = min(m, n)
    u = torch.linalg.qr(torch.randn(b, m, r, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(b, n, r, generator=g, dtype=torch.float64)).Q
    return ((u * decay ** torch.arange(r, dtype=torch.float64)) @ v.mT).float()


@pytest.mark.parametrize("shape", [(96, 256), (256, 96)])
@pytest.mark.parametrize(
    ("decay", "rank"), [(None, None), (0.9, None), (0.97, None), (None, 6)], ids=["flat", "fast", "slow", "rank6"]
)
def test_randomized_svd_is_within_the_stated_bound(shape, decay, rank) -> None:
    k = 12
    p = _spectrum(3, *shape, decay, rank, seed=7)
    left, right = truncated_svd(p, k, method="randomized")
    assert left.shape == (3, shape[0], k) and right.shape == (3, k, shape[1]) and left.dtype == p.dtype
    error = (p.double() - left.double() @ right.double()).norm(dim=(1, 2))
    allowed = BOUND * _optimal_error(p, k) + FLOOR * p.double().norm(dim=(1, 2))
    assert (error <= allowed).all(), (error, allowed)
    if rank is not None:  # rank ≤ k: recovered to rounding
        assert (error <= FLOOR * p.double().norm(dim=(1, 2))).all()


def test_exact_svd_is_optimal_and_auto_chooses_by_size() -> None:
    p = _spectrum(2, 40, 30, 0.8, None, seed=1)
    left, right = truncated_svd(p, 5, method="exact")
    error = (p.double() - left.double() @ right.double()).norm(dim=(1, 2))
    assert torch.allclose(error, _optimal_error(p, 5), rtol=1e-4)
    # auto: exact when the sketch (k + 8) exceeds a quarter of min(m, n), else randomized (same seeded sketch)
    assert torch.equal(truncated_svd(p, 5)[0], left)
    big = _spectrum(2, 200, 120, 0.9, None, seed=2)
    assert torch.equal(truncated_svd(big, 5)[0], truncated_svd(big, 5, method="randomized")[0])
    with pytest.raises(ValueError, match="method"):
        truncated_svd(p, 5, method="lanczos")


def test_randomized_factors_of_a_matrix_do_not_depend_on_its_batch() -> None:
    p = _spectrum(4, 120, 80, 0.9, None, seed=3)
    alone = truncated_svd(p[2:3], 6, method="randomized")
    together = truncated_svd(p, 6, method="randomized")
    assert torch.allclose(alone[0][0] @ alone[1][0], together[0][2] @ together[1][2], atol=1e-5)


@pytest.fixture(scope="module")
def lm():
    model = zoo.tiny_llama(hidden=16, intermediate=48, layers=2, dtype=torch.float64)
    task = inf.CausalLM()
    train = zoo.token_data(24, t=9)
    queries = {"input_ids": zoo.token_data(5, t=8, seed=3), "prompt_length": torch.tensor([2, 3, 4, 2, 5])}
    return model, task, train, queries


@pytest.mark.parametrize(
    ("strategy", "blocks"), [("ekfac", 1), ("ekfac", 2), ("kfac", 1), ("kfac", 2), ("diagonal", 1), ("identity", 1)]
)
@pytest.mark.parametrize("rank", [None, 3])
def test_eigenbasis_store_equals_the_dense_solve(lm, strategy, blocks, rank) -> None:
    """P built from rotated token factors (and compressed in the eigenbasis) = the generic dense solve + SVD."""
    model, task, train, queries = lm
    curv = inf.fit_curvature(model, task, train, strategy=strategy, blocks=blocks, layers="mlp", progress=False)
    fast = QueryStore.build(model, task, curv, queries, rank=rank, svd="exact")
    dense = preconditioned_queries(model, task, curv, queries)
    slow = QueryStore.from_preconditioned(dense, rank, svd="exact")
    assert list(fast.layers) == list(slow.layers)
    for name in fast.layers:
        a, b = fast.layers[name], slow.layers[name]
        assert a.low_rank == b.low_rank == (rank is not None)
        assert torch.allclose(a.to_dense(), b.to_dense(), rtol=1e-9, atol=1e-12 * float(dense[name].abs().max()))
        if rank is None:
            assert torch.allclose(a.to_dense(), dense[name], rtol=1e-9, atol=1e-12)


def test_layers_compressed_together_equal_one_at_a_time() -> None:
    """from_preconditioned stacks layers of one shape into one batched SVD: the same factors as layer by layer."""
    g = torch.Generator().manual_seed(0)
    precond = {f"l{i}": torch.randn(3, 64, 160, generator=g) for i in range(5)}
    precond["odd"] = torch.randn(3, 160, 64, generator=g)
    stacked = QueryStore.from_preconditioned(precond, 8, svd="randomized")
    assert list(stacked.layers) == list(precond)
    for name, p in precond.items():
        alone = QueryStore.from_preconditioned({name: p}, 8, svd="randomized").layers[name]
        assert torch.allclose(stacked.layers[name].to_dense(), alone.to_dense(), atol=1e-5)


def test_randomized_store_is_chunk_invariant_and_close_to_exact(lm) -> None:
    model, task, train, queries = lm
    curv = inf.fit_curvature(model, task, train, layers="mlp", progress=False)
    chunked = QueryStore.build(model, task, curv, queries, rank=3, svd="randomized", batch_size=2)
    whole = QueryStore.build(model, task, curv, queries, rank=3, svd="randomized", batch_size=5)
    exact = QueryStore.build(model, task, curv, queries, rank=3, svd="exact")
    assert chunked.meta["svd"] == "randomized"
    for name in whole.layers:
        assert torch.allclose(chunked.layers[name].to_dense(), whole.layers[name].to_dense(), atol=1e-10)
        full = preconditioned_queries(model, task, curv, queries)[name]
        err = (full - whole.layers[name].to_dense()).norm(dim=(1, 2))
        best = (full - exact.layers[name].to_dense()).norm(dim=(1, 2))
        assert (err <= BOUND * best + 1e-9 * full.norm(dim=(1, 2))).all()
