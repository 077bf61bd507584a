"""influencer: influence functions for language models and any PyTorch model (EK-FAC, Grosse et al. 2023).

import influencer as inf
curv = inf.fit_curvature(model, inf.Regression(), (X, Y))
scores = inf.pairwise_scores(model, inf.Regression(), curv, (Xq, Yq), (X, Y))
"""

from influencer.curvature import (
    STRATEGIES,
    Curvature,
    CurvatureMismatchError,
    LayerFactors,
    fit_curvature,
    fit_partition,
    merge_fit,
)
from influencer.layers import Layer, select_layers
from influencer.queries import QueryStore, measurement_gradients, preconditioned_queries
from influencer.refine import RefinedInverse
from influencer.scan import Hit, ScanResult, merge_scans, scan
from influencer.scores import Scores, pairwise_scores, self_scores
from influencer.tasks import CausalLM, Classification, Regression, Task

__version__ = "0.1.0"

__all__ = [
    "STRATEGIES",
    "CausalLM",
    "Classification",
    "Curvature",
    "CurvatureMismatchError",
    "Hit",
    "Layer",
    "LayerFactors",
    "QueryStore",
    "RefinedInverse",
    "Regression",
    "ScanResult",
    "Scores",
    "Task",
    "__version__",
    "fit_curvature",
    "fit_partition",
    "measurement_gradients",
    "merge_fit",
    "merge_scans",
    "pairwise_scores",
    "preconditioned_queries",
    "scan",
    "select_layers",
    "self_scores",
]
