"""Tail statistics of one query's influence scores (paper §5.2): power-law fit, model comparisons, concentration of
influence, and scan-size estimates.

**Model.** Following the paper (§5.2.1, after Clauset, Shalizi and Newman 2009), the *positive* influence scores x
above a threshold x_min follow a continuous power law with density

    p(x) = (α − 1)/x_min · (x/x_min)^(−α),   x ≥ x_min,   so   P(X ≥ x | X ≥ x_min) = (x/x_min)^(1−α).

x_min is chosen by the Kolmogorov–Smirnov criterion of Clauset et al. among the largest scores (:func:`ks_xmin`), or
given; at that x_min the ``powerlaw`` package fits α by maximum likelihood and compares the power law by
log-likelihood ratios with a lognormal, an exponential and a truncated power law fitted to the same tail.

**Scan-size estimator** (the extrapolation argument of §5.2.1–5.2.2: fit the tail on a modest unfiltered scan, then
extrapolate how likely highly influential sequences are). Of the n scored sequences, n_tail lie in the tail, so a
uniformly drawn sequence has influence ≥ x (x ≥ x_min) with probability

    q(x) = ρ · (x/x_min)^(1−α),   ρ = n_tail / n.

1. *Sequences to scan to find one hit ≥ x* with probability c: 1 − (1 − q)^M = c, so
   M(x, c) = ln(1 − c) / ln(1 − q(x)) ≈ ln(1/(1 − c)) / q(x). With x the observed top score this says how many
   sequences a scan needs to find a hit as influential as the top hit (≈ ln 2 · n for the median when the fit is
   good, a useful self-check).
2. *Top score of a scan of m sequences* (its c-quantile): P(max < x) = (1 − q(x))^m = c gives
   x = x_min · (ρ / (1 − c^(1/m)))^(1/(α−1)); scanning k times more sequences raises the top score by k^(1/(α−1)).
3. *Share of the total positive influence held by the most influential sequences* (α > 2, where the tail has a
   mean): sequences with influence ≥ x are a fraction q(x) of all and hold, per scored sequence,
   ρ · x_min · (α−1)/(α−2) · (x/x_min)^(2−α). Dividing by the observed mean positive influence μ = T⁺/n gives the
   share s(x) = s₀ · (q/ρ)^((α−2)/(α−1)) with s₀ = n_tail · x_min · (α−1) / ((α−2) · T⁺) (the tail's share), so
   the top fraction holding a share φ ≤ s₀ is q_φ = ρ · (φ/s₀)^((α−1)/(α−2)). For α ≤ 2 the tail has no mean: the
   share held by the top sequences keeps growing with the size of the corpus and no fixed fraction can be given.

A uniformly random scan of M of N sequences holds on average M/N of the total influence whatever the tail, so
capturing a share φ by random scanning needs M ≈ φ·N; the heavy tail decides how few sequences (q_φ · N) hold that
share, i.e. what a perfect prefilter would have to return, and how fast the top score grows with M (item 2).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from influencer.analysis._optional import require
from influencer.analysis.tail_results import SIGNIFICANCE as SIGNIFICANCE
from influencer.analysis.tail_results import Comparison, PowerLawFit, TailStats

if TYPE_CHECKING:
    from influencer.scan import ScanResult

ALTERNATIVES = ("lognormal", "exponential", "truncated_power_law")


# --------------------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------------------


def tail_stats(
    scores: Any,
    *,
    xmin: float | None = None,
    top_fraction: float = 0.01,
    min_tail: int = 10,
    max_tail: int = 2000,
    compare: bool = True,
) -> TailStats:
    """Tail statistics of a 1-D score vector (tensor or array [N]; NaN entries, e.g. pairs a prefilter skipped,
    are dropped).

    xmin: the tail threshold (default: KS-optimal among the ``max_tail`` largest positive scores, keeping at
    least ``min_tail`` in the tail). top_fraction: the share of sequences whose influence share is reported
    (0.01: the top 1 %). compare: run the likelihood-ratio tests (about a second, most of it the truncated power law).
    """
    _check_fraction(top_fraction)
    x = _as_array(scores)
    n = int(x.size)
    positive = x[x > 0]
    pos_total = float(positive.sum())
    k = top_count(n, top_fraction)
    notes: list[str] = []
    top_share = None
    if n and pos_total > 0:
        top = np.sort(x)[::-1][:k]
        top_share = float(np.clip(top, 0, None).sum() / pos_total)
    elif n:
        notes.append("no positive influence: shares of the positive total are undefined")
    fit, reason = _fit_power_law(
        positive, n, xmin, "given" if xmin is not None else "fitted", min_tail, max_tail, compare
    )
    return TailStats(
        "scores",
        n,
        float(x.sum()),
        pos_total,
        int(positive.size),
        float(x.max()) if n else None,
        top_fraction,
        k,
        top_share,
        fit,
        reason,
        tuple(notes),
    )


def tail_stats_from_totals(
    stats: Mapping[str, float],
    top_scores: Sequence[float] = (),
    *,
    top_fraction: float = 0.01,
    min_tail: int = 10,
    compare: bool = True,
) -> TailStats:
    """What can be said from a scan's running totals (``ScanResult.stats(q)``: count, sum, positive_sum) and its
    kept top hits' scores (largest first), without the full scores.

    The top-fraction share needs the ⌈top_fraction · n⌉ largest scores: given when enough hits were kept, else None.
    The power law is fitted on the positive kept hits with xmin = the smallest of them (the Hill estimator on the top
    order statistics) when there are at least ``min_tail``.
    """
    _check_fraction(top_fraction)
    n = int(stats["count"])
    pos_total = float(stats["positive_sum"])
    hits = np.sort(_as_array(top_scores))[::-1]
    k = top_count(n, top_fraction)
    notes = []
    top_share = None
    if not pos_total > 0:
        notes.append("no positive influence: shares of the positive total are undefined")
    elif hits.size >= k:
        top_share = float(np.clip(hits[:k], 0, None).sum() / pos_total)
    else:
        notes.append(
            f"the top {top_fraction:.0%} share needs the {k} largest scores: keep full scores "
            f"(keep_scores=True) or scan with top_k ≥ {k}"
        )
    positive = hits[hits > 0]
    if positive.size >= min_tail:
        fit, reason = _fit_power_law(positive, n, float(positive.min()), "hits", min_tail, min_tail, compare)
        notes.append(f"power law fitted on the {positive.size} kept top hits only (xmin = the smallest of them)")
    else:
        fit, reason = (
            None,
            (
                f"full scores were not kept and only {positive.size} positive hits are known; "
                f"a tail fit needs at least {min_tail} (scan with keep_scores=True)"
            ),
        )
    return TailStats(
        "totals",
        n,
        float(stats["sum"]),
        pos_total,
        None,
        float(hits[0]) if hits.size else None,
        top_fraction,
        k,
        top_share,
        fit,
        reason,
        tuple(notes),
    )


def query_tail_stats(result: ScanResult, query: int, *, scores: Any = None, **kwargs: Any) -> TailStats:
    """Tail statistics of one query of a scan: from its full scores when it kept them (or ``scores`` [N] is
    given), else from its running totals and hits. Keyword arguments go to the builder."""
    if scores is None:
        full = result.scores
        scores = None if full is None else full[query]
    if scores is not None:
        return tail_stats(scores, **kwargs)
    kwargs.pop("xmin", None)
    kwargs.pop("max_tail", None)
    hits = [h.score for h in result.top(query)]
    return tail_stats_from_totals(result.stats(query), hits, **kwargs)


def top_count(n: int, fraction: float) -> int:
    """⌈fraction · n⌉ sequences (at least 1 when n ≥ 1)."""
    return min(n, max(1, math.ceil(fraction * n - 1e-9))) if n else 0


# --------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------


def _fit_power_law(
    positive: np.ndarray, n: int, xmin: float | None, source: str, min_tail: int, max_tail: int, compare: bool
) -> tuple[PowerLawFit | None, str | None]:
    """Fit on positive scores [P] (the rest of the n scored sequences lie below); (fit, None) or (None, reason)."""
    if min_tail < 2:
        raise ValueError(f"min_tail must be ≥ 2, got {min_tail}")
    if positive.size < min_tail:
        return None, f"only {positive.size} positive scores; a power-law fit needs at least {min_tail}"
    srt = np.sort(positive)[::-1]
    if xmin is not None:
        if not xmin > 0:
            raise ValueError(f"xmin must be positive, got {xmin}")
        if int((positive >= xmin).sum()) < min_tail:
            return None, f"fewer than {min_tail} positive scores are ≥ xmin = {xmin:.6g}"
    else:
        xmin = ks_xmin(srt, min_tail, max_tail)
        if xmin is None:
            return None, "the largest positive scores are all equal; a power law cannot be fitted"
    if np.unique(srt[srt >= xmin]).size < 2:
        return None, "the tail's scores are all equal; a power law cannot be fitted"
    powerlaw = require("powerlaw")
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        try:
            # powerlaw ≥ 2 caps α at 3 by default; influence tails can be steeper
            fit = powerlaw.Fit(positive, xmin=float(xmin), verbose=0, parameter_ranges={"alpha": [1, None]})
            pl = fit.power_law
            alpha, sigma, ks, x0 = float(pl.alpha), float(pl.sigma), float(pl.D), float(fit.xmin)
        except Exception as err:  # a numerical failure inside powerlaw: report it, never crash a report
            return None, f"the power-law fit failed: {type(err).__name__}: {err}"
        if not (math.isfinite(alpha) and alpha > 1.0 and math.isfinite(x0) and x0 > 0):
            return None, f"the power-law fit gave no usable exponent (α = {alpha:.4g}, xmin = {x0:.4g})"
        comparisons = {}
        for alt in ALTERNATIVES if compare else ():
            nested = alt == "truncated_power_law"
            try:
                ratio, p = fit.distribution_compare("power_law", alt, nested=nested)
            except Exception:  # the alternative could not be fitted; leave it out
                continue
            if math.isfinite(float(ratio)) and math.isfinite(float(p)):
                comparisons[alt] = Comparison(alt, float(ratio), float(p), nested)
    n_tail = int((positive >= x0).sum())
    return PowerLawFit(alpha, sigma, x0, n_tail, n, ks, source, comparisons), None


def ks_xmin(descending: np.ndarray, min_tail: int = 10, max_tail: int = 2000) -> float | None:
    """Clauset et al.'s x_min: the candidate minimising the KS distance between the tail and its fitted power law.

    descending: positive scores sorted largest first [P]. Candidates are the j-th largest scores for
    j = min_tail … min(P, max_tail); for each, α̂ = 1 + m / Σ ln(x_i / x_min) over the m tail scores (the continuous
    MLE) and D = max_i |F_emp(x_i) − (1 − (x_i/x_min)^(1−α̂))|. Vectorised (O(max_tail²) in blocks), which is much
    faster than refitting per candidate. None when every candidate's tail is constant.
    """
    s = np.asarray(descending, dtype=np.float64)
    top = min(s.size, max(max_tail, min_tail))
    if top < min_tail:
        return None
    s = s[:top]
    logs = np.log(s)
    m = np.arange(1, top + 1, dtype=np.float64)  # tail size when x_min = s[j]
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = 1.0 + m / (np.cumsum(logs) - m * logs)
    best, best_d = None, np.inf
    cols = np.arange(top)
    with np.errstate(all="ignore"):  # constant tails give α̂ = inf / nan; they get D = inf below
        for start in range(min_tail - 1, top, 256):
            rows = np.arange(start, min(top, start + 256))
            a = alpha[rows, None]
            ratio = logs[None, :] - logs[rows, None]  # ln(x_i / x_min) ≥ 0 on the tail
            model = -np.expm1((1.0 - a) * ratio)  # theoretical CDF at x_i
            rank = (rows[:, None] - cols[None, :] + 1).astype(np.float64)  # ascending rank of x_i in the tail
            size = m[rows, None]
            d = np.maximum(np.abs(rank / size - model), np.abs((rank - 1.0) / size - model))
            d = np.where(cols[None, :] <= rows[:, None], d, 0.0).max(1)
            d[~np.isfinite(alpha[rows]) | np.isnan(d)] = np.inf
            j = int(np.argmin(d))
            if d[j] < best_d:
                best, best_d = float(s[rows[j]]), float(d[j])
    return best


def _as_array(scores: Any) -> np.ndarray:
    """Any 1-D tensor / array / sequence → float64 numpy [N] without NaN."""
    if hasattr(scores, "detach"):
        scores = scores.detach().cpu().double().numpy()
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"scores must be 1-D (one query's scores), got shape {tuple(x.shape)}")
    return x[~np.isnan(x)]


def _check_fraction(fraction: float) -> None:
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"top_fraction must be in (0, 1], got {fraction}")
