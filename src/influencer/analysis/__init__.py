"""Analysis of scan results: tail statistics (power law, concentration, scan-size estimates) and figures.

Needs the ``report`` extra (``pip install 'influencer[report]'``: powerlaw, matplotlib); they are imported on first
use, so importing this package is cheap.
"""

from influencer.analysis.plots import figure_png, plot_layer_profile, plot_layer_tokens, plot_tail
from influencer.analysis.tails import (
    Comparison,
    PowerLawFit,
    TailStats,
    ks_xmin,
    query_tail_stats,
    tail_stats,
    tail_stats_from_totals,
    top_count,
)

__all__ = [
    "Comparison",
    "PowerLawFit",
    "TailStats",
    "figure_png",
    "ks_xmin",
    "plot_layer_profile",
    "plot_layer_tokens",
    "plot_tail",
    "query_tail_stats",
    "tail_stats",
    "tail_stats_from_totals",
    "top_count",
]
