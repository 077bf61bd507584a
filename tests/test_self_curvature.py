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


def test_scan_rescales_its_hits_by_their_leave_one_in_factors() -> None:
    from influencer.refine import RefinedInverse
    from influencer.refine_plan import sample_rows
    from influencer.scan import BANDS, POOL
    from influencer.self_curvature import hit_factors

    model, task, _train, queries = SETUPS["llama-causal-lm"]
    train = zoo.token_data(64, t=6, seed=7)
    queries = {k: v[:2] for k, v in queries.items()}
    curv = inf.fit_curvature(model, task, train, layers="all", progress=False)
    kw = {"rank": None, "keep_scores": True, "progress": False, "top_k": 4, "refine": 2}
    raw = inf.scan(model, task, curv, queries, train, self_correct=False, **kw)
    # on by default for the refined (default) path, within a budget: 64 sequences cannot pay for the whole pool
    # of 2 queries (~4 passes per candidate, at most the scan's own cost), nor for every list's kept hits, so the
    # default corrects the kept hits of the top and bottom lists (what a user reads) and leaves the bands alone
    partial = inf.scan(model, task, curv, queries, train, **kw)
    sc = partial.meta["self_correction"]
    assert sc["lists"] == "top and bottom" and sc["pool"] == 4 and sc["candidates"] <= 2 * 2 * 4
    corrected = {int(i) for i in sc["factors"]}
    for q in range(2):
        assert {h.index for h in partial.top(q)} <= corrected  # every kept top hit was corrected
        assert {h.index for h in partial.top(q)} == {h.index for h in raw.top(q)}  # the same kept hits, re-ranked
        for band in BANDS:
            assert [(h.index, h.score) for h in partial.top(q, band=band)] == [
                (h.index, h.score) for h in raw.top(q, band=band)
            ]
    fixed = inf.scan(model, task, curv, queries, train, self_correct=True, **kw)  # forced
    assert raw.meta["self_correction"] is None
    factors = {int(i): f for i, f in fixed.meta["self_correction"]["factors"].items()}
    assert fixed.meta["self_correction"]["pool"] == POOL * 4
    scores = raw.scores  # uncorrected, the same in both (result.scores is never corrected)
    assert torch.equal(fixed.scores, scores)
    inverse = RefinedInverse(
        model, task, curv, take_rows(train, sample_rows(64, fixed.meta["inverse"]["data_size"], 0)), steps=2
    )
    assert factors == pytest.approx(hit_factors(model, task, inverse, train, sorted(factors), n_train=64))
    for q in range(2):
        # the kept hits are the pool's best after the correction, with their corrected scores and parts
        pool = [i for i in factors if i in set(scores[q].topk(POOL * 4).indices.tolist())]
        corrected = {i: float(scores[q, i]) * factors[i] for i in pool}
        best = sorted(corrected, key=lambda i: -corrected[i])[:4]
        hits = fixed.top(q)
        assert [h.index for h in hits] == best
        for h in hits:
            assert h.score == pytest.approx(corrected[h.index], rel=1e-9)
            assert float(h.tokens.sum()) == pytest.approx(h.score, rel=1e-9)
            assert sum(h.layers.values()) == pytest.approx(h.score, rel=1e-9)
    # every hit, inside the refinement sample or not, gets 1 / (1 + c s / N)
    m = fixed.meta["inverse"]["data_size"]
    assert set(sample_rows(64, m, 0).tolist()) & set(factors)  # the pool holds sample members
    raw_cs = self_correction(model, task, curv, train, sorted(factors), n_train=64)
    for i, f in factors.items():
        assert f == pytest.approx(1 / (1 + raw_cs[i]["c"] * raw_cs[i]["s"] / 64), rel=1e-9)
    plain = inf.scan(model, task, curv, queries, train, **{**kw, "refine": 0})
    assert plain.meta["self_correction"] is None  # the paper's plain estimate stays as it is


@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "diagonal", "identity"])
@pytest.mark.parametrize("blocks", [1, 2])
def test_quadratic_form_of_tokens_equals_that_of_the_sequence_gradient(strategy: str, blocks: int) -> None:
    from influencer.curvature.linalg import per_example_grads
    from influencer.passes import layer_io

    model, task, train, _queries = SETUPS["llama-causal-lm"]
    curv = inf.fit_curvature(model, task, train, strategy=strategy, layers="all", blocks=blocks, progress=False)
    layers = curv.bind(model)
    batch = task.collate([task.as_dataset(train)[i] for i in range(4)])
    io = layer_io(model, task, layers, batch, torch.arange(4), loss="train")
    for name, x in io.items():
        want = curv.quadratic_form(name, per_example_grads(x.a, x.g))
        torch.testing.assert_close(curv.quadratic_form_tokens(name, x.a, x.g), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("setup", ["mlp-classification", "llama-causal-lm", "gpt2-conv1d"])
def test_batched_own_curvature_equals_the_dense_reference_with_padding(setup: str) -> None:
    model, task, train, _queries = SETUPS[setup]
    if isinstance(task, inf.CausalLM):  # rows of different lengths: batches are padded
        ids = zoo.token_data(6, t=7, seed=9)
        train = [{"input_ids": ids[i, : 3 + i % 4]} for i in range(6)]
    curv = inf.fit_curvature(model, task, train, layers="all", progress=False)
    names = curv.layer_names
    out = self_correction(model, task, curv, train, list(range(6)), n_train=6, batch_size=4)
    for i in range(6):
        one = take_rows(train, [i])
        gnh = ref.dense_gnh(model, task, one, names)
        g = ref.per_example_grads(model, task, one, names, loss="train")[0]
        assert out[i]["c"] == pytest.approx(float(g @ gnh @ g / (g @ g)), rel=1e-8)
