"""Linear fusers and the registry: equal weights, and CV-tuned simplex weights.

:class:`WeightedFuser` treats the weights and the normalisation as hyper-parameters of a linear
score fusion (Fox & Shaw 1994, CombSUM and its weighted form) and picks them by k-fold
cross-validation over users, maximising NDCG@10 of the fused ranking.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Self

import numpy as np

from fedrec.fusion.base import Fuser, LinearFuser, Scores, check_normalization
from fedrec.fusion.normalize import NORMALIZATIONS
from fedrec.fusion.objective import (
    as_target_col,
    check_scores,
    per_user_ndcg,
    simplex_grid,
    stack_normalized,
    user_folds,
)
from fedrec.fusion.stacking import StackingFuser

MAX_REFINE_MOVES = 200  # hill-climbing moves before refinement stops regardless
TIE_TOL = 1e-12


class AverageFuser(LinearFuser):
    """Equal weights on per-user normalised scores (CombSUM); ``features`` are ignored."""

    method = "average"

    def fit(
        self, val_scores: Scores, val_target_col: int | np.ndarray, features: Scores | None = None
    ) -> Self:
        tasks, (n_users, n_cols) = check_scores(val_scores, "val_scores")
        as_target_col(val_target_col, n_users, n_cols)  # validated for a uniform contract
        self._weights = {t: 1.0 / len(tasks) for t in tasks}
        return self

    def to_dict(self) -> dict[str, Any]:
        return self._state()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        fuser = cls(normalization=d["normalization"])
        fuser._weights = {str(t): float(w) for t, w in d["weights"].items()}
        return fuser


class WeightedFuser(LinearFuser):
    """Simplex weights and a normalisation chosen by k-fold CV over users for NDCG@10.

    For each normalisation the CV score is the held-out NDCG@10 when weights are searched on the
    other folds (a simplex grid of ``step``, then hill-climbing refinement). The best
    normalisation wins (ties go to the earlier one) and its weights are refitted on all users.
    ``features`` are ignored.
    """

    method = "weighted"

    def __init__(
        self, *, normalizations: Sequence[str] = NORMALIZATIONS, step: float = 0.1,
        folds: int = 5, seed: int = 0, refine: bool = True,
    ) -> None:
        if not normalizations:
            raise ValueError("normalizations must name at least one method")
        self.normalizations = tuple(check_normalization(m) for m in normalizations)
        super().__init__(normalization=self.normalizations[0])
        simplex_grid(1, step)  # validates step
        if folds < 2:
            raise ValueError(f"folds must be at least 2, got {folds}")
        self.step, self.folds, self.seed, self.refine = step, folds, seed, refine
        self.cv_scores: dict[str, float] = {}

    def fit(
        self, val_scores: Scores, val_target_col: int | np.ndarray, features: Scores | None = None
    ) -> Self:
        tasks, (n_users, n_cols) = check_scores(val_scores, "val_scores")
        cols = as_target_col(val_target_col, n_users, n_cols)
        folds = user_folds(n_users, self.folds, self.seed)
        searches: dict[str, _WeightSearch] = {}
        self.cv_scores = {}
        for norm in self.normalizations:
            stacked = stack_normalized(val_scores, tasks, norm)
            searches[norm] = _WeightSearch(stacked, cols, self.step, self.refine)
            self.cv_scores[norm] = searches[norm].cv_score(folds)
        self.normalization = max(self.normalizations, key=lambda m: self.cv_scores[m])
        weights = searches[self.normalization].best(np.arange(n_users))
        self._weights = dict(zip(tasks, weights.tolist(), strict=True))
        return self

    @classmethod
    def from_weights(cls, weights: Mapping[str, float], normalization: str) -> Self:
        """A fitted fuser with given weights, e.g. chosen by a federated search."""
        fuser = cls(normalizations=(normalization,))
        fuser._weights = {str(t): float(w) for t, w in weights.items()}
        return fuser

    def to_dict(self) -> dict[str, Any]:
        return {**self._state(), "normalizations": list(self.normalizations), "step": self.step,
                "folds": self.folds, "seed": self.seed, "refine": self.refine,
                "cv_scores": dict(self.cv_scores)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        fuser = cls(normalizations=d["normalizations"], step=d["step"], folds=d["folds"],
                    seed=d["seed"], refine=d["refine"])
        fuser.normalization = check_normalization(d["normalization"])
        fuser._weights = {str(t): float(w) for t, w in d["weights"].items()}
        fuser.cv_scores = {str(m): float(v) for m, v in d["cv_scores"].items()}
        return fuser


class _WeightSearch:
    """Simplex weight search on subsets of users of one normalised score stack (T, U, N)."""

    def __init__(self, stacked: np.ndarray, cols: np.ndarray, step: float, refine: bool) -> None:
        self.stacked, self.cols, self.step, self.refine = stacked, cols, step, refine
        self.grid = simplex_grid(stacked.shape[0], step)
        self.grid_ndcg = np.stack([per_user_ndcg(stacked, w, cols) for w in self.grid])  # (G, U)

    def best(self, rows: np.ndarray) -> np.ndarray:
        """float64 (T,): the weights maximising mean NDCG@10 over ``rows``."""
        means = self.grid_ndcg[:, rows].mean(axis=1)
        ties = np.flatnonzero(means >= means.max() - TIE_TOL)
        spread = np.abs(self.grid[ties] - 1.0 / self.grid.shape[1]).sum(axis=1)
        start = self.grid[ties[np.argmin(spread)]]  # among ties, the most even weighting
        if not self.refine:
            return start
        sub, cols = self.stacked[:, rows], self.cols[rows]
        return refine_simplex(lambda w: float(per_user_ndcg(sub, w, cols).mean()), start,
                              self.step / 2, self.step / 8)

    def cv_score(self, folds: list[np.ndarray]) -> float:
        """Mean over all users of held-out NDCG@10, weights searched on the other folds."""
        total = 0.0
        for i, held in enumerate(folds):
            train = np.concatenate([f for j, f in enumerate(folds) if j != i])
            w = self.best(train)
            total += float(per_user_ndcg(self.stacked[:, held], w, self.cols[held]).sum())
        return total / self.stacked.shape[1]


def refine_simplex(
    objective: Callable[[np.ndarray], float], start: np.ndarray, step: float, min_step: float
) -> np.ndarray:
    """Hill-climb on the simplex by moving ``step`` of weight between two tasks at a time.

    Accepts strict improvements only and halves ``step`` when no move helps, down to
    ``min_step``; the result is never worse than ``start``.
    """
    w, best, moves = start.copy(), objective(start), 0
    pairs = list(itertools.permutations(range(len(w)), 2))
    while step >= min_step * (1 - 1e-9) and moves < MAX_REFINE_MOVES:
        improved = False
        for i, j in pairs:
            if w[j] < step - TIE_TOL:
                continue
            cand = w.copy()
            cand[i], cand[j] = cand[i] + step, max(cand[j] - step, 0.0)
            value = objective(cand)
            if value > best + TIE_TOL:
                w, best, improved, moves = cand, value, True, moves + 1
        if not improved:
            step /= 2
    return w


_FACTORIES: dict[str, Callable[[int], Fuser]] = {
    "average": lambda seed: AverageFuser(),
    "weighted": lambda seed: WeightedFuser(seed=seed),
    "stacking": lambda seed: StackingFuser(seed=seed),
}
FUSERS: tuple[str, ...] = tuple(_FACTORIES)
_CLASSES: dict[str, type[Fuser]] = {
    c.method: c for c in (AverageFuser, WeightedFuser, StackingFuser)
}


def fit_fuser(
    method: str, val_scores: Scores, val_target_col: int | np.ndarray,
    features: Scores | None = None, *, seed: int = 0,
) -> Fuser:
    """Fit the fuser named ``method`` ('average', 'weighted' or 'stacking') with its defaults."""
    if method not in _FACTORIES:
        raise ValueError(f"unknown fusion method {method!r}; choose one of {FUSERS}")
    return _FACTORIES[method](seed).fit(val_scores, val_target_col, features)


def fuser_from_dict(d: Mapping[str, Any]) -> Fuser:
    """Rebuild any fitted fuser from its ``to_dict()`` output."""
    method = d.get("method")
    if method not in _CLASSES:
        raise ValueError(f"unknown fusion method {method!r}; choose one of {FUSERS}")
    return _CLASSES[method].from_dict(d)
