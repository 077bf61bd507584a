"""The records of a tail analysis: :class:`Comparison` (a likelihood-ratio test of the power law against one
alternative), :class:`PowerLawFit` (the fitted tail with its scan-size estimators: exceedance probability,
sequences to scan, expected top score, rank curve) and :class:`TailStats` (one query's totals, top-fraction share
and fit, with the share estimator), each with a JSON-ready ``to_dict``; :mod:`influencer.analysis.tails` derives
the formulas and builds these records from scores.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

#: significance level under which a likelihood-ratio test's sign is taken as meaningful (Clauset et al. use 0.1)
SIGNIFICANCE = 0.1


@dataclass(frozen=True)
class Comparison:
    """Log-likelihood ratio test of the power law against one alternative, on the same tail.

    ratio: R = Σ log p_powerlaw(x) − Σ log p_alternative(x) over the tail (> 0 favours the power law);
    p: significance of the sign of R (Vuong's test; the nested form for the truncated power law).
    """

    alternative: str
    ratio: float
    p: float
    nested: bool

    @property
    def favours(self) -> str:
        """ "power_law", the alternative's name, or "neither" (p ≥ 0.1)."""
        if not (self.p < SIGNIFICANCE):
            return "neither"
        return "power_law" if self.ratio > 0 else self.alternative

    def to_dict(self) -> dict[str, Any]:
        return {**_clean(asdict(self)), "favours": self.favours}


@dataclass(frozen=True)
class PowerLawFit:
    """A power law fitted to the positive tail: p(x) ∝ x^(−α) for x ≥ xmin (scores in raw influence units).

    sigma: standard error of α; n_tail: scores ≥ xmin; n: scored sequences the tail is a part of (all signs);
    ks: Kolmogorov–Smirnov distance between the tail's empirical CDF and the fit; xmin_source: "fitted" (KS
    criterion), "given", or "hits" (the smallest kept top-k hit, when only the scan's hits are known).
    """

    alpha: float
    sigma: float
    xmin: float
    n_tail: int
    n: int
    ks: float
    xmin_source: str
    comparisons: dict[str, Comparison] = field(default_factory=dict)

    @property
    def tail_rate(self) -> float:
        """ρ = n_tail / n: probability that a scored sequence lies in the tail."""
        return self.n_tail / self.n

    def exceedance(self, score: float) -> float:
        """q(x) = ρ (x/xmin)^(1−α): probability that one sequence has influence ≥ ``score`` (≥ xmin)."""
        if not score >= self.xmin:
            raise ValueError(f"the power law describes scores ≥ xmin = {self.xmin:.6g}, got {score:.6g}")
        return self.tail_rate * (score / self.xmin) ** (1.0 - self.alpha)

    def scan_size(self, score: float, confidence: float = 0.5) -> float:
        """Sequences to scan (uniformly drawn) to meet at least one with influence ≥ ``score`` with probability
        ``confidence``: M = ln(1 − c) / ln(1 − q(score))."""
        if not 0.0 < confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {confidence}")
        q = self.exceedance(score)
        if q >= 1.0:
            return 1.0
        return math.log1p(-confidence) / math.log1p(-q)

    def top_score(self, m: float, quantile: float = 0.5) -> float | None:
        """The ``quantile`` of the largest score in a scan of ``m`` sequences; None when it falls below xmin
        (outside the fitted tail)."""
        if m < 1 or not 0.0 < quantile < 1.0:
            raise ValueError(f"need m ≥ 1 and quantile in (0, 1), got m={m}, quantile={quantile}")
        q = -math.expm1(math.log(quantile) / m)  # 1 − quantile^(1/m)
        if q > self.tail_rate:
            return None
        return self.xmin * (self.tail_rate / q) ** (1.0 / (self.alpha - 1.0))

    def rank_curve(self, ranks: np.ndarray) -> np.ndarray:
        """Score expected at each rank k ≤ n_tail (1 = largest): xmin · (k / n_tail)^(−1/(α−1))."""
        return self.xmin * (np.asarray(ranks, dtype=np.float64) / self.n_tail) ** (-1.0 / (self.alpha - 1.0))

    def to_dict(self) -> dict[str, Any]:
        d = _clean({k: v for k, v in asdict(self).items() if k != "comparisons"})
        d["tail_rate"] = self.tail_rate
        d["comparisons"] = {k: c.to_dict() for k, c in self.comparisons.items()}
        return d


@dataclass(frozen=True)
class TailStats:
    """Tail statistics of one query's influence scores.

    source: "scores" (the full score vector) or "totals" (running totals and the kept hits only).
    n: scored sequences; total: Σ I; positive_total: T⁺ = Σ max(I, 0); n_positive: scores > 0 (None from totals);
    max_score: the largest score; top_share: share of T⁺ held by the top ``top_count`` = ⌈top_fraction · n⌉
    sequences (None when those scores are unknown); fit: the power law, or None with ``reason``; notes: what
    could not be computed and why.
    """

    source: str
    n: int
    total: float
    positive_total: float
    n_positive: int | None
    max_score: float | None
    top_fraction: float
    top_count: int
    top_share: float | None
    fit: PowerLawFit | None
    reason: str | None = None
    notes: tuple[str, ...] = ()

    def scan_size(self, score: float | None = None, confidence: float = 0.5) -> float | None:
        """Sequences to scan to meet one with influence ≥ ``score`` (default: the observed top score, i.e. to find
        the top hit) with probability ``confidence``; None without a fit or for a score below xmin."""
        score = self.max_score if score is None else score
        if self.fit is None or score is None or not score >= self.fit.xmin:
            return None
        return self.fit.scan_size(score, confidence)

    def fraction_holding(self, share: float) -> float | None:
        """Model estimate of the top fraction of sequences that holds ``share`` of the positive influence T⁺
        (item 3 of the notes in :mod:`influencer.analysis.tails`); None when α ≤ 2, T⁺ ≤ 0 or ``share``
        exceeds the tail's share s₀."""
        if not 0.0 < share <= 1.0:
            raise ValueError(f"share must be in (0, 1], got {share}")
        f = self.fit
        if f is None or f.alpha <= 2.0 or not self.positive_total > 0:
            return None
        s0 = f.n_tail * f.xmin * (f.alpha - 1.0) / ((f.alpha - 2.0) * self.positive_total)
        if share > s0:
            return None
        return f.tail_rate * (share / s0) ** ((f.alpha - 1.0) / (f.alpha - 2.0))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (NaN → None), with the scan-size estimates for the top hit and a 50 % share."""
        d = _clean({k: v for k, v in asdict(self).items() if k not in ("fit", "notes")})
        d["notes"] = list(self.notes)
        d["fit"] = None if self.fit is None else self.fit.to_dict()
        d["scan_size_top_hit"] = self.scan_size()
        d["fraction_holding_half"] = self.fraction_holding(0.5)
        return d


def _clean(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}
