"""End to end on a real pretrained LLM: SmolLM2-135M-Instruct (packaged GGUF) and 16 KJV verses.

Both tests share one fit and one exact score matrix (a module fixture): on one CPU thread each forward and
backward pass of the 135M-parameter model over the 16 verses takes ~10 s, so repeating them per test would
double the module's time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch

import influencer as inf
from influencer.data import kjv_verses, split_verse_queries, tokenize_queries, tokenize_texts
from influencer.models import load_model

pytestmark = pytest.mark.slow

LAYERS = r"model\.layers\.[0-3]\.mlp\."  # the MLPs of the first four blocks (12 layers)


@dataclass
class Fitted:
    model: Any
    tok: Any
    task: inf.CausalLM
    train: dict[str, torch.Tensor]  # 16 verses
    queries: dict[str, torch.Tensor]  # each verse's second half given its first half
    curv: inf.Curvature
    scores: inf.Scores  # exact (pairwise) EK-FAC influence [16 queries, 16 verses]


@pytest.fixture(scope="module")
def fitted() -> Fitted:
    model, tok = load_model("smollm2-135m")
    verses = [v["text"] for v in kjv_verses(16, start=100)]
    train = tokenize_texts(tok, verses)
    prompts, completions = split_verse_queries(verses)
    queries = tokenize_queries(tok, prompts, completions)
    task = inf.CausalLM(pad_token_id=tok.pad_token_id)
    curv = inf.fit_curvature(model, task, train, layers=LAYERS, batch_size=8, progress=False)
    scores = inf.pairwise_scores(model, task, curv, queries, train, batch_size=8, progress=False)
    return Fitted(model, tok, task, train, queries, curv, scores)


def test_smollm2_kjv_end_to_end(fitted: Fitted) -> None:
    model, task, train, curv, scores = fitted.model, fitted.task, fitted.train, fitted.curv, fitted.scores
    assert len(curv.layers) == 12 and curv.strategy == "ekfac" and curv.fisher == "true"
    assert all(f.damping > 0 and bool((f.lam >= 0).all()) for f in curv.layers.values())
    assert scores.total.shape == (16, 16)
    assert bool(torch.isfinite(scores.total).all())
    torch.testing.assert_close(sum(scores.per_layer.values()), scores.total, rtol=1e-5, atol=1e-4)

    ranks = (scores.total > scores.total.diagonal()[:, None]).sum(1)  # 0 = the verse ranks itself first
    first = float((ranks == 0).float().mean())
    print(
        f"\nSmolLM2-135M-Instruct, MLP of blocks 0-3, EK-FAC: a verse's second half given its first half ranks "
        f"the verse itself first for {first:.0%} of 16 verses (ranks {ranks.tolist()})"
    )
    assert first >= 0.75  # measured: 100%
    # adding a verse makes its own completion more likely
    assert bool((scores.total.diagonal() > 0).all())

    self_inf = inf.self_scores(model, task, curv, train, batch_size=8, progress=False)
    assert self_inf.shape == (16,) and bool((self_inf > 0).all())


def test_smollm2_scan_rank_curve_and_token_sums(fitted: Fitted) -> None:
    model, task, train, curv = fitted.model, fitted.task, fitted.train, fitted.curv
    nq = 8  # the first 8 queries against all 16 verses
    queries = {k: v[:nq] for k, v in fitted.queries.items()}
    exact = fitted.scores.total[:nq]
    precond = inf.preconditioned_queries(model, task, curv, queries)
    curve = {}
    for k in (1, 4, 32):
        store = inf.QueryStore.from_preconditioned(precond, k)
        r = inf.scan(
            model,
            task,
            curv,
            queries,
            train,
            store=store,
            top_k=3,
            batch_size=8,
            keep_scores=True,
            tokens=(k == 32),
            progress=False,
        )
        curve[k] = float(torch.corrcoef(torch.stack([r.scores.flatten(), exact.flatten()]))[0, 1])
    print(
        "\nSmolLM2-135M-Instruct (MLP of blocks 0-3): Pearson(rank-k scan, exact) by k:",
        ", ".join(f"{k}: {v:.4f}" for k, v in curve.items()),
    )
    assert curve[32] >= 0.99
    assert curve[1] <= curve[4] + 1e-6 <= curve[32] + 2e-6
    for q in range(nq):
        for h in r.top(q):
            assert sum(h.layers.values()) == pytest.approx(h.score, rel=1e-5)
            assert float(h.tokens.sum()) == pytest.approx(h.score, rel=1e-5, abs=1e-3)
