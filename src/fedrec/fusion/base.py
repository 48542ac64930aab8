"""The contract every fuser keeps, and the linear fuser the simple ones share.

A fuser turns per-task candidate scores, a dict ``task -> float (U, N)`` over the same users and
candidates, into one fused score ``F(x) = sum_i w_i f_i(x)`` (U, N). It is fitted on validation
scores whose held-out item's column is known, and serialises to a JSON-friendly dict so the
server can ship it with a checkpoint.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, Self

import numpy as np

from fedrec.fusion.normalize import NORMALIZATIONS
from fedrec.fusion.objective import check_scores, stack_normalized

Scores = Mapping[str, np.ndarray]  # task (or feature) name -> float (U, N)


class Fuser(ABC):
    """Fit on validation scores, then fuse new scores of the same tasks."""

    method: ClassVar[str]

    @abstractmethod
    def fit(
        self, val_scores: Scores, val_target_col: int | np.ndarray, features: Scores | None = None
    ) -> Self:
        """Learn the fusion from validation scores; ``val_target_col`` marks each target."""

    @abstractmethod
    def fuse(self, scores: Scores, features: Scores | None = None) -> np.ndarray:
        """float64 (U, N): the fused scores; higher ranks first."""

    @property
    @abstractmethod
    def weights(self) -> dict[str, float]:
        """The learned weight of each task (and feature), for reports."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description that :meth:`from_dict` restores."""

    @classmethod
    @abstractmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        """Rebuild a fitted fuser from :meth:`to_dict`'s output."""


def check_normalization(method: str) -> str:
    if method not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {method!r}; choose one of {NORMALIZATIONS}")
    return method


class LinearFuser(Fuser):
    """``F = sum_t w_t * normalize(f_t)``: the fitted state is the weights and normalisation."""

    def __init__(self, *, normalization: str = "zscore") -> None:
        self.normalization = check_normalization(normalization)
        self._weights: dict[str, float] | None = None

    @property
    def weights(self) -> dict[str, float]:
        if self._weights is None:
            raise ValueError(f"{type(self).__name__} is not fitted; call fit() first")
        return dict(self._weights)

    def fuse(self, scores: Scores, features: Scores | None = None) -> np.ndarray:
        """The weighted sum of normalised task scores; ``features`` are not used."""
        weights = self.weights
        tasks, _ = check_scores(scores)
        if set(tasks) != set(weights):
            raise ValueError(f"scores have tasks {sorted(tasks)}, the fuser was fitted on "
                             f"{sorted(weights)}")
        order = list(weights)
        w = np.array([weights[t] for t in order])
        return np.tensordot(w, stack_normalized(scores, order, self.normalization), axes=1)

    def _state(self) -> dict[str, Any]:
        return {"method": self.method, "normalization": self.normalization,
                "weights": self.weights}
