"""Sanity checks of the float64 references in tests/reference.py (and of the tiny models in tests/zoo.py).

These compare the references with ordinary autograd, closed forms and exact expectations — never with the
engine's curvature, capture or scoring code — so that the engine's tests can trust them. The references write
their own losses, masks and label sampling; where a test below evaluates the engine's task losses on a padded
batch (:func:`batch_train_grad`), that is a cross-check of two independent implementations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import reference as ref
import torch
import zoo
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from influencer.tasks import CausalLM, Classification, Regression, Task

F64 = torch.float64


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def autograd_layout_grad(model: nn.Module, names: list[str], loss: Tensor, retain_graph: bool = False) -> Tensor:
    """Gradient of a scalar by plain autograd, laid out by hand: [d_out, d_in (+1 bias column)] per layer."""
    mods = [model.get_submodule(n) for n in names]
    params = [p for m in mods for p in ((m.weight, m.bias) if m.bias is not None else (m.weight,))]
    grads = iter(torch.autograd.grad(loss, params, retain_graph=retain_graph))
    parts = []
    for m in mods:
        gw = next(grads)
        gw = gw.T if isinstance(m, Conv1D) else gw
        parts.append(torch.cat([gw, next(grads)[:, None]], 1) if m.bias is not None else gw)
    return torch.cat([p.reshape(-1) for p in parts])


def batch_train_grad(model: nn.Module, task: Task, data: Any, names: list[str]) -> Tensor:
    """∇ Σ_n L(z_n) from one padded full batch with ordinary autograd and the engine's task (its collate, masks
    and loss): summed per-example reference gradients must equal it."""
    ds = task.as_dataset(data)
    batch = task.collate([ds[i] for i in range(len(ds))])
    return autograd_layout_grad(model, names, task.train_loss(task.forward(model, batch), batch).sum())


def random_orthogonal(n: int, seed: int) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=F64))
    return q


# --------------------------------------------------------------------------------------------------------
# Cases: (model, task, training data, tracked names)
# --------------------------------------------------------------------------------------------------------


def case_mlp_regression() -> tuple[nn.Module, Task, Any, list[str]]:
    return zoo.mlp(), Regression(), zoo.regression_data(6, 5, 3, seed=1), ["0", "2", "4"]


def case_mlp_classification() -> tuple[nn.Module, Task, Any, list[str]]:
    return zoo.mlp(), Classification(), zoo.classification_data(6, 5, 3, seed=2), ["0", "4"]


def case_llama() -> tuple[nn.Module, Task, Any, list[str]]:
    model = zoo.tiny_llama()
    names = [*zoo.llama_mlp_names(2), "model.layers.1.self_attn.k_proj", "lm_head"]
    return model, CausalLM(), zoo.token_data(4, 8, 64, seed=3), names


def case_llama_ragged() -> tuple[nn.Module, Task, Any, list[str]]:
    """Variable lengths (padded in the batch) and a loss mask."""
    ids = zoo.token_data(3, 9, 64, seed=4)
    data = [
        {"input_ids": ids[0, :9]},
        {"input_ids": ids[1, :5]},
        {"input_ids": ids[2, :7], "loss_mask": torch.tensor([0, 0, 0, 1, 1, 0, 1])},
    ]
    return zoo.tiny_llama(seed=1), CausalLM(), data, zoo.llama_mlp_names(2)


def case_gpt2() -> tuple[nn.Module, Task, Any, list[str]]:
    model = zoo.tiny_gpt2()
    names = ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_proj", "lm_head"]
    return model, CausalLM(), zoo.token_data(3, 8, 64, seed=5), names


def case_shared() -> tuple[nn.Module, Task, Any, list[str]]:
    return zoo.SharedMLP(), Regression(), zoo.regression_data(5, 5, 3, seed=6), list(zoo.SharedMLP.names)


CASES: dict[str, Callable[[], tuple[nn.Module, Task, Any, list[str]]]] = {
    "mlp-regression": case_mlp_regression,
    "mlp-classification": case_mlp_classification,
    "llama": case_llama,
    "llama-ragged": case_llama_ragged,
    "gpt2-conv1d": case_gpt2,
    "shared-module": case_shared,
}


# --------------------------------------------------------------------------------------------------------
# Layout and per-example gradients
# --------------------------------------------------------------------------------------------------------


def test_layout_shapes_and_conv1d_transposition() -> None:
    model = zoo.tiny_gpt2()
    names = ["transformer.h.0.mlp.c_fc", "lm_head", "transformer.h.0.attn.c_proj"]
    shapes = ref.layer_matrix_shapes(model, names)
    assert shapes == [(64, 17), (64, 16), (16, 17)]  # Conv1D [16→64] + bias; untied lm_head has no bias
    theta = ref.flat_params(model, names)
    assert theta.shape == (sum(a * b for a, b in shapes),)
    blocks = ref.split_by_layer(theta, shapes)
    c_fc = model.get_submodule("transformer.h.0.mlp.c_fc")
    torch.testing.assert_close(blocks[0][:, :16], c_fc.weight.detach().T, rtol=0, atol=0)
    torch.testing.assert_close(blocks[0][:, 16], c_fc.bias.detach(), rtol=0, atol=0)
    torch.testing.assert_close(blocks[1], model.lm_head.weight.detach(), rtol=0, atol=0)
    torch.testing.assert_close(ref.join_layers(blocks), theta, rtol=0, atol=0)
    # batched views
    two = torch.stack([theta, 2 * theta])
    assert ref.split_by_layer(two, shapes)[2].shape == (2, 16, 17)
    with pytest.raises(ValueError, match="total"):
        ref.split_by_layer(theta[:-1], shapes)
    with pytest.raises(TypeError, match=r"not nn\.Linear"):
        ref.layer_specs(model, ["transformer.h.0.ln_1"])
    with pytest.raises(ValueError, match="float64"):
        ref.per_example_grads(zoo.mlp(dtype=torch.float32), Regression(), zoo.regression_data(2), ["0"])


@pytest.mark.parametrize("case", list(CASES))
def test_per_example_grads_sum_to_batch_gradient(case: str) -> None:
    model, task, data, names = CASES[case]()
    grads = ref.per_example_grads(model, task, data, names)
    assert grads.dtype == F64
    assert grads.shape == (len(task.as_dataset(data)), sum(a * b for a, b in ref.layer_matrix_shapes(model, names)))
    expected = batch_train_grad(model, task, data, names)
    assert rel_err(grads.sum(0), expected) < 1e-10
    # rows are genuinely different examples (not one gradient repeated)
    assert rel_err(grads[0], grads[1]) > 1e-3


def test_reference_masks_padding_and_completions() -> None:
    """The reference's own data handling: right padding (``attention_mask``, garbage ids in the padding) drops
    positions, ``loss_mask`` drops targets, ``completion_mask`` ≡ ``prompt_length``, position 0 is never a target."""
    model, task, data, names = case_llama_ragged()
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(3, 12, dtype=torch.long)
    loss_mask = torch.ones(3, 12, dtype=torch.long)
    for i, row in enumerate(data):
        ids[i, : len(row["input_ids"])] = row["input_ids"]
        mask[i, : len(row["input_ids"])] = 1
        if "loss_mask" in row:
            loss_mask[i, : len(row["loss_mask"])] = row["loss_mask"]
    padded = {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask}
    exs = ref.examples(task, padded)
    assert [ex.x.shape[1] for ex in exs] == [9, 5, 7]
    assert exs[2].y[0].tolist() == [False, False, False, True, True, False, True]
    torch.testing.assert_close(
        ref.per_example_grads(model, task, padded, names),
        ref.per_example_grads(model, task, data, names),
        rtol=0,
        atol=0,
    )
    queries = {"input_ids": ids, "attention_mask": mask, "prompt_length": torch.tensor([3, 0, 6])}
    completion = {
        "input_ids": ids,
        "attention_mask": mask,
        "completion_mask": torch.arange(12)[None] >= torch.tensor([[3], [0], [6]]),
    }
    q_exs = ref.examples(task, queries, queries=True)
    assert [ex.y[0].nonzero().reshape(-1).tolist() for ex in q_exs] == [[3, 4, 5, 6, 7, 8], [1, 2, 3, 4], [6]]
    torch.testing.assert_close(
        ref.per_example_grads(model, task, queries, names, loss="measurement", queries=True),
        ref.per_example_grads(model, task, completion, names, loss="measurement", queries=True),
        rtol=0,
        atol=0,
    )


def test_conv1d_equals_linear() -> None:
    pair = zoo.ConvLinearPair()
    data = zoo.regression_data(5, 4, 3, seed=7)
    x = data[0]
    torch.testing.assert_close(pair.conv(x), pair.linear(x), rtol=1e-14, atol=1e-14)
    names = list(pair.names)
    assert (
        ref.layer_matrix_shapes(pair.conv, names)
        == ref.layer_matrix_shapes(pair.linear, names)
        == [(6, 5), (5, 7), (3, 6)]
    )
    g_conv = ref.per_example_grads(pair.conv, Regression(), data, names)
    g_lin = ref.per_example_grads(pair.linear, Regression(), data, names)
    torch.testing.assert_close(g_conv, g_lin, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(
        ref.dense_gnh(pair.conv, Regression(), data, names),
        ref.dense_gnh(pair.linear, Regression(), data, names),
        rtol=1e-12,
        atol=1e-14,
    )


def test_shared_module_gradient_sums_both_uses() -> None:
    model, task, data, names = case_shared()
    g = ref.per_example_grads(model, task, data, names)
    # differentiate the two uses separately by hand: the reference must give their sum
    x, y = data[0][:1], data[1][:1]
    w1 = model.shared.weight.detach().clone().requires_grad_(True)
    w2 = model.shared.weight.detach().clone().requires_grad_(True)
    b = model.shared.bias.detach()
    h = torch.tanh(model.fc_in(x))
    h = torch.tanh(h @ w1.T + b)
    h = torch.tanh(h @ w2.T + b)
    loss = 0.5 * (model.fc_out(h) - y).pow(2).sum()
    d1, d2 = torch.autograd.grad(loss, [w1, w2])
    shared = ref.split_by_layer(g[0], ref.layer_matrix_shapes(model, names))[1]
    torch.testing.assert_close(shared[:, :6], d1 + d2, rtol=1e-12, atol=1e-15)
    assert rel_err(d1, d2) > 1e-2


def test_measurement_grads() -> None:
    # Regression: f = −L, so ∇f = −∇L
    model, task, data, names = case_mlp_regression()
    torch.testing.assert_close(
        ref.per_example_grads(model, task, data, names, loss="measurement", queries=True),
        -ref.per_example_grads(model, task, data, names),
        rtol=1e-13,
        atol=1e-15,
    )
    # CausalLM: prompt_length=1 → the completion is every target, f = −L; a longer prompt drops targets
    model, task, ids, names = case_llama()
    train = ref.per_example_grads(model, task, ids, names)
    whole = ref.per_example_grads(
        model, task, {"input_ids": ids, "prompt_length": 1}, names, loss="measurement", queries=True
    )
    torch.testing.assert_close(whole, -train, rtol=1e-12, atol=1e-14)
    part = ref.per_example_grads(
        model, task, {"input_ids": ids, "prompt_length": 5}, names, loss="measurement", queries=True
    )
    logits = task.forward(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    logp = torch.log_softmax(logits[:, 4:-1], -1).gather(-1, ids[:, 5:, None]).sum()  # tokens 5.. given prefix
    torch.testing.assert_close(part.sum(0), autograd_layout_grad(model, names, logp), rtol=1e-10, atol=1e-14)


# --------------------------------------------------------------------------------------------------------
# Curvature
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["mlp-regression", "mlp-classification", "llama-ragged"])
def test_output_hessian_closed_form_matches_autograd(case: str) -> None:
    model, task, data, _ = CASES[case]()
    for i, ex in enumerate(ref.examples(task, data)):
        with torch.no_grad():
            out = ref.forward(model, ex)
        j = torch.randn(out.numel(), 3, dtype=F64, generator=torch.Generator().manual_seed(i))
        sel_c, h_c = ref.output_hessian(task, out, ex)
        sel_a, h_a = ref.output_hessian(task, out, ex, method="autograd")
        full_c = torch.zeros_like(j).index_add_(0, sel_c, h_c(j[sel_c]))
        full_a = torch.zeros_like(j).index_add_(0, sel_a, h_a(j[sel_a]))
        torch.testing.assert_close(full_c, full_a, rtol=1e-12, atol=1e-14)


def test_dense_gnh_causal_lm_closed_form_matches_autograd() -> None:
    model, task, data, _ = case_llama_ragged()
    names = ["model.layers.1.mlp.down_proj", "lm_head"]
    g_c = ref.dense_gnh(model, task, data, names)
    g_a = ref.dense_gnh(model, task, data, names, method="autograd")
    assert rel_err(g_c, g_a) < 1e-12
    assert torch.linalg.eigvalsh(g_c).min() > -1e-12 * g_c.norm()


def test_dense_gnh_regression_is_jtj() -> None:
    model, task, (x, y), names = case_mlp_regression()
    g = ref.dense_gnh(model, task, (x, y), names)
    expected = 0
    for n in range(len(x)):
        out = model(x[n : n + 1])[0]
        jac = torch.stack([autograd_layout_grad(model, names, out[k], True) for k in range(out.numel())])
        expected = expected + jac.T @ jac
    assert rel_err(g, expected / len(x)) < 1e-12


def test_dense_gnh_is_true_fisher_classification() -> None:
    """G = (1/N) Σ_n E_{ŷ~p}[∇L̂ ∇L̂ᵀ]: exactly (enumerating ŷ) and by Monte Carlo via task.sampled_loss."""
    model, task, (x, y), names = case_mlp_classification()
    x, y = x[:3], y[:3]
    g = ref.dense_gnh(model, task, (x, y), names)
    exact = torch.zeros_like(g)
    with torch.no_grad():
        probs = torch.softmax(model(x), -1)
    for c in range(3):
        gc = ref.per_example_grads(model, task, (x, torch.full_like(y, c)), names)
        exact += (gc.T * probs[:, c]) @ gc
    assert rel_err(g, exact / 3) < 1e-12
    # Monte Carlo with the task's own sampler: S draws per example (repeat each example S times, distinct keys)
    s = 300  # loose check of the sampler (relative MC error ~0.02-0.05 here); the enumeration above is exact
    keys = torch.randint(-(2**62), 2**62, (3 * s,), generator=torch.Generator().manual_seed(0))
    sampled = ref.per_example_grads(model, task, (x.repeat(s, 1), y.repeat(s)), names, loss="sampled", keys=keys)
    mc = ref.empirical_fisher(sampled)
    assert rel_err(mc, g) < 0.1
    # ... and it is not the empirical Fisher with the true labels
    assert rel_err(ref.empirical_fisher(ref.per_example_grads(model, task, (x, y), names)), g) > 0.2


def test_dense_gnh_equals_hessian_for_linear_mse() -> None:
    model = zoo.mlp(d_in=4, d_out=3, depth=0, seed=3)
    data = zoo.regression_data(7, 4, 3, seed=8)
    task = Regression()
    g = ref.dense_gnh(model, task, data, ["0"])
    h = ref.dense_hessian(model, task, data, ["0"])
    assert rel_err(g, h) < 1e-13
    # with a nonlinearity (and a nonzero residual) they differ
    mlp = zoo.mlp(d_in=4, d_out=3, hidden=5, depth=1, seed=3)
    assert rel_err(ref.dense_gnh(mlp, task, data, ["0", "2"]), ref.dense_hessian(mlp, task, data, ["0", "2"])) > 1e-2


def test_block_diagonal() -> None:
    shapes = [(2, 3), (1, 2)]
    g = torch.arange(64, dtype=F64).reshape(8, 8)
    b = ref.block_diagonal(g, shapes)
    assert torch.equal(b[:6, :6], g[:6, :6]) and torch.equal(b[6:, 6:], g[6:, 6:])
    assert not b[:6, 6:].any() and not b[6:, :6].any()


# --------------------------------------------------------------------------------------------------------
# Influence
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["mlp-regression", "mlp-classification", "llama"])
def test_self_influence_is_psd(case: str) -> None:
    """With queries = training data and f = −L: I(z_i, z_j) = ∇L_iᵀ (G+λ)⁻¹ ∇L_j, a PSD Gram matrix."""
    model, task, data, names = CASES[case]()
    if isinstance(task, CausalLM):
        names = ["model.layers.1.mlp.down_proj", "lm_head"]  # keep the dense [P, P] solve small
    queries = {"input_ids": data, "prompt_length": 1} if isinstance(task, CausalLM) else data
    infl = ref.exact_influence(model, task, queries, data, names, damping=1e-3)
    torch.testing.assert_close(infl, infl.T, rtol=1e-9, atol=1e-9 * infl.abs().max())
    assert (infl.diagonal() > 0).all()
    assert torch.linalg.eigvalsh(0.5 * (infl + infl.T)).min() > -1e-9 * infl.abs().max()


def test_influence_sign_and_scale_match_pbrf_response() -> None:
    """For a linear model with MSE the PBRF is quadratic: its exact response to up-weighting z_m by ε has
    df_q/dε = I(q, z_m) = −∇f_qᵀ (G + λ)⁻¹ ∇L(z_m) (DESIGN §1, Eq. 7–9)."""
    model = zoo.mlp(d_in=4, d_out=2, depth=0, seed=5)
    x, y = zoo.regression_data(8, 4, 2, seed=9)
    xq, yq = zoo.regression_data(2, 4, 2, seed=10)
    task, lam, m = Regression(), 0.05, 3
    theta_s = ref.flat_params(model, ["0"])

    def h(theta: Tensor, inputs: Tensor) -> Tensor:  # the linear model written out: [W | b] row-major
        wb = theta.reshape(2, 5)
        return inputs @ wb[:, :4].T + wb[:, 4]

    def pbrf(theta: Tensor, eps: float) -> Tensor:
        bregman = 0.5 * (h(theta, x) - h(theta_s, x)).pow(2).sum(1).mean()
        loss_m = 0.5 * (h(theta, x[m]) - y[m]).pow(2).sum()
        return bregman + eps * loss_m + 0.5 * lam * (theta - theta_s).pow(2).sum()

    def response(eps: float) -> Tensor:  # one Newton step solves the quadratic exactly
        hess = torch.func.hessian(pbrf)(theta_s, eps)
        return theta_s - torch.linalg.solve(hess, torch.func.grad(pbrf)(theta_s, eps))

    def f(theta: Tensor) -> Tensor:
        return -0.5 * (h(theta, xq) - yq).pow(2).sum(1)

    eps = 1e-4
    fd = (f(response(eps)) - f(response(-eps))) / (2 * eps)
    g = ref.dense_gnh(model, task, (x, y), ["0"])
    infl = ref.exact_influence(model, task, (xq, yq), (x[m : m + 1], y[m : m + 1]), ["0"], damping=lam, curvature=g)
    torch.testing.assert_close(infl[:, 0], fd, rtol=1e-5, atol=1e-10)
    assert fd.abs().min() > 1e-3


def test_damping_forms_and_layerwise_sum() -> None:
    model, task, (x, y), names = case_mlp_regression()
    shapes = ref.layer_matrix_shapes(model, names)
    g = ref.block_diagonal(ref.dense_gnh(model, task, (x, y), names), shapes)
    queries = (x[:2] + 0.1, y[:2])
    same = ref.exact_influence(model, task, queries, (x, y), names, damping=0.01, curvature=g)
    as_dict = ref.exact_influence(model, task, queries, (x, y), names, damping=dict.fromkeys(names, 0.01), curvature=g)
    torch.testing.assert_close(as_dict, same, rtol=1e-13, atol=0)
    per_layer = {"0": 0.01, "2": 1.0, "4": 0.001}
    lam = ref.damping_vector(shapes, per_layer, names)
    assert lam[0] == 0.01 and lam[-1] == 0.001 and lam[48] == 1.0 and lam[47] == 0.01
    mixed = ref.exact_influence(model, task, queries, (x, y), names, damping=per_layer, curvature=g)
    gq = ref.per_example_grads(model, task, queries, names, loss="measurement", queries=True)
    gt = ref.per_example_grads(model, task, (x, y), names)
    by_layer = ref.influence_by_layer_from_grads(gq, gt, g, lam, shapes)
    assert by_layer.shape == (3, 2, 6)
    torch.testing.assert_close(by_layer.sum(0), mixed, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="missing"):
        ref.damping_vector(shapes, {"0": 1.0}, names)


# --------------------------------------------------------------------------------------------------------
# EK-FAC
# --------------------------------------------------------------------------------------------------------


def test_ekfac_inverse_is_inverse() -> None:
    q_s, q_a = random_orthogonal(4, 0), random_orthogonal(3, 1)
    lam = torch.rand(4, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    k = ref.kron_basis(q_s, q_a)
    forward = k @ torch.diag(lam.reshape(-1) + 0.1) @ k.T
    torch.testing.assert_close(
        ref.ekfac_inverse(q_s, q_a, lam, 0.1) @ forward, torch.eye(12, dtype=F64), rtol=0, atol=1e-12
    )
    # row-major convention: vec(Q_Sᵀ M Q_A) = Kᵀ vec(M)
    mat = torch.randn(4, 3, dtype=F64)
    torch.testing.assert_close((q_s.T @ mat @ q_a).reshape(-1), k.T @ mat.reshape(-1), rtol=1e-13, atol=1e-14)


def test_ekfac_reference_is_rotated_fisher_diagonal() -> None:
    q_s, q_a = random_orthogonal(4, 3), random_orthogonal(3, 4)
    k = ref.kron_basis(q_s, q_a)
    grads = torch.randn(20, 12, dtype=F64, generator=torch.Generator().manual_seed(5))
    lam = ref.ekfac_reference(grads, q_s, q_a)
    assert lam.shape == (4, 3)
    torch.testing.assert_close(
        lam.reshape(-1), torch.diagonal(k.T @ ref.empirical_fisher(grads) @ k), rtol=1e-12, atol=1e-14
    )
    torch.testing.assert_close(ref.ekfac_reference(grads.reshape(20, 4, 3), q_s, q_a), lam, rtol=0, atol=0)
    # when the Fisher is diagonal in the Kronecker basis, EK-FAC is exact: one example per basis direction
    scales = torch.linspace(0.5, 3.0, 12, dtype=F64)
    basis_grads = (k * scales).T  # row i = scales[i] · K e_i
    fisher = ref.empirical_fisher(basis_grads)
    lam = ref.ekfac_reference(basis_grads, q_s, q_a)
    torch.testing.assert_close(
        ref.ekfac_inverse(q_s, q_a, lam, 0.01),
        torch.linalg.inv(fisher + 0.01 * torch.eye(12, dtype=F64)),
        rtol=1e-10,
        atol=1e-12,
    )
    # and the diagonal reference is the diagonal of the empirical Fisher
    torch.testing.assert_close(
        ref.diagonal_fisher(grads), torch.diagonal(ref.empirical_fisher(grads)), rtol=1e-13, atol=0
    )


# --------------------------------------------------------------------------------------------------------
# Per-token quantities, Kronecker factors, strategies, sampled labels
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_token_io_rebuilds_the_per_example_gradient(case: str) -> None:
    """Σ_t g_t ā_tᵀ of the hook-recorded tokens equals the torch.func per-example gradient (layer by layer)."""
    model, task, data, names = CASES[case]()
    shapes = ref.layer_matrix_shapes(model, names)
    grads = ref.per_example_grads(model, task, data, names)
    uses = {"shared": 2} if case == "shared-module" else {}
    for n, (io, ex) in enumerate(zip(ref.token_io(model, task, data, names), ref.examples(task, data), strict=True)):
        for (name, (a, g)), spec, want in zip(
            io.items(), ref.layer_specs(model, names), ref.split_by_layer(grads[n], shapes), strict=True
        ):
            assert a.shape == (uses.get(name, 1) * ex.positions, spec.shape[1]) and g.shape[1] == spec.d_out
            torch.testing.assert_close(g.T @ a, want, rtol=1e-10, atol=1e-12)
            if spec.has_bias:
                assert torch.equal(a[:, -1], torch.ones(len(a), dtype=F64))
    factors = ref.kronecker_factors(model, task, data, names)
    spec = ref.layer_specs(model, names)[0]
    assert factors[spec.name].tokens == sum(uses.get(spec.name, 1) * ex.positions for ex in ref.examples(task, data))


def test_token_influence_sums_to_the_layer_product_and_follows_the_position_rule() -> None:
    """Σ_t I_{l,t} = ⟨P_l, ∇_l L⟩ for random P_l, and for the LM head the value at position t is the closed form
    (p_t − e_{token t+1})ᵀ P h_t of the hidden state h_t at t (zero at the last position and where token t+1 is
    not a target)."""
    model, task, data, names = case_llama_ragged()
    names = [*names, "lm_head"]
    shapes = ref.layer_matrix_shapes(model, names)
    gen = torch.Generator().manual_seed(3)
    precond = [torch.randn(*s, dtype=F64, generator=gen) for s in shapes]
    values = ref.token_influence(model, task, data, names, precond)
    grads = ref.per_example_grads(model, task, data, names)
    for n, (v, ex) in enumerate(zip(values, ref.examples(task, data), strict=True)):
        assert v.shape == (len(names), ex.positions)
        for layer, (p, g) in enumerate(zip(precond, ref.split_by_layer(grads[n], shapes), strict=True)):
            assert float(v[layer].sum()) == pytest.approx(float((p * g).sum()), rel=1e-10)
        with torch.no_grad():
            h = model.model(input_ids=ex.x, attention_mask=torch.ones_like(ex.x)).last_hidden_state[0]  # [T, H]
            probs = torch.softmax(model.lm_head(h), -1)
        expected = torch.zeros(ex.positions, dtype=F64)
        for t in range(ex.positions - 1):
            if ex.y[0, t + 1]:
                g_t = probs[t] - torch.nn.functional.one_hot(ex.x[0, t + 1], probs.shape[1]).to(F64)
                expected[t] = g_t @ precond[-1] @ h[t]
        torch.testing.assert_close(v[-1], expected, rtol=1e-10, atol=1e-12)
        # nonzero exactly where the next token is a target (sequence 2 has loss_mask [0, 0, 0, 1, 1, 0, 1])
        assert (v[-1] != 0).tolist() == [*ex.y[0, 1:].tolist(), False]


def test_strategy_curvatures() -> None:
    """Identity is I; diagonal is the Fisher's diagonal; EK-FAC keeps the trace of the Fisher block and is at least
    as close to it as K-FAC in Frobenius norm (it is the projection onto matrices diagonal in K-FAC's basis)."""
    model, task, data, names = case_llama()
    names = names[:2]
    shapes = ref.layer_matrix_shapes(model, names)
    fisher = [
        ref.empirical_fisher(g.flatten(1))
        for g in ref.split_by_layer(ref.per_example_grads(model, task, data, names), shapes)
    ]
    damped = {
        s: ref.strategy_curvature(model, task, data, names, s, damping_factor=0.5) for s in ("identity", "diagonal")
    }
    plain = {s: ref.strategy_curvature(model, task, data, names, s, damping_factor=0.0) for s in ("kfac", "ekfac")}
    for layer, f in enumerate(fisher):
        eye = torch.eye(len(f), dtype=F64)
        assert torch.equal(damped["identity"][layer], eye)
        lam = 0.5 * float(torch.diagonal(f).mean())  # 0.5 × mean(Λ)
        torch.testing.assert_close(
            damped["diagonal"][layer], torch.diag(torch.diagonal(f)) + lam * eye, rtol=1e-12, atol=0
        )
        ekfac, kfac = plain["ekfac"][layer], plain["kfac"][layer]
        assert float(torch.trace(ekfac)) == pytest.approx(float(torch.trace(f)), rel=1e-10)
        assert float((ekfac - f).norm()) <= float((kfac - f).norm()) * (1 + 1e-10)
        assert torch.linalg.eigvalsh(ekfac).min() > -1e-12 * float(ekfac.norm())


def test_counter_based_sampler() -> None:
    """The splitmix64 finaliser gives the published SplitMix64 stream (seed 0); uniforms are in (0, 1) and look
    uniform; keys differ by seed, stream and index."""
    assert ref.uniform.__module__ == "reference"
    from reference import _splitmix

    assert [_splitmix(k * 0x9E3779B97F4A7C15) for k in (1, 2)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]
    keys = ref.example_keys(3, 1, torch.arange(200))
    assert keys.dtype == torch.int64 and len(set(keys.tolist())) == 200
    assert not set(keys.tolist()) & set(ref.example_keys(3, 2, torch.arange(200)).tolist())
    assert not set(keys.tolist()) & set(ref.example_keys(4, 1, torch.arange(200)).tolist())
    u = torch.tensor([ref.uniform(int(k), j) for k in keys for j in range(25)], dtype=F64)
    assert float(u.min()) > 0 and float(u.max()) < 1
    assert float(u.mean()) == pytest.approx(0.5, abs=0.01) and float(u.var()) == pytest.approx(1 / 12, abs=0.005)


# --------------------------------------------------------------------------------------------------------
# The zoo
# --------------------------------------------------------------------------------------------------------


def test_zoo_is_deterministic_and_float64() -> None:
    a, b = zoo.tiny_llama(), zoo.tiny_llama()
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb and pa.dtype == F64 and torch.equal(pa, pb)
    assert not torch.equal(zoo.tiny_llama(seed=1).lm_head.weight, a.lm_head.weight)
    state = torch.random.get_rng_state()
    zoo.mlp(seed=3)
    assert torch.equal(state, torch.random.get_rng_state())  # builders do not consume the global RNG
    assert zoo.mlp_names(zoo.mlp()) == ["0", "2", "4"]
    assert zoo.linear_names(zoo.tiny_gpt2(), include=lambda n: ".mlp." in n) == [
        "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj",
        "transformer.h.1.mlp.c_fc",
        "transformer.h.1.mlp.c_proj",
    ]
    assert zoo.tiny_gpt2().lm_head.weight.data_ptr() != zoo.tiny_gpt2().transformer.wte.weight.data_ptr()


def test_tiny_llama_float64_faithful() -> None:
    """Stock HF Llama upcasts RMSNorm/softmax to float32; the zoo version agrees with float64 finite
    differences to ~1e-9 while computing the same function (to float32 precision) as the stock one."""
    ids = zoo.token_data(2, 8, 64, seed=11)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "target_mask": torch.ones_like(ids).bool()}
    task = CausalLM()

    def fd_error(model: nn.Module) -> float:
        w = model.get_submodule("model.layers.0.mlp.up_proj").weight
        (gw,) = torch.autograd.grad(task.train_loss(task.forward(model, batch), batch).sum(), w)
        d = torch.randn(w.shape, dtype=F64, generator=torch.Generator().manual_seed(0))
        eps = 1e-5
        with torch.no_grad():
            w += eps * d
            up = task.train_loss(task.forward(model, batch), batch).sum()
            w -= 2 * eps * d
            down = task.train_loss(task.forward(model, batch), batch).sum()
            w += eps * d
        fd = (up - down) / (2 * eps)
        return float((fd - (gw * d).sum()).abs() / fd.abs())

    exact, stock = zoo.tiny_llama(), zoo.tiny_llama(exact_float64=False)
    assert fd_error(exact) < 1e-7
    with torch.no_grad():
        torch.testing.assert_close(task.forward(exact, batch), task.forward(stock, batch), rtol=1e-5, atol=1e-5)
