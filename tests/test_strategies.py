"""The strategy table drives every strategy-dependent decision: its rows agree with what a fit produces."""

from __future__ import annotations

import pytest
import torch
import zoo

import influencer as inf
from influencer.curvature.strategies import TABLE, strategy


@pytest.mark.parametrize("name", list(TABLE))
def test_a_fit_follows_its_row(name: str) -> None:
    row = strategy(name)
    model = zoo.tiny_llama(hidden=8, intermediate=16, layers=1)
    curv = inf.fit_curvature(model, inf.CausalLM(), zoo.token_data(6, t=5), strategy=name, progress=False)
    assert curv.strategy == name and curv.complete
    f = next(iter(curv.layers.values()))
    assert (f.qa is not None) == row.basis  # an eigenbasis exactly when the row preconditions in one
    assert (f.lam is not None) == row.curved
    assert all(x.damping > 0 for x in curv.layers.values()) == row.curved
    v = torch.randn(3, f.d_out, f.d_in + int(f.bias), dtype=torch.float64)
    p = curv.precondition(f.name, v)
    assert torch.equal(p, v) == (not row.curved)  # identity alone leaves gradients as they are
    if row.kronecker_lambda:  # K-FAC: Λ = (T/N) eig_S ⊗ eig_A
        scale = f.tokens / curv.n_fit
        expected = scale * torch.outer(f.eig_s.clamp_min(0), f.eig_a.clamp_min(0)).to(f.lam.dtype)
        torch.testing.assert_close(f.lam, expected, rtol=1e-6, atol=0)


def test_unknown_strategy_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"identity.*diagonal.*kfac.*ekfac"):
        strategy("kfca")
    assert tuple(TABLE) == inf.curvature.STRATEGIES
