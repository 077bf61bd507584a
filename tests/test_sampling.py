"""Counter-based sampling: deterministic per (seed, stream, example, position), correct distributions."""

from __future__ import annotations

import torch

from influencer import sampling


def test_uniform_is_keyed_and_uniform() -> None:
    keys = sampling.example_keys(0, 1, torch.arange(2000))
    u = sampling.uniform(keys, 8)
    assert u.shape == (2000, 8) and u.dtype == torch.float64
    assert float(u.min()) > 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01
    assert abs(float(u.var()) - 1 / 12) < 0.003
    # same example index → same numbers, whatever else is in the batch; prefixes agree across widths
    again = sampling.uniform(sampling.example_keys(0, 1, torch.tensor([1999, 5])), 3)
    assert torch.equal(again[0], u[1999, :3]) and torch.equal(again[1], u[5, :3])
    # streams and seeds are independent
    other = sampling.uniform(sampling.example_keys(0, 2, torch.arange(2000)), 8)
    assert abs(float(torch.corrcoef(torch.stack([u.flatten(), other.flatten()]))[0, 1])) < 0.03
    assert not torch.equal(sampling.uniform(sampling.example_keys(1, 1, torch.arange(5)), 4), u[:5, :4])


def test_normal_moments() -> None:
    z = sampling.normal(sampling.example_keys(3, 0, torch.arange(20000)), 2)
    assert abs(float(z.mean())) < 0.02
    assert abs(float(z.std()) - 1) < 0.02


def test_categorical_matches_probabilities() -> None:
    probs = torch.tensor([0.1, 0.6, 0.3]).expand(30000, 3)
    u = sampling.uniform(sampling.example_keys(0, 0, torch.arange(30000)), 1)[:, 0]
    draws = sampling.categorical(probs, u)
    freq = torch.bincount(draws, minlength=3).double() / 30000
    assert torch.allclose(freq, torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64), atol=0.01)
