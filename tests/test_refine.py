"""Full-GNH refinement of the query side (influencer.refine) against float64 references."""

from __future__ import annotations

import pytest
import reference as ref
import torch
import zoo
from test_exactness import SETUPS, rel_err

import influencer as inf
from influencer.functional import FlatModel


def _ekfac(setup: str) -> tuple:
    model, task, train, queries = SETUPS[setup]
    curv = inf.fit_curvature(model, task, train, strategy="ekfac", layers="all", progress=False)
    return model, task, train, queries, curv


@pytest.mark.parametrize("setup", list(SETUPS))
def test_flat_layout_round_trips_to_the_engines_matrices(setup: str) -> None:
    model, task, _train, queries, curv = _ekfac(setup)
    fm = FlatModel(model, task, curv.layer_names)
    v = torch.randn(3, fm.P, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mats = fm.layer_matrices(v)
    assert {n: tuple(m.shape[1:]) for n, m in mats.items()} == {n: f.shape for n, f in curv.layers.items()}
    assert torch.equal(fm.flat(mats), v)
    # the engine's measurement gradients (hooks), flattened and summed over queries, are autograd's gradient of
    # Σ_q f_q in the modules' own orientation (Conv1D weights are stored transposed)
    engine = inf.measurement_gradients(model, task, curv.bind(model), queries)
    batch = (
        task.collate([task.as_dataset(queries, queries=True)[i] for i in range(len(engine[names[0]]))])
        if (names := curv.layer_names)
        else None
    )
    total = task.measurement(task.forward(model, batch), batch).sum()
    params = [
        getattr(x.module, p)
        for x in fm.layers
        for p in ("weight", "bias")
        if isinstance(getattr(x.module, p, None), torch.Tensor)
    ]
    autograd = torch.cat([g.reshape(-1) for g in torch.autograd.grad(total, params)])
    assert rel_err(fm.flat(engine).sum(0), autograd) < 1e-10


@pytest.mark.parametrize("setup", list(SETUPS))
def test_zero_iterations_is_the_curvatures_own_answer(setup: str) -> None:
    model, task, train, queries, curv = _ekfac(setup)
    plain = inf.preconditioned_queries(model, task, curv, queries)
    refined = inf.refine_queries(model, task, curv, queries, train, iterations=0)
    assert set(refined) == set(plain)
    for name, p in plain.items():
        assert rel_err(refined[name], p) < 1e-9


@pytest.mark.parametrize("setup", list(SETUPS))
def test_refinement_converges_to_the_exact_damped_influence(setup: str) -> None:
    model, task, train, queries, curv = _ekfac(setup)
    # λ_l = 1 × mean(Λ_l) per layer (the default is 0.1 ×): better conditioned, so 200 steps reach < 1e-9 on every
    # setup (measured; at 0.1 × the transformers need ~700)
    curv = curv.with_damping(damping_factor=1.0)
    names = curv.layer_names
    damping = {n: curv.layers[n].damping for n in names}
    exact = ref.exact_influence(model, task, queries, train, names, damping=damping)
    ekfac = inf.pairwise_scores(model, task, curv, queries, train, progress=False).total
    refined = inf.pairwise_scores(
        model, task, curv, queries, train, refine_data=train, refine_iterations=200, progress=False
    )
    assert rel_err(refined.total, exact) < 1e-6
    assert rel_err(refined.total, exact) < rel_err(ekfac, exact)
    assert rel_err(sum(refined.per_layer.values()), refined.total) < 1e-12  # layers still sum to the total


def test_query_store_refines_chunk_by_chunk() -> None:
    model, task, train, queries, curv = _ekfac("mlp-classification")
    direct = inf.refine_queries(model, task, curv, queries, train, iterations=4)
    store = inf.QueryStore.build(
        model, task, curv, queries, rank=None, batch_size=3, refine_data=train, refine_iterations=4
    )
    for name, p in direct.items():
        assert rel_err(store.layers[name].to_dense(), p) < 1e-10


def test_refinement_errors_are_clear() -> None:
    model, task, train, queries, curv = _ekfac("mlp-regression")
    identity = inf.fit_curvature(model, task, train, strategy="identity", layers="all", progress=False)
    with pytest.raises(ValueError, match="identity strategy"):
        inf.refine_queries(model, task, identity, queries, train)
    with pytest.raises(ValueError, match="iterations must be"):
        inf.refine_queries(model, task, curv, queries, train, iterations=-1)
    x, y = zoo.regression_data(4)
    with pytest.raises(ValueError, match="no training data"):
        inf.refine_queries(model, task, curv, queries, (x[:0], y[:0]))


def test_scan_with_a_refined_store_gives_the_refined_scores() -> None:
    model, task, train, queries, curv = _ekfac("mlp-classification")
    store = inf.QueryStore.build(model, task, curv, queries, rank=None, refine_data=train, refine_iterations=4)
    assert store.meta["refine"] == {"iterations": 4, "data_size": len(task.as_dataset(train))}
    result = inf.scan(model, task, curv, queries, train, store=store, keep_scores=True, tokens=False, progress=False)
    assert result.meta["refine"] == store.meta["refine"]  # a given store's refinement is reported with the result
    expected = inf.pairwise_scores(
        model, task, curv, queries, train, refine_data=train, refine_iterations=4, progress=False
    ).total
    plain = inf.pairwise_scores(model, task, curv, queries, train, progress=False).total
    assert rel_err(result.scores, expected) < 1e-9
    assert rel_err(plain, expected) > 1e-3  # the refinement changed the answer


def test_scan_refines_its_own_store_and_resumes_only_with_the_same_refinement(tmp_path) -> None:
    model, task, train, queries, curv = _ekfac("llama-causal-lm")
    expected = inf.pairwise_scores(
        model, task, curv, queries, train, refine_data=train, refine_iterations=3, progress=False
    ).total
    out = tmp_path / "scan"
    kwargs = {"rank": None, "keep_scores": True, "tokens": True, "progress": False, "batch_size": 3}
    result = inf.scan(model, task, curv, queries, train, refine_data=train, refine_iterations=3, out_dir=out, **kwargs)
    assert result.scores is not None and rel_err(result.scores, expected) < 1e-9
    assert result.meta["refine"]["iterations"] == 3
    assert result.meta["refine"]["data_size"] == len(task.as_dataset(train))
    hit = result.top(0, 1)[0]  # the token pass uses the refined queries too: tokens still sum to the score
    assert hit.tokens is not None and abs(float(hit.tokens.sum()) - hit.score) <= 1e-9 * abs(hit.score) + 1e-12
    again = inf.scan(model, task, curv, queries, train, refine_data=train, refine_iterations=3, out_dir=out, **kwargs)
    assert again.scores is not None and torch.equal(again.scores, result.scores)
    with pytest.raises(ValueError, match="other query refinement settings"):
        inf.scan(model, task, curv, queries, train, out_dir=out, **kwargs)
    with pytest.raises(ValueError, match="other query refinement settings"):
        inf.scan(model, task, curv, queries, train, refine_data=train, refine_iterations=4, out_dir=out, **kwargs)
    store = inf.QueryStore.build(model, task, curv, queries, rank=None)
    with pytest.raises(ValueError, match=r"pass refine_data to QueryStore\.build"):
        inf.scan(model, task, curv, queries, train, store=store, refine_data=train, progress=False)
    with pytest.raises(ValueError, match="refine_iterations must be ≥ 1"):
        inf.scan(model, task, curv, queries, train, refine_data=train, refine_iterations=0, progress=False)
