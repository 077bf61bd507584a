"""EK-FAC and K-FAC against exact damped Gauss-Newton influence (dense GNH from per-example Jacobians).

Both approximations are block-diagonal across layers and see one sampled label per position; the exact
reference is the full GNH with the same per-layer damping. The training sets are tiny (128 / 32 examples), so the
fits use every example 8 times with independent label draws (n_train stays the true N) to keep the Monte-Carlo
noise of the true Fisher from dominating. Floors are the measured values (seeded, deterministic) minus 0.03.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import reference as ref
import torch
import zoo

import influencer as inf

REPEATS = 8


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def _trained(model: torch.nn.Module, task: inf.Task, x: torch.Tensor, y: torch.Tensor, steps: int) -> torch.nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        task.train_loss(model(x), (x, y)).mean().backward()
        opt.step()
    return model.eval()


def _repeat(train, times: int):
    if isinstance(train, tuple):
        return tuple(t.repeat(times, *[1] * (t.dim() - 1)) for t in train)
    return train.repeat(times, 1)


def _regression():
    x, noise = zoo.regression_data(128, d_in=6, d_out=2)
    y = torch.sin(x[:, :2]) + 0.1 * noise
    model = _trained(zoo.mlp(d_in=6, hidden=16, d_out=2), inf.Regression(), x, y, steps=300)
    return model, inf.Regression(), (x, y), (x[:8] + 0.05, y[:8])


def _classification():
    x, _ = zoo.classification_data(128, d_in=6)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    model = _trained(zoo.mlp(d_in=6, hidden=16, d_out=3), inf.Classification(), x, y, steps=30)
    return model, inf.Classification(), (x, y), (x[:8] + 0.05, y[:8])


def _causal_lm():
    model = zoo.tiny_llama(vocab=32, hidden=16, intermediate=32, layers=2)
    queries = {"input_ids": zoo.token_data(6, t=8, vocab=32, seed=10), "prompt_length": 4}
    return model, inf.CausalLM(), zoo.token_data(32, t=8, vocab=32), queries


# measured Pearson vs the full exact GNH influence: (EK-FAC, K-FAC)
CASES = {
    "mlp-regression": (_regression, 0.791, 0.788),
    "mlp-classification": (_classification, 0.937, 0.929),
    "llama-2-layer": (_causal_lm, 0.688, 0.677),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ekfac_and_kfac_track_exact_gnh_influence(case: str) -> None:
    build, ek_measured, kf_measured = CASES[case]
    model, task, train, queries = build()
    n = len(task.as_dataset(train))
    fit_data = _repeat(train, REPEATS)
    ekfac = inf.fit_curvature(model, task, fit_data, strategy="ekfac", n_train=n, progress=False)
    kfac = inf.fit_curvature(model, task, fit_data, strategy="kfac", n_train=n, progress=False)
    damping = {name: f.damping for name, f in ekfac.layers.items()}
    kfac = replace(kfac, layers={name: replace(f, damping=damping[name]) for name, f in kfac.layers.items()})
    identity = inf.fit_curvature(model, task, train, strategy="identity", progress=False)

    names = ekfac.layer_names
    gnh = ref.dense_gnh(model, task, train, names)
    exact = ref.exact_influence(model, task, queries, train, names, damping=damping, curvature=gnh)
    shapes = ref.layer_matrix_shapes(model, names)
    exact_bd = ref.exact_influence(
        model, task, queries, train, names, damping=damping, curvature=ref.block_diagonal(gnh, shapes)
    )
    got = {
        s: inf.pairwise_scores(model, task, c, queries, train, progress=False).total
        for s, c in (("ekfac", ekfac), ("kfac", kfac), ("identity", identity))
    }
    r = {s: _pearson(v, exact) for s, v in got.items()}
    r_bd = {s: _pearson(v, exact_bd) for s, v in got.items()}
    print(
        f"\n{case}: Pearson vs exact damped GNH influence — "
        + ", ".join(f"{s} {r[s]:.3f}" for s in r)
        + " | vs its block-diagonal part — "
        + ", ".join(f"{s} {r_bd[s]:.3f}" for s in r_bd)
    )
    # magnitude, not only direction: the least-squares ratio of EK-FAC to exact influence (measured 2.6 / 3.2 /
    # 1.2 for the three cases; a block-diagonal inverse ignores cross-layer curvature, so it overshoots)
    ratio = float((got["ekfac"] * exact).sum() / exact.pow(2).sum())
    print(f"{case}: least-squares ratio EK-FAC / exact influence {ratio:.2f}")
    assert 0.5 <= ratio <= 4.0
    assert r["ekfac"] >= ek_measured - 0.03
    assert r["kfac"] >= kf_measured - 0.03
    assert r["ekfac"] >= r["kfac"]
    assert r["ekfac"] >= r["identity"] + 0.1
