"""Low precision: a bf16 model, or fp32 under torch.autocast(bf16), fits and scans with fp32 factors and gives
scores close to the fp32 run (the math on captured activations always runs in fp32).

The comparisons use the empirical Fisher: with the default true Fisher the labels are sampled from the model, and a
bf16 model's slightly different logits change ~6% of the draws on these tiny models, which moves the fitted Λ by
far more than the precision does (sampling noise, not precision error). The true-Fisher path is checked on its
own, with a tolerance that allows for that noise."""

from __future__ import annotations

import copy

import pytest
import torch
import zoo

import influencer as inf


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


@pytest.fixture(scope="module")
def setup():
    model = zoo.tiny_llama(hidden=32, intermediate=64, layers=2).float()
    task = inf.CausalLM()
    train = zoo.token_data(32, t=12)
    queries = {"input_ids": zoo.token_data(4, t=10, seed=5), "prompt_length": torch.tensor([3, 4, 5, 6])}
    curv = inf.fit_curvature(model, task, train, fisher="empirical", progress=False)
    ref = inf.scan(
        model, task, curv, queries, train, rank=None, top_k=5, keep_scores=True, tokens=False, progress=False
    )
    return model, task, train, queries, ref


def _check(curv: inf.Curvature, result: inf.ScanResult, ref: inf.ScanResult) -> None:
    for f in curv.layers.values():
        assert all(q.dtype == torch.float32 for q in f.qa + f.qs)
        assert f.lam is not None and f.lam.dtype == torch.float32
    scores, expected = result.scores, ref.scores
    assert scores is not None and expected is not None
    assert scores.dtype == torch.float32
    assert _pearson(scores, expected) > 0.95
    # the best hit of every query is among the reference's top 5
    for q in range(result.n_queries):
        assert result.top(q, 1)[0].index in {h.index for h in ref.top(q, 5)}


def test_autocast_bf16(setup) -> None:
    model, task, train, queries, ref = setup
    with torch.autocast("cpu", dtype=torch.bfloat16):
        curv = inf.fit_curvature(model, task, train, fisher="empirical", progress=False)
        result = inf.scan(
            model, task, curv, queries, train, rank=None, top_k=5, keep_scores=True, tokens=True, progress=False
        )
    _check(curv, result, ref)
    hit = result.top(0, 1)[0]
    assert hit.tokens is not None and hit.tokens.dtype == torch.float32
    assert abs(float(hit.tokens.sum()) - hit.score) <= 1e-4 * abs(hit.score) + 1e-6


def test_bf16_weights(setup) -> None:
    model, task, train, queries, ref = setup
    low = copy.deepcopy(model).to(torch.bfloat16)
    curv = inf.fit_curvature(low, task, train, fisher="empirical", progress=False)
    result = inf.scan(
        low, task, curv, queries, train, rank=None, top_k=5, keep_scores=True, tokens=False, progress=False
    )
    _check(curv, result, ref)


def test_bf16_weights_true_fisher(setup) -> None:
    """Default (sampled-label) fit of a bf16 model against the fp32 model's: close, within the sampling noise."""
    model, task, train, queries, _ = setup
    scores = []
    for m in (model, copy.deepcopy(model).to(torch.bfloat16)):
        curv = inf.fit_curvature(m, task, train, progress=False)
        assert all(q.dtype == torch.float32 for f in curv.layers.values() for q in f.qa + f.qs)
        run = inf.scan(
            m, task, curv, queries, train, rank=None, top_k=5, keep_scores=True, tokens=False, progress=False
        )
        assert run.scores is not None and run.scores.dtype == torch.float32
        scores.append(run.scores)
    assert _pearson(scores[1], scores[0]) > 0.95
