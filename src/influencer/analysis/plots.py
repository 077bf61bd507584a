"""Figures for a scan (matplotlib, Agg canvas, no pyplot state): the sorted influence with its power-law fit, the
layer profile of a query's hits, and the layer × token heatmap of one hit (paper Fig. 4).

Every function returns a :class:`matplotlib.figure.Figure` and, with ``save=path``, also writes it as PNG.
Red is positive influence (helpful), blue negative, in every figure and in the HTML report. Text from data (token
strings, layer names) is drawn literally (no mathtext).
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from influencer.analysis._optional import require
from influencer.analysis.tails import PowerLawFit

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from influencer.scan import Hit

POSITIVE = "#c62828"
NEGATIVE = "#1565c0"
#: diverging colormap for signed influence: blue (negative) – white (0) – red (positive)
CMAP = "RdBu_r"
#: token labels are drawn on the heatmap's x axis up to this many tokens
MAX_TOKEN_LABELS = 64


def _figure(width: float, height: float) -> Figure:
    require("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _finish(fig: Figure, save: str | os.PathLike | None, dpi: int) -> Figure:
    if save is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # missing glyphs of exotic token strings
            fig.savefig(os.fspath(save), format="png", dpi=dpi)
    return fig


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def plot_tail(
    scores: Any,
    fit: PowerLawFit | None = None,
    *,
    title: str | None = None,
    save: str | os.PathLike | None = None,
    dpi: int = 100,
) -> Figure:
    """Rank–size plot on log-log axes: the positive scores [N] sorted largest first against their rank, the
    magnitudes of the negative scores in grey, and the fitted power law x(k) = xmin (k / n_tail)^(−1/(α−1)) over
    the tail (ranks 1 … n_tail) with xmin marked. NaN scores are dropped; beyond 3000 points the ranks are
    thinned log-uniformly."""
    x = _numpy(scores).ravel()
    x = x[~np.isnan(x)]
    pos = np.sort(x[x > 0])[::-1]
    neg = np.sort(-x[x < 0])[::-1]
    fig = _figure(5.2, 3.6)
    ax = fig.add_subplot()
    if neg.size:
        r = _log_ranks(neg.size)
        ax.loglog(r, neg[r - 1], ".", ms=2.5, color="0.65", label="−I (negative scores)")
    if pos.size:
        r = _log_ranks(pos.size)
        ax.loglog(r, pos[r - 1], ".", ms=3, color=POSITIVE, label="I > 0")
    if fit is not None:
        ranks = np.geomspace(1, fit.n_tail, 64)
        ax.loglog(
            ranks,
            fit.rank_curve(ranks),
            "-",
            color="k",
            lw=1.2,
            label=f"power law α = {fit.alpha:.2f} ± {fit.sigma:.2f}",
        )
        ax.axhline(fit.xmin, color="k", lw=0.6, ls=":", label=f"xmin = {fit.xmin:.3g}")
    if not (pos.size or neg.size):
        ax.text(0.5, 0.5, "no nonzero scores", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("rank (1 = largest)")
    ax.set_ylabel("influence (raw score)")
    ax.set_title(title or "sorted influence", fontsize=10, parse_math=False)
    if pos.size or neg.size:
        ax.legend(fontsize=7, frameon=False)
    ax.grid(True, which="major", lw=0.3, alpha=0.5)
    return _finish(fig, save, dpi)


def _log_ranks(n: int, points: int = 3000) -> np.ndarray:
    """Ranks 1 … n, thinned to about ``points`` log-spaced ones when n is larger (what a log axis can show)."""
    if n <= points:
        return np.arange(1, n + 1)
    return np.unique(np.geomspace(1, n, points).round().astype(np.int64))


def _short(names: Sequence[str], limit: int = 28) -> list[str]:
    return [n if len(n) <= limit else "…" + n[-(limit - 1) :] for n in names]


def plot_layer_profile(
    hits: Sequence[Hit],
    layer_names: Sequence[str],
    *,
    title: str | None = None,
    save: str | os.PathLike | None = None,
    dpi: int = 100,
) -> Figure:
    """Per-layer influence I_l of each hit against the layer index (forward order; Σ_l I_l = the hit's score),
    one line per hit, labelled by training index."""
    fig = _figure(6.2, 3.2)
    ax = fig.add_subplot()
    idx = np.arange(len(layer_names))
    rows = [np.array([hit.layers.get(name, np.nan) for name in layer_names], dtype=np.float64) for hit in hits]
    for rank, (hit, values) in enumerate(zip(hits, rows, strict=True)):
        ax.plot(idx, values, marker="o", ms=3, lw=1, alpha=max(0.35, 1.0 - 0.07 * rank), label=f"#{hit.index}")
    ax.axhline(0.0, color="0.4", lw=0.6)
    scales = [float(np.nanmax(np.abs(r))) for r in rows if np.isfinite(r).any()]
    scales = [x for x in scales if x > 0]
    if scales and max(scales) > 8 * min(scales):
        # one hit far larger than another would flatten the smaller one's line on a linear axis
        ax.set_yscale("symlog", linthresh=min(scales) / 2)
        ax.set_ylabel("I_l (raw score, symlog)")
    else:
        ax.set_ylabel("I_l (raw score)")
    ax.set_xlabel("tracked layer (forward order)")
    ax.xaxis.get_major_locator().set_params(integer=True)  # layer indices, not 2.5
    if len(layer_names) <= 12:
        ax.set_xticks(idx, _short(layer_names), rotation=35, ha="right", fontsize=6, parse_math=False)
    ax.set_title(title or "layer profile of the top hits", fontsize=10, parse_math=False)
    if hits:  # beside the axes, never over the lines
        ax.legend(fontsize=6, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="sequence")
    else:
        ax.text(0.5, 0.5, "no hits", ha="center", va="center", transform=ax.transAxes)
    ax.grid(True, lw=0.3, alpha=0.5)
    return _finish(fig, save, dpi)


def plot_layer_tokens(
    hit: Hit,
    layer_names: Sequence[str] | None = None,
    tokens: Sequence[str] | None = None,
    *,
    title: str | None = None,
    save: str | os.PathLike | None = None,
    dpi: int = 100,
) -> Figure:
    """Heatmap of the hit's layer × token influence [L, T] (Σ = score), diverging colormap centred at 0; token
    strings label the columns when given (up to :data:`MAX_TOKEN_LABELS`). Raises if the hit has no token scores."""
    if hit.layer_tokens is None:
        raise ValueError("this hit has no token scores (the scan ran with tokens=False)")
    m = _numpy(hit.layer_tokens)
    n_layers, n_tokens = m.shape
    fig = _figure(min(11.0, 2.6 + 0.16 * n_tokens), min(8.0, 1.4 + 0.22 * n_layers))
    ax = fig.add_subplot()
    vmax = float(np.abs(m).max()) or 1.0
    image = ax.imshow(m, aspect="auto", cmap=CMAP, vmin=-vmax, vmax=vmax, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.9, label="I (raw score)")
    if layer_names is not None and len(layer_names) == n_layers and n_layers <= 40:
        ax.set_yticks(np.arange(n_layers), _short(layer_names), fontsize=6, parse_math=False)
    else:
        ax.set_ylabel("tracked layer")
    if tokens is not None and n_tokens <= MAX_TOKEN_LABELS:
        labels = [repr(t)[1:-1] for t in list(tokens)[:n_tokens]]
        labels += [""] * (n_tokens - len(labels))
        ax.set_xticks(np.arange(n_tokens), labels, rotation=90, fontsize=6, parse_math=False)
    else:
        ax.set_xlabel("token position")
    ax.set_title(title or f"hit #{hit.index}: layer × token influence", fontsize=10, parse_math=False)
    return _finish(fig, save, dpi)
