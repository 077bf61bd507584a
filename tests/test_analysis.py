"""Tail statistics and plots: α recovered on Pareto samples, x_min search vs powerlaw's own, likelihood-ratio
verdicts, top-1% share vs brute force, scan-size estimator vs Monte Carlo, degenerate inputs, figures."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("powerlaw")
pytest.importorskip("matplotlib")

from influencer.analysis import (
    PowerLawFit,
    TailStats,
    ks_xmin,
    plot_layer_profile,
    plot_layer_tokens,
    plot_tail,
    tail_stats,
    tail_stats_from_totals,
    top_count,
)
from influencer.scan import Hit

PNG = b"\x89PNG\r\n\x1a\n"


def pareto(alpha: float, n: int, xmin: float = 1.0, seed: int = 0) -> np.ndarray:
    """n draws of a continuous power law with density ∝ x^(−alpha) on [xmin, ∞)."""
    u = np.random.default_rng(seed).random(n)
    return xmin * (1.0 - u) ** (-1.0 / (alpha - 1.0))


def with_body(alpha: float, n_tail: int, n_body: int, seed: int = 0) -> np.ndarray:
    """A power-law tail above 1 mixed with a uniform body on (0, 1) and as many negative scores."""
    rng = np.random.default_rng(seed + 100)
    body = rng.random(n_body)
    negative = -rng.exponential(1.0, n_body + n_tail)
    return rng.permutation(np.concatenate([pareto(alpha, n_tail, seed=seed), body, negative]))


# --------------------------------------------------------------------------------------------------------
# Power-law fit
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [1.7, 2.5, 3.5])
def test_alpha_recovered_on_pareto_tail(alpha: float) -> None:
    """α̂ within 0.15 of the truth (its standard error is (α−1)/√n_tail, ≤ 0.06 here) and x_min inside the tail
    (≥ 1, where the power law starts) on 2000 tail draws mixed with a uniform body and negative scores."""
    x = with_body(alpha, 2000, 2000, seed=int(alpha * 10))
    s = tail_stats(x, compare=False)
    assert s.fit is not None and s.reason is None
    assert abs(s.fit.alpha - alpha) < 0.15, (s.fit.alpha, s.fit.sigma)
    assert s.fit.sigma == pytest.approx((s.fit.alpha - 1) / math.sqrt(s.fit.n_tail), rel=1e-6)
    assert s.fit.xmin >= 0.95 and s.fit.n_tail >= 100
    assert s.fit.n == x.size and s.fit.n_tail == int((x >= s.fit.xmin).sum())
    assert s.n_positive == int((x > 0).sum())
    assert 0 < s.fit.ks < 0.05
    # with x_min given, α̂ is the closed-form continuous MLE 1 + m / Σ ln(x / x_min)
    g = tail_stats(x, xmin=1.0, compare=False)
    tail = x[x >= 1.0]
    assert g.fit is not None and g.fit.xmin_source == "given"
    assert g.fit.alpha == pytest.approx(1 + tail.size / np.log(tail).sum(), rel=1e-6)


def test_ks_xmin_matches_powerlaw_search() -> None:
    """The vectorised Clauset search reaches the KS distance of powerlaw's own per-candidate search."""
    import powerlaw

    x = with_body(2.2, 250, 150, seed=7)
    pos = np.sort(x[x > 0])[::-1]
    mine = ks_xmin(pos, min_tail=2, max_tail=pos.size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = powerlaw.Fit(pos, verbose=0, parameter_ranges={"alpha": [1, None]})
        d_ref = float(ref.power_law.D)
        d_mine = float(powerlaw.Fit(pos, xmin=mine, verbose=0, parameter_ranges={"alpha": [1, None]}).power_law.D)
    assert d_mine <= d_ref + 2e-3, (mine, float(ref.xmin), d_mine, d_ref)
    assert mine == pytest.approx(float(ref.xmin), rel=0.25)


def test_likelihood_ratio_verdicts() -> None:
    """On Pareto data the exponential is rejected; on exponential data the power law loses to it."""
    s = tail_stats(pareto(2.5, 3000, seed=1))
    assert s.fit is not None and set(s.fit.comparisons) == {"lognormal", "exponential", "truncated_power_law"}
    exp = s.fit.comparisons["exponential"]
    assert exp.ratio > 0 and exp.p < 0.1 and exp.favours == "power_law"
    assert s.fit.comparisons["truncated_power_law"].nested
    e = tail_stats(np.random.default_rng(2).exponential(1.0, 3000), xmin=0.5)
    assert e.fit is not None
    c = e.fit.comparisons["exponential"]
    assert c.ratio < 0 and c.p < 0.1 and c.favours == "exponential"
    json.dumps(s.to_dict(), allow_nan=False)


# --------------------------------------------------------------------------------------------------------
# Concentration: top-1% share
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 99, 100, 1234])
def test_top_share_equals_brute_force(n: int) -> None:
    rng = np.random.default_rng(n)
    x = rng.standard_t(2.0, n)
    scores = torch.tensor(np.concatenate([x, [np.nan] * 3]))  # NaN: pairs a prefilter skipped
    s = tail_stats(scores, compare=False)
    k = math.ceil(n / 100)
    brute = sum(sorted((v for v in x.tolist()), reverse=True)[:k], 0.0)
    brute_pos = sum(max(v, 0.0) for v in sorted(x.tolist(), reverse=True)[:k])
    pos_total = sum(max(v, 0.0) for v in x.tolist())
    assert s.n == n and s.top_count == k == top_count(n, 0.01)
    assert s.total == pytest.approx(float(x.sum()))
    assert s.positive_total == pytest.approx(pos_total)
    if pos_total > 0:
        assert s.top_share == pytest.approx(brute_pos / pos_total, rel=1e-12)
        assert brute <= brute_pos + 1e-12
    # from running totals: the same share when the kept hits cover the top 1 %, else None with a reason
    totals = {"count": n, "sum": float(x.sum()), "positive_sum": pos_total}
    hits = sorted(x.tolist(), reverse=True)[: max(k, 10)]
    t = tail_stats_from_totals(totals, hits, compare=False)
    assert t.source == "totals" and t.n_positive is None
    if pos_total > 0:
        assert t.top_share == pytest.approx(s.top_share, rel=1e-12)
    if k > 1:
        few = tail_stats_from_totals(totals, hits[: k - 1], compare=False)
        assert few.top_share is None and any("keep_scores=True" in note for note in few.notes)


# --------------------------------------------------------------------------------------------------------
# Scan-size estimator
# --------------------------------------------------------------------------------------------------------


def _mixture(fit: PowerLawFit, trials: int, m: int, rng: np.random.Generator) -> np.ndarray:
    """Max score of ``trials`` scans of m sequences: a sequence is in the tail w.p. ρ, else below xmin."""
    in_tail = rng.random((trials, m)) < fit.tail_rate
    u = rng.random((trials, m))
    tail = fit.xmin * (1.0 - u) ** (-1.0 / (fit.alpha - 1.0))
    return np.where(in_tail, tail, fit.xmin * 0.5 * u).max(1)


def test_scan_size_against_monte_carlo() -> None:
    """M(x, c) sequences find a score ≥ x with probability c; top_score(m) is the median max of m sequences."""
    fit = PowerLawFit(alpha=2.5, sigma=0.0, xmin=1.0, n_tail=50, n=1000, ks=0.0, xmin_source="given")
    rng = np.random.default_rng(0)
    x = 10.0
    q = fit.exceedance(x)
    assert q == pytest.approx(0.05 * 10.0**-1.5)
    for c in (0.5, 0.9):
        m = fit.scan_size(x, c)
        assert 1 - (1 - q) ** m == pytest.approx(c, rel=1e-9)
        hit_rate = float((_mixture(fit, 2000, round(m), rng) >= x).mean())
        assert hit_rate == pytest.approx(c, abs=0.03), (c, m, hit_rate)
    for m in (200, 1000):
        median = fit.top_score(m)
        assert median is not None
        sims = _mixture(fit, 2000, m, rng)
        assert float(np.median(sims)) == pytest.approx(median, rel=0.08)
        assert float((sims < median).mean()) == pytest.approx(0.5, abs=0.03)
    assert fit.top_score(5) is None  # the median max of 5 sequences lies below xmin: outside the model
    with pytest.raises(ValueError, match="xmin"):
        fit.exceedance(0.5)


def test_scan_size_from_fitted_sample() -> None:
    """Fitted on one scan, the estimator predicts what a fresh, larger scan finds."""
    true = PowerLawFit(alpha=2.5, sigma=0.0, xmin=1.0, n_tail=500, n=5000, ks=0.0, xmin_source="given")
    rng = np.random.default_rng(3)
    sample = np.where(rng.random(5000) < 0.1, pareto(2.5, 5000, seed=4), rng.random(5000) * 0.9)
    s = tail_stats(sample, compare=False)
    assert s.fit is not None
    x = 30.0
    assert s.fit.scan_size(x) == pytest.approx(true.scan_size(x), rel=0.35)
    # the observed top hit needs ≈ ln 2 · n / (tail fraction of the exceedance) sequences: same order as n
    assert 0.05 * s.n < s.scan_size() < 20 * s.n


def test_fraction_holding_share() -> None:
    """For a pure Pareto(α = 3) sample the top fraction holding half the total is 0.25 (share = u^((α−2)/(α−1)))."""
    x = pareto(3.0, 40000, seed=5)
    s = tail_stats(x, xmin=1.0, compare=False)
    model = s.fraction_holding(0.5)
    assert model is not None and model == pytest.approx(0.25, rel=0.2)
    srt = np.sort(x)[::-1]
    empirical = (np.searchsorted(np.cumsum(srt) / srt.sum(), 0.5) + 1) / x.size
    assert model == pytest.approx(empirical, rel=0.25)
    heavy = tail_stats(pareto(1.8, 3000, seed=6), xmin=1.0, compare=False)
    assert heavy.fraction_holding(0.5) is None  # α ≤ 2: no fixed fraction (the tail has no mean)


# --------------------------------------------------------------------------------------------------------
# Degenerate inputs
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scores", "reason"),
    [
        ([], "only 0 positive"),
        ([-1.0, -2.0, -3.0], "only 0 positive"),
        ([1.0, 2.0, 3.0, -1.0], "only 3 positive"),
        ([2.0] * 40, "all equal"),
        ([float("nan")] * 5, "only 0 positive"),
    ],
)
def test_degenerate_inputs_give_reasons(scores, reason: str) -> None:
    s = tail_stats(np.array(scores, dtype=np.float64))
    assert isinstance(s, TailStats) and s.fit is None and reason in (s.reason or "")
    assert s.scan_size() is None and s.fraction_holding(0.5) is None
    json.dumps(s.to_dict(), allow_nan=False)


def test_degenerate_given_xmin_and_totals() -> None:
    s = tail_stats(pareto(2.5, 100), xmin=1e6)
    assert s.fit is None and "≥ xmin" in (s.reason or "")
    t = tail_stats_from_totals({"count": 500, "sum": 3.0, "positive_sum": 10.0}, [4.0, 2.0, -1.0])
    assert t.fit is None and "keep_scores=True" in (t.reason or "") and t.top_share is None
    t = tail_stats_from_totals({"count": 0, "sum": 0.0, "positive_sum": 0.0})
    assert t.fit is None and t.top_share is None and t.max_score is None
    with pytest.raises(ValueError, match="1-D"):
        tail_stats(np.zeros((2, 3)))


def test_import_is_lazy_and_names_the_extra(monkeypatch) -> None:
    code = (
        "import sys, influencer, influencer.analysis, influencer.report; "
        "print([m for m in ('jinja2', 'matplotlib', 'powerlaw') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
    monkeypatch.setitem(sys.modules, "powerlaw", None)
    with pytest.raises(ImportError, match=r"influencer\[report\]"):
        tail_stats(pareto(2.5, 100))


# --------------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------------


def test_figures(tmp_path) -> None:
    from matplotlib.figure import Figure

    x = with_body(2.5, 300, 300)
    s = tail_stats(x, compare=False)
    fig = plot_tail(x, s.fit, save=tmp_path / "tail.png")
    assert isinstance(fig, Figure) and (tmp_path / "tail.png").read_bytes()[:8] == PNG
    names = ["a.0.mlp", "a.1.mlp", "a.2.mlp"]
    lt = torch.tensor([[0.5, -0.2, 0.1, 0.0], [0.3, 0.1, -0.4, 0.2], [-0.1, 0.0, 0.6, 0.1]], dtype=torch.float64)
    hit = Hit(
        0, 7, float(lt.sum()), float(lt.sum()) / 10, dict(zip(names, lt.sum(1).tolist(), strict=True)), lt.sum(0), lt
    )
    fig = plot_layer_profile([hit, hit], names, save=tmp_path / "layers.png")
    assert fig.axes[0].get_yscale() == "linear"  # comparable hits: a linear axis
    big = Hit(0, 8, 1e4, 1e3, {n: 1e4 / 3 for n in names})
    fig = plot_layer_profile([big, hit], names)
    ax = fig.axes[0]
    assert ax.get_yscale() == "symlog"  # one hit 10⁴× the other would flatten it on a linear axis (> 8×: symlog)
    legend = ax.get_legend()
    fig.canvas.draw()
    box, axes_box = legend.get_window_extent(), ax.get_window_extent()
    assert box.x0 >= axes_box.x1 - 1  # the legend sits beside the axes, never over the lines
    tokens = ["$x$", "<script>", "\n", "50% $"]  # no mathtext, no crash on odd strings
    fig = plot_layer_tokens(hit, names, tokens, save=tmp_path / "heat.png")
    assert (tmp_path / "heat.png").read_bytes()[:8] == PNG
    image = fig.axes[0].images[0]
    lo, hi = image.get_clim()
    assert lo == pytest.approx(-0.6) and hi == pytest.approx(0.6)  # centred at 0
    with pytest.raises(ValueError, match="tokens=False"):
        plot_layer_tokens(Hit(0, 1, 1.0, 0.1, {}), names)


def test_tail_plot_thins_large_inputs() -> None:
    x = np.concatenate([pareto(2.0, 50_000, seed=8), -pareto(3.0, 20_000, seed=9)])
    fig = plot_tail(x)
    lines = fig.axes[0].get_lines()
    neg, pos = lines[0].get_xdata(), lines[1].get_xdata()
    assert 1000 < len(pos) <= 3000 and pos[0] == 1 and pos[-1] == 50_000 and len(neg) <= 3000
    ys = lines[1].get_ydata()
    assert np.all(np.diff(ys) <= 0) and ys[0] == x.max()
