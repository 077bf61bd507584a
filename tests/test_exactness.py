"""Every strategy equals its dense float64 definition, built from brute-force per-example gradients."""

from __future__ import annotations

import pytest
import reference as ref
import torch
import zoo

import influencer as inf
from influencer import sampling
from influencer.curvature.fit import _STREAM_DIAGONAL

REL = 1e-6


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _setups():
    x, y = zoo.regression_data(24)
    xc, yc = zoo.classification_data(24)
    ids = zoo.token_data(10, t=6)
    yield "mlp-regression", zoo.mlp(), inf.Regression(), (x, y), (x[:4] * 0.9, y[:4])
    yield "mlp-classification", zoo.mlp(), inf.Classification(), (xc, yc), (xc[:4] * 1.2, yc[:4])
    yield (
        "llama-causal-lm",
        zoo.tiny_llama(hidden=8, intermediate=12),
        inf.CausalLM(),
        ids,
        {"input_ids": zoo.token_data(3, t=7, seed=4), "prompt_length": torch.tensor([2, 3, 5])},
    )
    yield (
        "gpt2-conv1d",
        zoo.tiny_gpt2(hidden=8),
        inf.CausalLM(),
        ids,
        {"input_ids": zoo.token_data(3, t=7, seed=4), "prompt_length": 3},
    )
    xs, ys = zoo.regression_data(20, d_in=5, d_out=3, seed=2)
    yield "shared-layer", zoo.SharedMLP(), inf.Regression(), (xs, ys), (xs[:3] + 0.1, ys[:3])


SETUPS = {name: rest for name, *rest in _setups()}


def _brute_force(model, task, queries, train, names):
    gq = ref.per_example_grads(model, task, queries, names, loss="measurement", queries=True)
    gt = ref.per_example_grads(model, task, train, names, loss="train")
    return gq, gt


@pytest.mark.parametrize("setup", list(SETUPS))
def test_identity_equals_gradient_dot_products(setup: str) -> None:
    model, task, train, queries = SETUPS[setup]
    curv = inf.fit_curvature(model, task, train, strategy="identity", layers="all", progress=False)
    names = curv.layer_names
    scores = inf.pairwise_scores(model, task, curv, queries, train, batch_size=4, progress=False)
    gq, gt = _brute_force(model, task, queries, train, names)
    expected = -gq @ gt.T
    assert rel_err(scores.total, expected) < REL
    shapes = ref.layer_matrix_shapes(model, names)
    for name, q_l, t_l in zip(names, ref.split_by_layer(gq, shapes), ref.split_by_layer(gt, shapes), strict=True):
        assert rel_err(scores.per_layer[name], -q_l.flatten(1) @ t_l.flatten(1).T) < REL
    self_inf = inf.self_scores(model, task, curv, train, progress=False)
    assert rel_err(self_inf, (gt * gt).sum(1)) < REL


@pytest.mark.parametrize("setup", list(SETUPS))
def test_diagonal_equals_dense_inverse_of_diagonal_fisher(setup: str) -> None:
    model, task, train, queries = SETUPS[setup]
    curv = inf.fit_curvature(
        model, task, train, strategy="diagonal", fisher="empirical", layers="all", batch_size=3, progress=False
    )
    names = curv.layer_names
    gq, gt = _brute_force(model, task, queries, train, names)
    g_diag = torch.diag(ref.diagonal_fisher(gt))
    damping = {n: f.damping for n, f in curv.layers.items()}
    shapes = ref.layer_matrix_shapes(model, names)
    expected = ref.influence_from_grads(gq, gt, g_diag, ref.damping_vector(shapes, damping, names))
    scores = inf.pairwise_scores(model, task, curv, queries, train, batch_size=5, progress=False)
    assert rel_err(scores.total, expected) < REL
    lam = ref.split_by_layer(ref.diagonal_fisher(gt), shapes)
    for name, lam_l in zip(names, lam, strict=True):
        assert rel_err(curv.layers[name].lam, lam_l) < REL
        assert curv.layers[name].damping == pytest.approx(0.1 * float(lam_l.mean()), rel=REL)


@pytest.mark.parametrize("blocks", [1, 2])
@pytest.mark.parametrize("setup", list(SETUPS))
def test_ekfac_equals_dense_eigenbasis_inverse(setup: str, blocks: int) -> None:
    model, task, train, queries = SETUPS[setup]
    curv = inf.fit_curvature(
        model,
        task,
        train,
        strategy="ekfac",
        fisher="empirical",
        layers="all",
        blocks=blocks,
        batch_size=4,
        progress=False,
    )
    names = curv.layer_names
    gq, gt = _brute_force(model, task, queries, train, names)
    shapes = ref.layer_matrix_shapes(model, names)
    scores = inf.pairwise_scores(model, task, curv, queries, train, batch_size=3, progress=False)
    total = torch.zeros(gq.shape[0], gt.shape[0], dtype=torch.float64)
    for name, q_l, t_l in zip(names, ref.split_by_layer(gq, shapes), ref.split_by_layer(gt, shapes), strict=True):
        f = curv.layers[name]
        q_s, q_a = torch.block_diag(*f.qs), torch.block_diag(*f.qa)
        lam = ref.ekfac_reference(t_l, q_s, q_a)  # Λ = diag(Kᵀ G K) from per-example gradients
        assert rel_err(f.lam, lam) < REL
        inverse = ref.ekfac_inverse(q_s, q_a, lam, f.damping)
        layer_scores = -q_l.flatten(1) @ inverse @ t_l.flatten(1).T
        assert rel_err(scores.per_layer[name], layer_scores) < REL
        total += layer_scores
    assert rel_err(scores.total, total) < REL


def test_true_fisher_uses_labels_sampled_from_the_model() -> None:
    """The diagonal true Fisher equals (1/N) Σ ∇L̂² with exactly the engine's sampled labels (keyed draws)."""
    for model, task, train in (
        (zoo.mlp(), inf.Classification(), zoo.classification_data(30)),
        (zoo.tiny_llama(hidden=8, intermediate=12), inf.CausalLM(), zoo.token_data(6, t=5)),
    ):
        curv = inf.fit_curvature(
            model, task, train, strategy="diagonal", fisher="true", seed=7, batch_size=4, progress=False
        )
        names = curv.layer_names
        n = len(task.as_dataset(train))
        keys = sampling.example_keys(7, _STREAM_DIAGONAL, torch.arange(n))
        g = ref.per_example_grads(model, task, train, names, loss="sampled", keys=keys)
        shapes = ref.layer_matrix_shapes(model, names)
        for name, lam_l in zip(names, ref.split_by_layer(ref.diagonal_fisher(g), shapes), strict=True):
            assert rel_err(curv.layers[name].lam, lam_l) < REL
        empirical = inf.fit_curvature(model, task, train, strategy="diagonal", fisher="empirical", progress=False)
        assert rel_err(empirical.layers[names[0]].lam, curv.layers[names[0]].lam) > 1e-2


@pytest.mark.parametrize("tokens_first", [True, False])
@pytest.mark.parametrize("blocks", [1, 2])
def test_batched_squared_grads_equal_the_per_example_loop(tokens_first: bool, blocks: int) -> None:
    """The GPU path of the Λ accumulation (batched matmuls) equals the CPU per-example loop."""
    from influencer.curvature import linalg

    gen = torch.Generator().manual_seed(7)
    t = 2 if tokens_first else 40
    a = torch.randn(5, t, 6, dtype=torch.float64, generator=gen)
    g = torch.randn(5, t, 4, dtype=torch.float64, generator=gen)
    assert linalg.rotate_tokens_first(t, 4, 6) == tokens_first

    def basis(d: int) -> list[torch.Tensor]:
        return [
            torch.linalg.qr(torch.randn(s, s, dtype=torch.float64, generator=gen))[0]
            for s in linalg.split_sizes(d, blocks)
        ]

    qs, qa = basis(4), basis(6)
    for bases in ((qs, qa), (None, None)):
        loop = torch.zeros(6, 4, dtype=torch.float64)
        batched = torch.zeros(6, 4, dtype=torch.float64)
        linalg.accumulate_squared_grads(loop, a, g, *bases, batched=False)
        linalg.accumulate_squared_grads(batched, a, g, *bases, batched=True)
        torch.testing.assert_close(batched, loop, rtol=1e-12, atol=1e-12)
