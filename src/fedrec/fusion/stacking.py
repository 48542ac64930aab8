"""Stacking: a logistic-regression meta-model over normalised task scores and item features.

Stacked generalisation (Wolpert 1992, "Stacked Generalization") with a pointwise logistic loss:
each (user, candidate) cell is one example, labelled 1 for the held-out item and 0 otherwise, with
the per-user normalised task scores and optional features (e.g. log item popularity) as inputs.
Unlike the simplex fusers it can give a task a negative weight and use side features. The L2
strength is chosen by k-fold CV over users for NDCG@10; the model is then refitted on all users.
Fitting is Newton's method (IRLS) on standardised inputs, exact for this handful of features.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

import numpy as np

from fedrec.evaluation.metrics import ndcg, rank_of_target
from fedrec.fusion.base import Fuser, Scores, check_normalization
from fedrec.fusion.normalize import normalize
from fedrec.fusion.objective import FUSION_K, as_target_col, check_scores, user_folds

DEFAULT_L2_GRID = (1.0, 0.1, 0.01, 0.001)  # strongest first, so ties keep the simpler model
NEWTON_MAX_ITER = 50
NEWTON_TOL = 1e-8  # stop when no parameter moves more than this
HESSIAN_JITTER = 1e-12  # keeps the unpenalised intercept's Hessian invertible


@dataclass(frozen=True)
class LogisticModel:
    """``logit = ((x - mean) / scale) @ coef + intercept``; coef is on standardised inputs."""

    coef: np.ndarray  # (D,)
    intercept: float
    mean: np.ndarray  # (D,)
    scale: np.ndarray  # (D,)

    def decision(self, x: np.ndarray) -> np.ndarray:
        """float64 (n,): the logits of inputs ``x`` (n, D)."""
        return ((x - self.mean) / self.scale) @ self.coef + self.intercept


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float) -> LogisticModel:
    """L2-penalised logistic regression of ``y`` (n,) in {0, 1} on ``x`` (n, D).

    Minimises ``mean log-loss + l2 / 2 * ||coef||^2`` (intercept unpenalised) by Newton steps.
    """
    if l2 <= 0:
        raise ValueError(f"l2 must be positive (an unpenalised fit can diverge), got {l2}")
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    z = np.hstack([(x - mean) / scale, np.ones((len(x), 1))])  # (n, D + 1)
    w = _newton(z, y, np.r_[np.full(x.shape[1], l2), 0.0])
    return LogisticModel(coef=w[:-1], intercept=float(w[-1]), mean=mean, scale=scale)


def _newton(z: np.ndarray, y: np.ndarray, penalty: np.ndarray) -> np.ndarray:
    n = len(z)
    w = np.zeros(z.shape[1])
    for _ in range(NEWTON_MAX_ITER):
        p = 0.5 * (1.0 + np.tanh(0.5 * (z @ w)))
        grad = z.T @ (p - y) / n + penalty * w
        hess = (z.T * (p * (1.0 - p))) @ z / n + np.diag(penalty + HESSIAN_JITTER)
        delta = np.linalg.solve(hess, grad)
        w = w - delta
        if not np.isfinite(w).all():
            raise ValueError("Degenerate stacking fit: non-finite coefficients; check the scores")
        if np.abs(delta).max() < NEWTON_TOL:
            break
    return w


class StackingFuser(Fuser):
    """Logistic-regression stacking; ``weights`` are its coefficients on standardised inputs."""

    method = "stacking"

    def __init__(
        self, *, normalization: str = "zscore", l2_grid: Sequence[float] = DEFAULT_L2_GRID,
        folds: int = 5, seed: int = 0,
    ) -> None:
        if not l2_grid or min(l2_grid) <= 0:
            raise ValueError(f"l2_grid must hold positive penalties, got {l2_grid}")
        if folds < 2:
            raise ValueError(f"folds must be at least 2, got {folds}")
        self.normalization = check_normalization(normalization)
        self.l2_grid, self.folds, self.seed = tuple(float(v) for v in l2_grid), folds, seed
        self.tasks: list[str] = []
        self.feature_names: list[str] = []
        self.l2 = self.l2_grid[0]
        self.cv_scores: dict[str, float] = {}
        self._model: LogisticModel | None = None

    def fit(
        self, val_scores: Scores, val_target_col: int | np.ndarray, features: Scores | None = None
    ) -> Self:
        self.tasks, (n_users, n_cols) = check_scores(val_scores, "val_scores")
        self.feature_names = _feature_names(features, self.tasks, (n_users, n_cols))
        x = self._design(val_scores, features)  # (U, N, D)
        cols = as_target_col(val_target_col, n_users, n_cols)
        y = np.zeros((n_users, n_cols))
        y[np.arange(n_users), cols] = 1.0
        folds = user_folds(n_users, self.folds, self.seed)
        self.cv_scores = {f"{l2:g}": _cv_score(x, y, cols, folds, l2) for l2 in self.l2_grid}
        self.l2 = max(self.l2_grid, key=lambda l2: self.cv_scores[f"{l2:g}"])
        self._model = fit_logistic(x.reshape(-1, x.shape[2]), y.ravel(), self.l2)
        return self

    def fuse(self, scores: Scores, features: Scores | None = None) -> np.ndarray:
        """float64 (U, N): the meta-model's logit that each candidate is the held-out item."""
        model = self._fitted()
        tasks, shape = check_scores(scores)
        if set(tasks) != set(self.tasks):
            raise ValueError(f"scores have tasks {sorted(tasks)}, the fuser was fitted on "
                             f"{sorted(self.tasks)}")
        if set(_feature_names(features, tasks, shape)) != set(self.feature_names):
            raise ValueError(f"the fuser was fitted with features {self.feature_names}")
        x = self._design(scores, features)
        return model.decision(x.reshape(-1, x.shape[2])).reshape(shape)

    @property
    def weights(self) -> dict[str, float]:
        coef = self._fitted().coef.tolist()
        return dict(zip(self.tasks + self.feature_names, coef, strict=True))

    def to_dict(self) -> dict[str, Any]:
        m = self._fitted()
        return {"method": self.method, "normalization": self.normalization,
                "tasks": self.tasks, "features": self.feature_names, "weights": self.weights,
                "intercept": m.intercept, "mean": m.mean.tolist(), "scale": m.scale.tolist(),
                "l2": self.l2, "l2_grid": list(self.l2_grid), "folds": self.folds,
                "seed": self.seed, "cv_scores": dict(self.cv_scores)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        fuser = cls(normalization=d["normalization"], l2_grid=d["l2_grid"], folds=d["folds"],
                    seed=d["seed"])
        fuser.tasks, fuser.feature_names = list(d["tasks"]), list(d["features"])
        fuser.l2, fuser.cv_scores = float(d["l2"]), dict(d["cv_scores"])
        coef = np.array([d["weights"][n] for n in fuser.tasks + fuser.feature_names])
        fuser._model = LogisticModel(coef=coef, intercept=float(d["intercept"]),
                                     mean=np.array(d["mean"]), scale=np.array(d["scale"]))
        return fuser

    def _fitted(self) -> LogisticModel:
        if self._model is None:
            raise ValueError("StackingFuser is not fitted; call fit() first")
        return self._model

    def _design(self, scores: Scores, features: Scores | None) -> np.ndarray:
        columns = [normalize(scores[t], self.normalization) for t in self.tasks]
        columns += [np.asarray(features[f], np.float64) for f in self.feature_names if features]
        return np.stack(columns, axis=-1)


def _feature_names(
    features: Scores | None, tasks: list[str], shape: tuple[int, int]
) -> list[str]:
    if not features:
        return []
    names, fshape = check_scores(features, "features")
    if fshape != shape:
        raise ValueError(f"features have shape {fshape}, the scores {shape}")
    clash = set(names) & set(tasks)
    if clash:
        raise ValueError(f"feature names must differ from task names: {sorted(clash)}")
    return names


def _cv_score(
    x: np.ndarray, y: np.ndarray, cols: np.ndarray, folds: list[np.ndarray], l2: float
) -> float:
    """Mean over all users of held-out NDCG@10 with the meta-model fitted on the other folds."""
    total = 0.0
    for i, held in enumerate(folds):
        train = np.concatenate([f for j, f in enumerate(folds) if j != i])
        model = fit_logistic(x[train].reshape(-1, x.shape[2]), y[train].ravel(), l2)
        fused = model.decision(x[held].reshape(-1, x.shape[2])).reshape(len(held), -1)
        total += float(ndcg(rank_of_target(fused, cols[held]), FUSION_K).sum())
    return total / len(x)
