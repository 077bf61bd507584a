"""Curvature: fitting (covariances, eigenbases, Λ), damping, the damped inverse, save/load."""

from influencer.curvature.core import (
    FISHERS,
    STRATEGIES,
    Curvature,
    CurvatureMismatchError,
    Inverse,
    LayerFactors,
)
from influencer.curvature.fingerprint import model_fingerprint
from influencer.curvature.fit import fit_curvature
from influencer.curvature.partitions import fit_partition, merge_fit

__all__ = [
    "FISHERS",
    "STRATEGIES",
    "Curvature",
    "CurvatureMismatchError",
    "Inverse",
    "LayerFactors",
    "fit_curvature",
    "fit_partition",
    "merge_fit",
    "model_fingerprint",
]
