"""One streaming pass over the training data for every resident query (paper §3.2–3.3).

Per query the scan keeps the top-k most positive and most negative training sequences (with their per-layer
scores), the top-k of each layer band (lower / middle / upper third of the tracked layers, §5.3.2) and running
totals (count, sum, sum of positive influence, sum of squares). No [Q, N] matrix is held unless asked for.
A second, targeted pass over the hits splits each hit's score over its tokens (Eq. 31).

With ``out_dir`` the scan is resumable: every shard of training sequences is written atomically when done and
recorded in ``scan.json``; the same call after an interruption skips finished shards.
"""

from influencer.scan.contract import DEFAULT_DENSE_BUDGET, contraction_costs
from influencer.scan.result import SPURIOUS_RATIO, Hit, ScanResult, merge_scans
from influencer.scan.run import POOL, scan
from influencer.scan.tokens import attribute_tokens
from influencer.scan.topk import BANDS

__all__ = [
    "BANDS",
    "DEFAULT_DENSE_BUDGET",
    "POOL",
    "SPURIOUS_RATIO",
    "Hit",
    "ScanResult",
    "attribute_tokens",
    "contraction_costs",
    "merge_scans",
    "scan",
]
