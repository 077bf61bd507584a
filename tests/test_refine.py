"""The refined inverse (influencer.refine) against float64 references, and the default refinement of scan."""

from __future__ import annotations

import pytest
import reference as ref
import torch
import zoo
from test_exactness import SETUPS, rel_err

import influencer as inf
from influencer.functional import FlatModel
from influencer.refine import RefinedInverse
from influencer.refine_plan import (
    LARGE,
    LARGE_SHARE,
    SMALL,
    default_inverse,
    plan_refinement,
    refinement_share,
    sample_rows,
)
from influencer.tasks import take_rows
from influencer.units import calibrated, units_note


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
def test_zero_steps_is_the_curvatures_own_answer(setup: str) -> None:
    model, task, train, queries, curv = _ekfac(setup)
    plain = inf.preconditioned_queries(model, task, curv, queries)
    refined = inf.preconditioned_queries(model, task, RefinedInverse(model, task, curv, train, steps=0), queries)
    assert set(refined) == set(plain)
    for name, p in plain.items():
        assert rel_err(refined[name], p) < 1e-9


@pytest.mark.parametrize("setup", list(SETUPS))
def test_refined_inverse_converges_to_the_exact_damped_gnh_inverse(setup: str) -> None:
    model, task, train, queries, curv = _ekfac(setup)
    # λ_l = 1 × mean(Λ_l) per layer (the default is 0.1 ×): better conditioned, so 200 steps reach < 1e-9 on every
    # setup (measured; at 0.1 × the transformers need ~700)
    curv = curv.with_damping(damping_factor=1.0)
    names = curv.layer_names
    damping = {n: curv.layers[n].damping for n in names}
    exact = ref.exact_influence(model, task, queries, train, names, damping=damping)
    ekfac = inf.pairwise_scores(model, task, curv, queries, train, progress=False).total
    inverse = RefinedInverse(model, task, curv, train, steps=200)
    refined = inf.pairwise_scores(model, task, inverse, queries, train, progress=False)
    assert rel_err(refined.total, exact) < 1e-6
    assert rel_err(refined.total, exact) < rel_err(ekfac, exact)
    assert rel_err(sum(refined.per_layer.values()), refined.total) < 1e-12  # layers still sum to the total
    assert refined.meta["inverse"] == inverse.describe() and inverse.describe()["steps"] == 200
    # solve() itself: the dense float64 solve of (G + λ) x = v, layer by layer
    grads = inf.measurement_gradients(model, task, curv.bind(model), queries)
    gnh = ref.dense_gnh(model, task, train, names)
    shapes = ref.layer_matrix_shapes(model, names)
    lam = ref.damping_vector(shapes, damping, names, dtype=gnh.dtype)
    v = ref.join_layers([grads[n].to(torch.float64) for n in names])
    expected = torch.linalg.solve(gnh + torch.diag(lam), v.T).T
    solved = inverse.solve(grads)
    assert rel_err(ref.join_layers([solved[n] for n in names]), expected) < 1e-6


def test_query_store_refines_chunk_by_chunk() -> None:
    model, task, train, queries, curv = _ekfac("mlp-classification")
    inverse = RefinedInverse(model, task, curv, train, steps=4)
    direct = inf.preconditioned_queries(model, task, inverse, queries)
    store = inf.QueryStore.build(model, task, inverse, queries, rank=None, batch_size=3)
    for name, p in direct.items():
        assert rel_err(store.layers[name].to_dense(), p) < 1e-10
    assert store.meta["inverse"] == inverse.describe()


def test_refinement_errors_are_clear() -> None:
    model, task, train, queries, curv = _ekfac("mlp-regression")
    identity = inf.fit_curvature(model, task, train, strategy="identity", layers="all", progress=False)
    with pytest.raises(ValueError, match="identity strategy"):
        RefinedInverse(model, task, identity, train)
    with pytest.raises(ValueError, match="steps must be"):
        RefinedInverse(model, task, curv, train, steps=-1)
    x, y = zoo.regression_data(4)
    with pytest.raises(ValueError, match="no training data"):
        RefinedInverse(model, task, curv, (x[:0], y[:0]))
    with pytest.raises(ValueError, match="every tracked layer"):
        RefinedInverse(model, task, curv, train).solve({})
    with pytest.raises(ValueError, match="refine must be 'auto' or a number"):
        inf.scan(model, task, curv, queries, train, refine=-1, progress=False)
    inverse = RefinedInverse(model, task, curv, train, steps=2)
    with pytest.raises(ValueError, match="already refined"):
        inf.scan(model, task, inverse, queries, train, refine=5, progress=False)
    store = inf.QueryStore.build(model, task, curv, queries, rank=None)
    with pytest.raises(ValueError, match="used as it was built"):
        inf.scan(model, task, curv, queries, train, store=store, refine=3, progress=False)


def test_scan_with_a_refined_store_gives_the_refined_scores() -> None:
    model, task, train, queries, curv = _ekfac("mlp-classification")
    inverse = RefinedInverse(model, task, curv, train, steps=4)
    store = inf.QueryStore.build(model, task, inverse, queries, rank=None)
    result = inf.scan(model, task, curv, queries, train, store=store, keep_scores=True, tokens=False, progress=False)
    assert result.meta["inverse"] == inverse.describe()  # a given store's inverse is reported with the result
    expected = inf.pairwise_scores(model, task, inverse, queries, train, progress=False).total
    plain = inf.pairwise_scores(model, task, curv, queries, train, progress=False).total
    assert rel_err(result.scores, expected) < 1e-9
    assert rel_err(plain, expected) > 1e-3  # the refinement changed the answer


def test_scan_refines_by_default_on_a_seeded_sample_and_resumes_only_with_the_same_inverse(tmp_path) -> None:
    model, task, _train, queries, _curv = _ekfac("llama-causal-lm")
    # 64 training sequences and one query: the cost model affords refinement (3 queries × 10 sequences do not)
    train = zoo.token_data(64, t=6, seed=7)
    queries = {k: v[:1] for k, v in queries.items()}
    curv = inf.fit_curvature(model, task, train, layers="all", progress=False)
    out = tmp_path / "scan"
    kwargs = {"rank": None, "keep_scores": True, "tokens": True, "progress": False, "batch_size": 8}
    result = inf.scan(model, task, curv, queries, train, out_dir=out, **kwargs)
    meta, plan = result.meta["inverse"], result.meta["refine_plan"]
    assert meta["inverse"] == "refined" and meta["steps"] == plan["steps"] >= 1
    n = len(task.as_dataset(train))
    assert meta["data_size"] == plan["sample"] == min(n, meta["data_size"]) and meta["sample_of"] == n
    assert plan["predicted"] <= plan["share"] + 1e-12
    # the same result by hand: the planned steps over the seeded sample
    rows = sample_rows(n, plan["sample"], 0)
    by_hand = RefinedInverse(model, task, curv, take_rows(train, rows), steps=plan["steps"])
    expected = inf.pairwise_scores(model, task, by_hand, queries, train, progress=False).total
    assert result.scores is not None and rel_err(result.scores, expected) < 1e-9
    hit = result.top(0, 1)[0]  # the token pass uses the refined queries too: tokens still sum to the score
    assert hit.tokens is not None and abs(float(hit.tokens.sum()) - hit.score) <= 1e-9 * abs(hit.score) + 1e-12
    again = inf.scan(model, task, curv, queries, train, out_dir=out, **kwargs)
    assert again.scores is not None and torch.equal(again.scores, result.scores)
    with pytest.raises(ValueError, match="inverse"):
        inf.scan(model, task, curv, queries, train, out_dir=out, refine=0, **kwargs)
    with pytest.raises(ValueError, match="inverse"):
        inf.scan(model, task, curv, queries, train, out_dir=out, refine_seed=1, **kwargs)
    # refine=0 is the paper's plain estimate
    plain = inf.scan(model, task, curv, queries, train, refine=0, **kwargs)
    assert plain.meta["inverse"] == curv.describe() and plain.meta["refine_plan"] is None
    want = inf.pairwise_scores(model, task, curv, queries, train, progress=False).total
    assert rel_err(plain.scores, want) < 1e-9


def test_partitions_refine_on_the_same_sample(tmp_path) -> None:
    model, task, train, queries, curv = _ekfac("llama-causal-lm")
    kwargs = {"rank": None, "keep_scores": True, "tokens": False, "progress": False, "refine": 2}
    whole = inf.scan(model, task, curv, queries, train, **kwargs)
    assert whole.meta["inverse"]["steps"] == 2
    n = len(task.as_dataset(train))
    for i, r in enumerate([(0, 4), (4, n)]):
        inf.scan(model, task, curv, queries, train, data_range=r, out_dir=tmp_path / f"p{i}", **kwargs)
    merged = inf.merge_scans([tmp_path / "p0", tmp_path / "p1"])
    assert merged.meta["inverse"] == whole.meta["inverse"]
    assert rel_err(merged.scores, whole.scores) < 1e-6


def test_identity_is_not_refined_by_default_and_gradient_dot_stays_gradient_dot() -> None:
    model, task, train, queries, _curv = _ekfac("mlp-regression")
    identity = inf.fit_curvature(model, task, train, strategy="identity", layers="all", progress=False)
    result = inf.scan(model, task, identity, queries, train, keep_scores=True, tokens=False, progress=False)
    assert result.meta["inverse"] == identity.describe() and result.meta["refine_plan"] is None


def test_refinement_share_is_one_on_small_corpora_and_a_tenth_on_large_ones() -> None:
    assert refinement_share(100) == refinement_share(SMALL) == 1.0
    assert refinement_share(LARGE) == refinement_share(10 * LARGE) == LARGE_SHARE
    shares = [refinement_share(n) for n in (SMALL, 8192, 20_000, 50_000, LARGE)]
    assert shares == sorted(shares, reverse=True)


@pytest.mark.parametrize("n_queries", [1, 16, 64, 512])
@pytest.mark.parametrize("n_scan", [64, 4096, 30_000, 100_000, 1_000_000])
def test_the_plan_stays_within_its_share_of_the_scan(n_queries: int, n_scan: int) -> None:
    plan = plan_refinement(n_queries, n_scan, n_data=n_scan, scan_cost=1.0)
    assert 0 <= plan.steps <= 3
    assert plan.predicted <= plan.share + 1e-12
    if plan.steps:
        assert 16 <= plan.sample <= min(1024, n_scan)
    # more queries never buy more refinement per query
    more = plan_refinement(2 * n_queries, n_scan, n_data=n_scan, scan_cost=1.0)
    assert (more.steps, more.sample) <= (plan.steps, plan.sample)


def test_the_plan_on_the_issue_sizes() -> None:
    # SmolLM2, 16 queries: 4,096 sequences allow the full default; 100k sequences keep it ≤ 10 % of the scan
    small = plan_refinement(16, 4096, 4096)
    large = plan_refinement(16, 100_000, 100_000)
    assert small.steps == 3 and small.predicted <= 1.0
    assert large.steps == 3 and large.predicted <= 0.1


def test_default_inverse_honours_the_options() -> None:
    model, task, train, _queries, curv = _ekfac("mlp-regression")
    kw = {"n_queries": 4, "n_scan": 24, "rank": None}
    inverse, plan = default_inverse(model, task, curv, train, refine="auto", **kw)
    assert inverse is curv and plan is not None and plan.steps == 0  # 4 queries × 24 rows: too small to afford it
    inverse, plan = default_inverse(model, task, curv, train, refine="auto", **{**kw, "n_queries": 1})
    assert isinstance(inverse, RefinedInverse) and plan is not None and inverse.steps == plan.steps >= 1
    fixed, plan2 = default_inverse(model, task, curv, train, refine=5, sample=7, **kw)
    assert isinstance(fixed, RefinedInverse) and fixed.steps == 5 and fixed.n_data == 7 and plan2.sample == 7
    same, none = default_inverse(model, task, curv, train, refine=0, **kw)
    assert same is curv and none is None


def test_units_are_nats_only_for_the_corrected_hits_of_a_refined_inverse() -> None:
    model, task, train, _queries, curv = _ekfac("mlp-regression")
    refined = RefinedInverse(model, task, curv, train, steps=2).describe()
    corrected = {"pool": 30, "candidates": 12, "factors": {"3": 0.5}}
    assert calibrated(refined, corrected) and "in nats" in units_note(refined, 100, corrected)
    for skipped in (None, {"skipped": "over budget"}):  # uncorrected hits of a refined scan are a score
        assert not calibrated(refined, skipped)
        assert "not corrected for their own curvature" in units_note(refined, 100, skipped)
    assert not calibrated(curv.describe(), corrected) and "is a score, not nats" in units_note(curv.describe(), 100)
    assert not calibrated(RefinedInverse(model, task, curv, train, steps=0).describe())
    assert not calibrated(None)


def test_take_rows_keeps_every_field() -> None:
    data = {"input_ids": torch.arange(12).view(4, 3), "loss_mask": [[1, 0, 1]] * 4, "prompt_length": 2}
    rows = take_rows(data, [3, 1])
    assert torch.equal(rows["input_ids"], torch.tensor([[9, 10, 11], [3, 4, 5]]))
    assert rows["loss_mask"] == [[1, 0, 1]] * 2 and rows["prompt_length"] == 2
    x, y = zoo.regression_data(5)
    xs, ys = take_rows((x, y), torch.tensor([0, 4]))
    assert torch.equal(xs, x[[0, 4]]) and torch.equal(ys, y[[0, 4]])
    assert torch.equal(sample_rows(10, 4, 0), sample_rows(10, 4, 0)) and sample_rows(3, 8, 0).tolist() == [0, 1, 2]


@pytest.mark.parametrize("refined", [False, True])
def test_completion_split_sums_to_the_exact_influence_and_the_measurement(refined: bool) -> None:
    from influencer.completion import completion_split

    model, task, train, queries, curv = _ekfac("llama-causal-lm")
    inverse = RefinedInverse(model, task, curv, train, steps=3) if refined else curv
    exact = inf.pairwise_scores(model, task, inverse, queries, train, progress=False).total
    hits = {0: [0, 3, 7], 2: [1, 2]}
    splits = completion_split(model, task, inverse, queries, train, hits)
    assert [s.query for s in splits] == [0, 2]
    ds = task.as_dataset(queries, queries=True)
    for s in splits:
        batch = task.collate([ds[s.query]])
        with torch.no_grad():
            f = float(task.measurement(task.forward(model, batch), batch)[0])
        assert abs(float(s.logp.sum()) - f) < 1e-6 * max(1.0, abs(f))  # Σ_c log p(y_c) = f
        assert len(s.positions) == int(ds[s.query]["target_mask"].sum()) >= 2
        for i in hits[s.query]:
            assert abs(float(s.hits[i].sum()) - float(exact[s.query, i])) <= 1e-6 * float(exact[s.query].abs().max())
            assert abs(float(s.shares(i).sum()) - 1.0) < 1e-9
    # a part is the influence through one completion token: the same as a query whose completion is that token
    s = splits[0]
    t = s.positions[-1]
    ex = ds[0]
    one = {"input_ids": ex["input_ids"][None], "completion_mask": (torch.arange(len(ex["input_ids"])) == t)[None]}
    if not refined:  # the refined parts follow the total's CG map, not their own
        alone = inf.pairwise_scores(model, task, inverse, one, train, progress=False).total[0]
        assert abs(float(s.hits[3][-1]) - float(alone[3])) <= 1e-6 * float(alone.abs().max())
