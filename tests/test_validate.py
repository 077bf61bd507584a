"""The validation suite's references against the independent float64 brute force of ``tests/reference.py``.

- PBRF on linear regression (MSE) equals exact damped influence (rel. err < 1e-4) as ε → 0, and equals the
  closed-form proximal response at ε = 1/N: the Adam solver and the sign convention are right.
- The PBRF on a nonlinear network tends to exact damped GNH influence as ε → 0 (Eq. 9).
- FlatModel's GNH-vector products (Hessians of the Bregman term at θ_s) build the exact dense GNH for
  regression, classification and a causal LM; dense and CG inverses agree; LiSSA converges to them and its
  divergence guard fires.
"""

from __future__ import annotations

import pytest
import reference as ref
import torch
import zoo

import influencer as inf
from influencer.functional import _generic_bregman, output_hessian_product
from influencer.validate import (
    PBRF,
    FlatModel,
    LiSSADivergenceError,
    PBRFConfig,
    bregman_divergence,
    conjugate_gradients,
    curvature_preconditioner,
    damped_gnh_operator,
    dense_gnh,
    exact_ihvp,
    lissa_ihvp,
    pearson,
    scores_from_ihvp,
    spearman,
    train_gradients,
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _linear_problem():
    model = zoo.mlp(d_in=5, d_out=2, depth=0)  # one Linear(5, 2) with bias: all parameters tracked
    x, noise = zoo.regression_data(64, d_in=5, d_out=2)
    y = 0.7 * x[:, :2] + 0.3 * noise
    with torch.no_grad():  # a least-squares fit, so θ_s is (nearly) a minimiser as in practice
        xa = torch.cat([x, torch.ones(64, 1, dtype=x.dtype)], 1)
        w = torch.linalg.lstsq(xa, y).solution.T
        model[0].weight.copy_(w[:, :5])
        model[0].bias.copy_(w[:, 5])
    return model, inf.Regression(), (x, y), (x[:4] + 0.1, y[:4] - 0.2)


def _measurement_grads(fm: FlatModel, queries) -> torch.Tensor:
    return torch.cat([fm.per_example_grads(b, "measurement") for _, b in fm.batches(queries, 64, queries=True)])


def test_pbrf_equals_exact_damped_influence_on_linear_regression() -> None:
    model, task, train, queries = _linear_problem()
    lam = 0.05
    exact = ref.exact_influence(model, task, queries, train, ["0"], damping=lam)  # −∇fᵀ(G+λ)⁻¹∇L, [4, 64]
    fm = FlatModel(model, task, "all")
    assert fm.covers_all and fm.P == 12
    solver = PBRF(fm, train, lam, PBRFConfig(epsilon=1e-5, tol=1e-8, max_steps=20000))
    qb = fm.batches(queries, 64, queries=True)
    got = torch.stack([solver.influence(m, qb)[0] for m in range(4)], 1)
    assert _rel(got, exact[:, :4]) < 1e-4
    # the sign is the one of DESIGN.md: positive = up-weighting z raises f
    assert torch.equal(torch.sign(got), torch.sign(exact[:, :4]))


def test_pbrf_matches_closed_form_response_at_one_copy() -> None:
    """At ε = 1/N the response is not linear in ε (ε·∇²L(z_m) enters the curvature); the solver must still hit
    the exact minimiser: θ(±ε) − θ_s = ∓ε (G + λ ± ε H_m)⁻¹ ∇L(z_m), f evaluated exactly."""
    model, task, train, queries = _linear_problem()
    lam = 0.05
    names = ["0"]
    g = ref.dense_gnh(model, task, train, names)
    grads = ref.per_example_grads(model, task, train, names)
    theta0 = ref.flat_params(model, names)
    n = 64
    eps = 1.0 / n
    fm = FlatModel(model, task, "all")
    solver = PBRF(fm, train, lam, PBRFConfig(tol=1e-10, max_steps=20000))
    assert solver.epsilon == pytest.approx(eps)
    qb = fm.batches(queries, 64, queries=True)
    # the engine's layout (reference) is [W | b] row-major; FlatModel's is W.flatten() then b: map between them
    perm = torch.cat([torch.arange(6 * r, 6 * r + 5) for r in range(2)] + [torch.tensor([5, 11])])
    for m in (0, 7):
        h_m = ref.dense_hessian(model, task, (train[0][m : m + 1], train[1][m : m + 1]), names)
        f_pm = []
        for sign in (1, -1):
            delta = (
                -sign * eps * torch.linalg.solve(g + lam * torch.eye(12, dtype=g.dtype) + sign * eps * h_m, grads[m])
            )
            theta = (theta0 + delta)[perm]
            f_pm.append(torch.cat([fm.measurement(theta, b) for _, b in qb]))
        closed = (f_pm[0] - f_pm[1]) / (2 * eps)
        got, info = solver.influence(m, qb)
        assert info["plus"]["converged"] and info["minus"]["converged"]
        assert _rel(got, closed) < 1e-6


@pytest.mark.parametrize("kind", ["regression", "classification"])
def test_pbrf_tends_to_exact_gnh_influence_on_a_nonlinear_network(kind: str) -> None:
    if kind == "regression":
        model, task = zoo.mlp(d_in=4, hidden=6, d_out=2), inf.Regression()
        x, y = zoo.regression_data(40, d_in=4, d_out=2)
    else:
        model, task = zoo.mlp(d_in=4, hidden=6, d_out=3), inf.Classification()
        x, y = zoo.classification_data(40, d_in=4)
    queries = (x[:3] + 0.2, y[:3])
    names = zoo.mlp_names(model)
    lam = 0.02
    exact = ref.exact_influence(model, task, queries, (x, y), names, damping=lam)
    fm = FlatModel(model, task, "all")
    solver = PBRF(fm, (x, y), lam, PBRFConfig(epsilon=1e-4, tol=1e-6, max_steps=20000))
    qb = fm.batches(queries, 64, queries=True)
    got = torch.stack([solver.influence(m, qb)[0] for m in range(3)], 1)
    assert _rel(got, exact[:, :3]) < 1e-3


def test_pbrf_reports_an_unreachable_tolerance_instead_of_spinning() -> None:
    """A tolerance below what float64 can reach: each solve stops once its learning rate has collapsed (min_lr),
    says it did not converge, well before max_steps, and the influence is still exact."""
    model, task, train, queries = _linear_problem()
    exact = ref.exact_influence(model, task, queries, train, ["0"], damping=0.05)
    fm = FlatModel(model, task, "all")
    solver = PBRF(fm, train, 0.05, PBRFConfig(epsilon=1e-5, tol=1e-30, max_steps=20000, patience=20))
    got, info = solver.influence(0, fm.batches(queries, 64, queries=True))
    for side in (info["plus"], info["minus"]):
        assert not side["converged"] and side["steps"] < 5000
        assert side["final_lr"] < 1e-3 * side["initial_lr"] and side["grad_ratio"] < 1e-6
    assert _rel(got, exact[:, 0]) < 1e-4


def test_flat_model_gradients_and_gnh_match_brute_force() -> None:
    model, task = zoo.mlp(d_in=4, hidden=5, d_out=3), inf.Classification()
    x, y = zoo.classification_data(30, d_in=4)
    names = zoo.mlp_names(model)
    fm = FlatModel(model, task, names)
    # reference layout [W | b] per layer vs FlatModel's [W, b]: compare through a permutation
    perm = _layout_perm(model, names)
    g_ref = ref.per_example_grads(model, task, (x, y), names)
    g = train_gradients(fm, (x, y), torch.arange(30))
    torch.testing.assert_close(g, g_ref[:, perm], rtol=1e-10, atol=1e-12)
    gnh_ref = ref.dense_gnh(model, task, (x, y), names)
    torch.testing.assert_close(dense_gnh(fm, (x, y)), gnh_ref[perm][:, perm], rtol=1e-9, atol=1e-12)


def test_causal_lm_gnh_and_bregman() -> None:
    model = zoo.tiny_llama(vocab=16, hidden=8, intermediate=12, layers=1)
    task = inf.CausalLM()
    data = zoo.token_data(6, t=5, vocab=16)
    names = zoo.llama_mlp_names(1)
    fm = FlatModel(model, task, names)
    assert not fm.covers_all  # embeddings, attention, norms and head stay fixed
    perm = _layout_perm(model, names)
    gnh_ref = ref.dense_gnh(model, task, data, names)
    torch.testing.assert_close(dense_gnh(fm, data), gnh_ref[perm][:, perm], rtol=1e-8, atol=1e-11)
    batch = task.collate([task.as_dataset(data)[i] for i in range(6)])
    h_s = fm.outputs(fm.theta0, batch)
    h = h_s + 0.1 * torch.randn(h_s.shape, generator=torch.Generator().manual_seed(0), dtype=h_s.dtype)
    torch.testing.assert_close(bregman_divergence(task, h, h_s, batch), _generic_bregman(task, h, h_s, batch))
    u = torch.randn(2, *h_s.shape, generator=torch.Generator().manual_seed(1), dtype=h_s.dtype)
    generic = type(
        "Generic", (inf.CausalLM,), {"log_likelihood": lambda self, o, bb: inf.CausalLM.log_likelihood(self, o, bb)}
    )()
    torch.testing.assert_close(
        output_hessian_product(task, h_s, batch, u), output_hessian_product(generic, h_s, batch, u)
    )


def test_bregman_closed_forms() -> None:
    g = torch.Generator().manual_seed(0)
    h_s, h = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    batch = (torch.zeros(5, 2), torch.tensor([0, 1, 2, 1, 0]))
    for task in (inf.Regression(), inf.Classification()):
        b = (batch[0], h_s.clone()) if isinstance(task, inf.Regression) else batch
        closed = bregman_divergence(task, h, h_s, b)
        torch.testing.assert_close(closed, _generic_bregman(task, h, h_s, b))
        assert bool((closed >= 0).all())
        assert float(bregman_divergence(task, h_s, h_s, b).abs().max()) == 0.0
        # closed-form output Hessians equal autograd of the generic Bregman divergence (a subclass hides them)
        base = type(task)
        generic = type(
            "Generic", (base,), {"log_likelihood": lambda self, o, bb, base=base: base.log_likelihood(self, o, bb)}
        )()
        u = torch.randn(2, *h_s.shape, generator=g, dtype=torch.float64)
        torch.testing.assert_close(output_hessian_product(task, h_s, b, u), output_hessian_product(generic, h_s, b, u))


def test_exact_dense_and_cg_agree_with_reference_influence() -> None:
    model, task = zoo.mlp(d_in=4, hidden=6, d_out=2), inf.Regression()
    x, y = zoo.regression_data(40, d_in=4, d_out=2)
    queries = (x[:3] + 0.1, y[:3])
    names = zoo.mlp_names(model)
    damping = {"0": 0.01, "2": 0.03, "4": 0.1}  # per-layer damping as the engine's default produces
    exact = ref.exact_influence(model, task, queries, (x, y), names, damping=damping)
    fm = FlatModel(model, task, names)
    v = _measurement_grads(fm, queries)
    grads = train_gradients(fm, (x, y), torch.arange(40))
    dense, _ = exact_ihvp(fm, (x, y), v, damping, method="dense")
    cg, info = exact_ihvp(fm, (x, y), v, damping, method="cg", rtol=1e-12)
    assert info["converged"]
    assert _rel(scores_from_ihvp(dense, grads), exact) < 1e-10
    assert _rel(scores_from_ihvp(cg, grads), exact) < 1e-9


def test_lissa_converges_and_guards_divergence() -> None:
    model, task = zoo.mlp(d_in=4, hidden=6, d_out=3), inf.Classification()
    x, y = zoo.classification_data(40, d_in=4)
    fm = FlatModel(model, task, "all")
    v = _measurement_grads(fm, (x[:2] + 0.1, y[:2]))
    lam = 0.05
    exact, _ = exact_ihvp(fm, (x, y), v, lam, method="dense")
    full, info = lissa_ihvp(fm, (x, y), v, lam, depth=800, batch_size=40)  # full batch: deterministic
    assert info.max_norm_ratio < 1
    assert _rel(full, exact) < 1e-6
    stochastic, _ = lissa_ihvp(fm, (x, y), v, lam, depth=800, batch_size=10)
    assert _rel(stochastic, exact) < 0.2
    with pytest.raises(LiSSADivergenceError, match="raise scale"):
        lissa_ihvp(fm, (x, y), v, lam, depth=200, batch_size=40, scale=0.01)


def test_lissa_and_exact_cg_report_progress_through_the_installed_bars() -> None:
    from influencer.progress import use_bars

    model, task = zoo.mlp(d_in=4, hidden=6, d_out=3), inf.Classification()
    x, y = zoo.classification_data(40, d_in=4)
    fm = FlatModel(model, task, "all")
    v = _measurement_grads(fm, (x[:2] + 0.1, y[:2]))
    bars: list[list] = []

    class Bar:
        def __init__(self, desc: str, total: int | None, unit: str) -> None:
            self.record = [desc, total, unit, 0]
            bars.append(self.record)

        def update(self, n: int = 1) -> None:
            self.record[3] += n

        def close(self) -> None:
            pass

    with use_bars(Bar):
        quiet, _ = lissa_ihvp(fm, (x, y), v, 0.05, depth=30, repeats=2, batch_size=10)
        assert bars == []  # progress is off by default
        shown, _ = lissa_ihvp(fm, (x, y), v, 0.05, depth=30, repeats=2, batch_size=10, progress=True)
        _, info = exact_ihvp(fm, (x, y), v, 0.05, method="cg", progress=True)
        apply = damped_gnh_operator(fm, (x, y), fm.damping_vector(0.05))
        fixed, _, _ = conjugate_gradients(apply, v, iterations=4, progress=True, desc="four steps")
    assert torch.equal(quiet, shown)  # the bar does not change the numbers
    assert torch.equal(fixed, conjugate_gradients(apply, v, iterations=4)[0])
    assert bars == [
        ["LiSSA", 60, "step", 60],
        ["exact damped GNH (CG)", None, "step", info["iterations"]],  # (to a tolerance: total unknown)
        ["four steps", 4, "step", 4],
    ]


@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "diagonal"])
def test_curvature_preconditioner_gives_the_engines_scores(strategy: str) -> None:
    """−(M⁻¹∇f)ᵀ∇L on FlatModel's flat layout equals the engine's own pairwise scores (an independent path)."""
    model, task = zoo.mlp(d_in=4, hidden=6, d_out=3), inf.Classification()
    x, y = zoo.classification_data(50, d_in=4)
    queries = (x[:3] + 0.1, y[:3])
    names = zoo.mlp_names(model)
    curv = inf.fit_curvature(model, task, (x, y), strategy=strategy, layers=names, progress=False)
    fm = FlatModel(model, task, names)
    pre = curvature_preconditioner(fm, curv)
    ours = scores_from_ihvp(pre(_measurement_grads(fm, queries)), train_gradients(fm, (x, y), torch.arange(50)))
    engine = inf.pairwise_scores(model, task, curv, queries, (x, y), per_layer=False, progress=False).total
    assert _rel(ours, engine.to(torch.float64)) < 1e-9


def test_preconditioned_cg_converges_to_the_exact_inverse() -> None:
    model, task = zoo.mlp(d_in=4, hidden=6, d_out=2), inf.Regression()
    x, y = zoo.regression_data(40, d_in=4, d_out=2)
    names = zoo.mlp_names(model)
    fm = FlatModel(model, task, names)
    v = _measurement_grads(fm, (x[:3] + 0.1, y[:3]))
    lam = 0.02
    exact, _ = exact_ihvp(fm, (x, y), v, lam, method="dense")
    apply = damped_gnh_operator(fm, (x, y), fm.damping_vector(lam))
    ekfac = inf.fit_curvature(model, task, (x, y), strategy="ekfac", layers=names, progress=False)
    pre = curvature_preconditioner(fm, ekfac.with_damping(damping=lam))
    x_pcg, steps, rel = conjugate_gradients(apply, v, precondition=pre, rtol=1e-11)
    assert rel <= 1e-11 and _rel(x_pcg, exact) < 1e-8 and steps <= fm.P

    # a fixed number of steps: each one can only lower the error in the (G + λ)-norm
    def a_norm_error(z: torch.Tensor) -> float:
        e = z - exact
        return float((e * apply(e)).sum())

    errors = [a_norm_error(conjugate_gradients(apply, v, precondition=pre, iterations=k)[0]) for k in (1, 3, 9)]
    assert errors[0] > errors[1] > errors[2]
    # the exact inverse as preconditioner solves the system in one step
    g = dense_gnh(fm, (x, y)) + lam * torch.eye(fm.P, dtype=torch.float64)
    x_one, _, _ = conjugate_gradients(apply, v, precondition=lambda r: torch.linalg.solve(g, r.T).T, iterations=1)
    assert _rel(x_one, exact) < 1e-8


def test_stats_match_scipy() -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 6, (80,), generator=g).double()  # with ties
    b = torch.randn(80, generator=g, dtype=torch.float64) + 0.3 * a
    assert spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a, b)[0], abs=1e-12)
    assert pearson(a, b) == pytest.approx(scipy_stats.pearsonr(a, b)[0], abs=1e-12)


def _layout_perm(model: torch.nn.Module, names: list[str]) -> torch.Tensor:
    """Index map: FlatModel position i holds reference-layout entry perm[i]."""
    perm, start = [], 0
    for spec in ref.layer_specs(model, names):
        d_out, width = spec.shape
        block = torch.arange(d_out * width).view(d_out, width) + start
        perm.append(block[:, : spec.d_in].reshape(-1))
        if spec.has_bias:
            perm.append(block[:, spec.d_in])
        start += d_out * width
    return torch.cat(perm)
