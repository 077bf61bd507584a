"""Which kept hits the default scan corrects for their own curvature when its budget cannot pay for all of them:
the whole pool, else the kept hits of every list, else the kept hits of the top and bottom lists (what a user
reads; the layer-band lists then keep their values), else none — never a silent partial list."""

from __future__ import annotations

import torch

from influencer.scan.shard import _correction_pool, _distinct, _rescale_hits
from influencer.scan.topk import BANDS, _State


def _state(q: int = 2, pool: int = 6, n_layers: int = 3) -> _State:
    """A state whose lists hold disjoint sequences: top 0.., bottom 100.., band b 200 + 100·b.. (pool entries)."""
    s = _State.empty(q, pool, n_layers, torch.float64)
    g = torch.Generator().manual_seed(0)

    def fill(t, base: int, largest: bool) -> None:
        idx = torch.stack([torch.arange(base + 10 * r, base + 10 * r + pool) for r in range(q)])
        vals = torch.rand(q, pool, generator=g, dtype=torch.float64) * (1 if largest else -1)
        t.update(vals, idx, torch.rand(q, pool, n_layers, generator=g, dtype=torch.float64), largest)

    fill(s.top, 0, True)
    fill(s.bottom, 100, False)
    for b, name in enumerate(BANDS):
        fill(s.bands[name], 200 + 100 * b, True)
    return s


def test_the_budget_chooses_the_largest_affordable_pool() -> None:
    s = _state()
    everything, kept, read = (len(_distinct(s, 6)), len(_distinct(s, 3)), len(_distinct(s, 3, bands=False)))
    assert (everything, kept, read) == (2 * 5 * 6, 2 * 5 * 3, 2 * 2 * 3)
    assert _correction_pool(s, 6, 3, float("inf"))[::2] == (6, "all")
    assert _correction_pool(s, 6, 3, everything)[::2] == (6, "all")
    assert _correction_pool(s, 6, 3, everything - 1)[::2] == (3, "all")
    depth, pool, lists = _correction_pool(s, 6, 3, kept - 1)
    assert (depth, lists) == (3, "top and bottom") and pool == _distinct(s, 3, bands=False)
    assert _correction_pool(s, 6, 3, read - 1) is None


def test_top_and_bottom_only_leave_the_bands_as_they_were() -> None:
    s = _state()
    _, pool, _ = _correction_pool(s, 6, 3, len(_distinct(s, 3, bands=False)))
    factors = {i: 0.5 for i in pool}
    out = _rescale_hits(s, factors, 3, 3, bands=False)
    torch.testing.assert_close(out.top.values, s.top.values[:, :3] * 0.5, rtol=0, atol=0)
    torch.testing.assert_close(out.bottom.values, s.bottom.values[:, :3] * 0.5, rtol=0, atol=0)
    for name in BANDS:  # uncorrected: the first k entries, values and layer parts unchanged
        assert torch.equal(out.bands[name].values, s.bands[name].values[:, :3])
        assert torch.equal(out.bands[name].indices, s.bands[name].indices[:, :3])
        assert torch.equal(out.bands[name].layers, s.bands[name].layers[:, :3])
    everywhere = _rescale_hits(s, {i: 0.5 for i in _distinct(s, 3)}, 3, 3)
    torch.testing.assert_close(everywhere.bands["lower"].values, s.bands["lower"].values[:, :3] * 0.5)
