"""Every strategy equals its dense float64 definition, built from brute-force per-example gradients."""

from __future__ import annotations

import pytest
import reference as ref
import torch
import zoo

import influencer as inf
from influencer.curvature.fit import _STREAM_COVARIANCE, _STREAM_DIAGONAL, _STREAM_LAMBDA

REL = 1e-6
FACTOR_REL = 1e-10  # A, S, Λ, K-FAC's T̄·S⊗A and self-influence: float64 all the way, eigh included


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


def _block_sizes(bases: list[torch.Tensor], d: int, blocks: int) -> list[int]:
    """Sizes of a factor's diagonal blocks: ``blocks`` contiguous blocks of (nearly) equal size covering d."""
    sizes = [q.shape[0] for q in bases]
    assert len(sizes) == blocks and sum(sizes) == d and max(sizes) - min(sizes) <= 1
    return sizes


def _block_diagonal_part(m: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """m with everything outside the diagonal blocks of the given sizes set to zero."""
    return torch.block_diag(*(b[:, i : i + n] for b, i, n in zip(m.split(sizes), _starts(sizes), sizes, strict=True)))


def _starts(sizes: list[int]) -> list[int]:
    return [sum(sizes[:i]) for i in range(len(sizes))]


def _ragged_lm():
    """Ragged sequences (padded in the fit's batches) with a loss mask, tracking the output head too."""
    model = zoo.tiny_llama(hidden=8, intermediate=12)
    ids = zoo.token_data(7, t=9, seed=7)
    train = [{"input_ids": ids[i, : 3 + i]} for i in range(7)]
    train[4]["loss_mask"] = torch.tensor([1, 0, 0, 1, 1, 0, 1])
    return model, inf.CausalLM(), train, [*(x.name for x in inf.select_layers(model, "all")), "lm_head"]


@pytest.mark.parametrize("blocks", [1, 2])
@pytest.mark.parametrize("fisher", ["empirical", "true"])
@pytest.mark.parametrize("setup", [*SETUPS, "llama-ragged-with-head"])
def test_kronecker_factors_and_eigenvalues_equal_their_definitions(setup: str, fisher: str, blocks: int) -> None:
    """A = mean over tokens of ā āᵀ, S = mean over tokens of g gᵀ (brute force per sequence, own hooks), the
    bases are eigenbases of those (compared as matrices: any valid eigenbasis passes, no other), EK-FAC's
    Λ = (1/N) Σ_n (Q_Sᵀ Ĝ_n Q_A)⊙² with Ĝ_n the per-sequence gradient, and K-FAC's curvature is T̄ · S ⊗ A.
    fisher="true": the reference draws the same keyed labels itself (seed 11, the stage's stream)."""
    if setup == "llama-ragged-with-head":
        model, task, train, layers = _ragged_lm()
    else:
        (model, task, train, _queries), layers = SETUPS[setup], "all"
    kw = {"fisher": fisher, "layers": layers, "blocks": blocks, "seed": 11, "batch_size": 4, "progress": False}
    ekfac = inf.fit_curvature(model, task, train, strategy="ekfac", **kw)
    kfac = inf.fit_curvature(model, task, train, strategy="kfac", **kw)
    names = ekfac.layer_names
    n = len(ref.examples(task, train))
    loss = "sampled" if fisher == "true" else "train"

    def keys(stream: int) -> torch.Tensor | None:
        return ref.example_keys(11, stream, range(n)) if fisher == "true" else None

    factors = ref.kronecker_factors(model, task, train, names, loss=loss, keys=keys(_STREAM_COVARIANCE))
    grads = ref.per_example_grads(model, task, train, names, loss=loss, keys=keys(_STREAM_LAMBDA))
    shapes = ref.layer_matrix_shapes(model, names)
    for name, g, (d_out, w) in zip(names, ref.split_by_layer(grads, shapes), shapes, strict=True):
        want, f, fk = factors[name], ekfac.layers[name], kfac.layers[name]
        assert f.tokens == fk.tokens == want.tokens
        a_ref = _block_diagonal_part(want.a, _block_sizes(f.qa, w, blocks))
        s_ref = _block_diagonal_part(want.s, _block_sizes(f.qs, d_out, blocks))
        q_a, q_s = torch.block_diag(*f.qa), torch.block_diag(*f.qs)
        assert rel_err(q_a @ torch.diag(f.eig_a) @ q_a.T, a_ref) < FACTOR_REL
        assert rel_err(q_s @ torch.diag(f.eig_s) @ q_s.T, s_ref) < FACTOR_REL
        for q, m, eig in ((q_a, a_ref, f.eig_a), (q_s, s_ref, f.eig_s)):
            eye = torch.eye(len(q), dtype=torch.float64)
            torch.testing.assert_close(q.T @ q, eye, rtol=0, atol=1e-12)
            torch.testing.assert_close(q.T @ m @ q, torch.diag(eig), rtol=0, atol=FACTOR_REL * float(m.norm()))
        lam = ref.ekfac_reference(g, q_s, q_a)
        assert rel_err(f.lam, lam) < FACTOR_REL
        assert f.damping == pytest.approx(0.1 * float(lam.mean()), rel=FACTOR_REL)
        kron = want.tokens_per_sequence * torch.kron(s_ref, a_ref)
        k = ref.kron_basis(torch.block_diag(*fk.qs), torch.block_diag(*fk.qa))
        assert rel_err((k * fk.lam.reshape(-1)) @ k.T, kron) < FACTOR_REL
        assert fk.damping == pytest.approx(0.1 * float(torch.diagonal(kron).mean()), rel=FACTOR_REL)


@pytest.mark.parametrize("strategy", ["identity", "diagonal", "kfac", "ekfac"])
@pytest.mark.parametrize("setup", list(SETUPS))
def test_self_scores_equal_the_quadratic_form_of_each_strategy(setup: str, strategy: str) -> None:
    """self_scores = ∇L(z)ᵀ (G + λ)⁻¹ ∇L(z) with the strategy's block-diagonal curvature built independently
    (reference.strategy_curvature: own factors, own eigenbases, dense solves)."""
    model, task, train, _queries = SETUPS[setup]
    curv = inf.fit_curvature(
        model, task, train, strategy=strategy, fisher="empirical", layers="all", batch_size=5, progress=False
    )
    names = curv.layer_names
    shapes = ref.layer_matrix_shapes(model, names)
    grads = ref.per_example_grads(model, task, train, names)
    expected = torch.zeros(len(grads), dtype=torch.float64)
    for g, m in zip(
        ref.split_by_layer(grads, shapes), ref.strategy_curvature(model, task, train, names, strategy), strict=True
    ):
        g = g.flatten(1)
        expected += (g * torch.linalg.solve(m, g.T).T).sum(1)
    got = inf.self_scores(model, task, curv, train, batch_size=5, progress=False)
    assert got.dtype == torch.float64 and (expected > 0).all()
    assert rel_err(got, expected) < FACTOR_REL


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
        n = len(ref.examples(task, train))
        keys = ref.example_keys(7, _STREAM_DIAGONAL, range(n))  # the reference's own counter-based draws
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


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("tokens_first", [True, False])
def test_squared_grads_in_bfloat16_accumulate_in_the_sums_dtype(batched: bool, tokens_first: bool) -> None:
    """bf16 inputs and bases (fit precision="bfloat16"), float32 sums: both kernels, both rotation orders, within
    bf16 rounding of the float64 result (relative to its largest entry)."""
    from influencer.curvature import linalg

    gen = torch.Generator().manual_seed(8)
    t = 2 if tokens_first else 40
    a = torch.randn(5, t, 6, dtype=torch.float64, generator=gen)
    g = torch.randn(5, t, 4, dtype=torch.float64, generator=gen)
    qs = [torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64, generator=gen))[0]]
    qa = [torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=gen))[0]]
    exact = torch.zeros(6, 4, dtype=torch.float64)
    linalg.accumulate_squared_grads(exact, a, g, qs, qa)
    low = torch.zeros(6, 4, dtype=torch.float32)
    b16 = torch.bfloat16
    linalg.accumulate_squared_grads(
        low, a.to(b16), g.to(b16), [q.to(b16) for q in qs], [q.to(b16) for q in qa], batched=batched
    )
    assert low.dtype == torch.float32
    assert float((low.double() - exact).abs().max() / exact.abs().max()) < 3e-2
