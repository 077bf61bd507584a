"""The leave-one-in correction (influencer.self_curvature) against dense float64 references."""

from __future__ import annotations

import pytest
import reference as ref
import torch
import zoo
from test_exactness import SETUPS

import influencer as inf
from influencer.functional import FlatModel
from influencer.self_curvature import own_curvature, self_correction
from influencer.tasks import take_rows


@pytest.mark.parametrize("setup", ["mlp-regression", "mlp-classification", "llama-causal-lm", "gpt2-conv1d"])
def test_own_curvature_is_the_rayleigh_quotient_of_the_dense_gnh_of_one_example(setup: str) -> None:
    model, task, train, _queries = SETUPS[setup]
    names = [x.name for x in inf.select_layers(model, "all")]
    fm = FlatModel(model, task, names)
    for i in (0, 3):
        one = take_rows(train, [i])
        gnh = ref.dense_gnh(model, task, one, names)  # G_z [P, P] in the engine's matrix layout
        g = ref.per_example_grads(model, task, one, names, loss="train")[0]
        expected = float(g @ gnh @ g / (g @ g))
        # own_curvature works in the flat (module) layout: the same vector through the engine's matrices
        mats = dict(zip(names, ref.split_by_layer(g, ref.layer_matrix_shapes(model, names)), strict=True))
        got = own_curvature(
            fm, fm.to(task.collate([task.as_dataset(one)[0]])), fm.flat({k: v[None] for k, v in mats.items()})[0]
        )
        assert got == pytest.approx(expected, rel=1e-8)


def test_rank_one_leave_one_in_is_exact_when_the_own_term_is_rank_one() -> None:
    """Regression with one output: G_z = j jᵀ is rank one along g = (h − y) j, so I / (1 + c s / N) with
    s = gᵀR⁻¹g/‖g‖² (R the curvature without z) equals the influence under the full G exactly."""
    x, y = zoo.regression_data(12, d_out=1)
    model = zoo.mlp(d_out=1)
    task = inf.Regression()
    names = [x_.name for x_ in inf.select_layers(model, "all")]
    n, z, lam = 12, 5, 0.05
    g_full = ref.dense_gnh(model, task, (x, y), names)
    g_z = ref.dense_gnh(model, task, (x[z : z + 1], y[z : z + 1]), names)
    rest = g_full - g_z / n + lam * torch.eye(len(g_full), dtype=torch.float64)
    full = g_full + lam * torch.eye(len(g_full), dtype=torch.float64)
    v = ref.per_example_grads(model, task, (x[:1] * 0.7, y[:1]), names, loss="measurement", queries=True)[0]
    g = ref.per_example_grads(model, task, (x, y), names, loss="train")[z]
    i_full = -float(v @ torch.linalg.solve(full, g))
    i_rest = -float(v @ torch.linalg.solve(rest, g))
    c = float(g @ g_z @ g / (g @ g))
    s = float(g @ torch.linalg.solve(rest, g) / (g @ g))
    assert i_full == pytest.approx(i_rest / (1 + c * s / n), rel=1e-9)
    assert abs(i_full) < abs(i_rest)


def test_self_correction_uses_the_curvatures_quadratic_form() -> None:
    model, task, train, _queries = SETUPS["mlp-classification"]
    curv = inf.fit_curvature(model, task, train, layers="all", progress=False)
    out = self_correction(model, task, curv, train, [0, 7], n_train=24)
    self_inf = inf.self_scores(model, task, curv, train, progress=False)
    names = curv.layer_names
    grads = ref.per_example_grads(model, task, train, names, loss="train")
    for i in (0, 7):
        assert out[i]["s"] == pytest.approx(float(self_inf[i]) / float(grads[i] @ grads[i]), rel=1e-6)
        assert out[i]["factor"] == pytest.approx(1 / (1 + out[i]["c"] * out[i]["s"] / 24))
        assert 0 < out[i]["factor"] <= 1 and out[i]["c"] >= 0
