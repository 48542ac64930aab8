"""Federated choice of the fusion weights: clients score candidate weightings, the server sums.

In deployment no party holds everyone's validation data. The server sends every client the
same candidate set (a simplex grid of weights, crossed with the score normalisations); each
client scores every candidate on its own validation users with :func:`client_sums` and returns
only the sums of per-user NDCG@10 and its user count. Summed over clients these are exactly
the federation-wide means the central fuser would compute, so the server's argmax is the same
choice a central grid search over all users makes (:func:`choose`). Nothing per user leaves a
client; the sums are not differentially private (a client with one validation user reveals
that user's NDCG per candidate), which ``docs/`` and the README say.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedrec.fusion.base import check_normalization
from fedrec.fusion.fusers import WeightedFuser
from fedrec.fusion.normalize import NORMALIZATIONS
from fedrec.fusion.objective import (
    as_target_col,
    check_scores,
    per_user_ndcg,
    simplex_grid,
    stack_normalized,
)

GRID_STEP = 0.05  # 231 weightings of 3 tasks: finer than the central 0.1 grid, no refinement


@dataclass(frozen=True)
class Candidates:
    """What the server sends: task order, weight grid (G, T) and normalisations (M)."""

    tasks: tuple[str, ...]
    grid: np.ndarray
    normalizations: tuple[str, ...]

    @classmethod
    def make(
        cls,
        tasks: Sequence[str],
        step: float = GRID_STEP,
        normalizations: Sequence[str] = NORMALIZATIONS,
    ) -> Candidates:
        norms = tuple(check_normalization(m) for m in normalizations)
        return cls(tuple(tasks), simplex_grid(len(tasks), step), norms)


def client_sums(
    scores: Mapping[str, np.ndarray], target_col: int | np.ndarray, cand: Candidates
) -> tuple[np.ndarray, int]:
    """``(sums (M, G), n_users)``: per normalisation and weighting, the sum over this client's
    validation users of NDCG@10 of the fused ranking."""
    tasks, (n_users, n_cols) = check_scores(scores)
    if set(tasks) != set(cand.tasks):
        raise ValueError(f"scores name tasks {sorted(tasks)}, candidates {sorted(cand.tasks)}")
    cols = as_target_col(target_col, n_users, n_cols)
    sums = np.zeros((len(cand.normalizations), len(cand.grid)))
    for m, norm in enumerate(cand.normalizations):
        stacked = stack_normalized(scores, list(cand.tasks), norm)
        for g, w in enumerate(cand.grid):
            sums[m, g] = per_user_ndcg(stacked, w, cols).sum()
    return sums, n_users


def choose(sums: np.ndarray, n_users: int, cand: Candidates) -> tuple[WeightedFuser, float]:
    """The fuser maximising the summed NDCG@10 (ties: the most even weighting, then the
    earlier normalisation), and its mean NDCG@10 over all clients' validation users."""
    expected = (len(cand.normalizations), len(cand.grid))
    if sums.shape != expected or n_users < 1:
        raise ValueError(f"sums must be {expected} over at least one user, got {sums.shape}")
    means = sums / n_users
    even = np.abs(cand.grid - 1.0 / len(cand.tasks)).sum(axis=1)  # (G,)
    order = np.lexsort((np.broadcast_to(even, means.shape).ravel(), -means.ravel()))
    m, g = divmod(int(order[0]), len(cand.grid))
    weights = dict(zip(cand.tasks, cand.grid[g].tolist(), strict=True))
    fuser = WeightedFuser.from_weights(weights, cand.normalizations[m])
    fuser.cv_scores = {n: float(means[i].max()) for i, n in enumerate(cand.normalizations)}
    return fuser, float(means[m, g])
