"""Fusion of per-task candidate scores into one ranking: ``F(x) = sum_i w_i f_i(x)``.

Numpy only, no Flower. Fusers are fitted on validation scores whose target column is known;
:func:`cv_objective` lets federated clients score candidate weightings and return aggregates.
"""

from fedrec.fusion.base import Fuser, LinearFuser
from fedrec.fusion.fusers import (
    FUSERS,
    AverageFuser,
    WeightedFuser,
    fit_fuser,
    fuser_from_dict,
    refine_simplex,
)
from fedrec.fusion.normalize import NORMALIZATIONS, normalize
from fedrec.fusion.objective import FUSION_K, cv_objective, simplex_grid, user_folds
from fedrec.fusion.stacking import StackingFuser, fit_logistic

__all__ = [
    "FUSERS",
    "FUSION_K",
    "NORMALIZATIONS",
    "AverageFuser",
    "Fuser",
    "LinearFuser",
    "StackingFuser",
    "WeightedFuser",
    "cv_objective",
    "fit_fuser",
    "fit_logistic",
    "fuser_from_dict",
    "normalize",
    "refine_simplex",
    "simplex_grid",
    "user_folds",
]
