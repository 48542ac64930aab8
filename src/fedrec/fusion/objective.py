"""The fusion objective, NDCG@10 of the fused ranking, and the pieces to search over it.

Kept apart from the fusers so a federated client can score candidate weightings on its own
validation users with :func:`cv_objective` and send back only ``(sum of NDCG, n_users)``; the
server sums these over clients and gets the exact mean over all users.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import numpy as np

from fedrec.evaluation.metrics import ndcg, rank_of_target
from fedrec.fusion.normalize import normalize

FUSION_K = 10  # fusers maximise NDCG@10, the protocol's headline cut-off


def check_scores(
    scores: Mapping[str, np.ndarray], name: str = "scores"
) -> tuple[list[str], tuple[int, int]]:
    """The task names and the common (U, N) shape; raise unless all are finite and alike."""
    if not scores:
        raise ValueError(f"{name} must hold at least one task's scores")
    shapes = {task: np.shape(s) for task, s in scores.items()}
    shape = next(iter(shapes.values()))
    if len(shape) != 2 or any(sh != shape for sh in shapes.values()):
        raise ValueError(f"{name} must all be 2-D (users, candidates) of one shape, got {shapes}")
    for task, s in scores.items():
        if not np.isfinite(s).all():
            raise ValueError(f"{name}[{task!r}] has NaN or infinite values")
    return list(scores), (int(shape[0]), int(shape[1]))


def as_target_col(target_col: int | np.ndarray, n_users: int, n_cols: int) -> np.ndarray:
    """int64 (U,): ``target_col`` broadcast to one column per user, checked to be in range."""
    cols = np.asarray(target_col)
    cols = np.full(n_users, int(cols)) if cols.ndim == 0 else cols
    if cols.shape != (n_users,) or not np.issubdtype(cols.dtype, np.integer):
        raise ValueError(f"target_col must be an int or int array of shape ({n_users},)")
    if n_users and (cols.min() < 0 or cols.max() >= n_cols):
        raise ValueError(f"target_col must index candidate columns in [0, {n_cols})")
    return cols.astype(np.int64)


def stack_normalized(
    scores: Mapping[str, np.ndarray], tasks: list[str], normalization: str
) -> np.ndarray:
    """float64 (T, U, N): each task's scores normalised per user, in ``tasks`` order."""
    return np.stack([normalize(scores[t], normalization) for t in tasks])


def per_user_ndcg(
    stacked: np.ndarray, weights: np.ndarray, target_col: np.ndarray, k: int = FUSION_K
) -> np.ndarray:
    """float64 (U,): NDCG@k of the ranking by ``sum_t weights[t] * stacked[t]``."""
    fused = np.tensordot(weights, stacked, axes=1)  # (U, N)
    return ndcg(rank_of_target(fused, target_col), k)


def cv_objective(
    weights: Mapping[str, float],
    normalization: str,
    scores: Mapping[str, np.ndarray],
    target_col: int | np.ndarray,
    k: int = FUSION_K,
) -> tuple[float, int]:
    """``(sum over users of NDCG@k, n_users)`` of the fused ranking, for aggregation.

    ``weights`` maps every task in ``scores`` to its weight; ``target_col`` marks the held-out
    item's column. Summing both numbers over clients gives the federation-wide mean NDCG@k.
    """
    tasks, (n_users, n_cols) = check_scores(scores)
    missing = set(tasks) ^ set(weights)
    if missing:
        raise ValueError(f"weights and scores name different tasks: {sorted(missing)}")
    w = np.array([weights[t] for t in tasks], dtype=np.float64)
    cols = as_target_col(target_col, n_users, n_cols)
    values = per_user_ndcg(stack_normalized(scores, tasks, normalization), w, cols, k)
    return float(values.sum()), n_users


def simplex_grid(n_tasks: int, step: float) -> np.ndarray:
    """float64 (G, T): every weighting with entries in {0, step, ..., 1} that sums to 1.

    For 3 tasks and step 0.1 that is 66 points, ordered lexicographically (first task first).
    """
    if n_tasks < 1:
        raise ValueError(f"n_tasks must be positive, got {n_tasks}")
    parts = round(1.0 / step) if step > 0 else 0
    if parts < 1 or abs(parts * step - 1.0) > 1e-9:
        raise ValueError(f"step must be 1/m for a positive integer m, got {step}")
    points = [c for c in itertools.product(range(parts, -1, -1), repeat=n_tasks - 1)
              if sum(c) <= parts]
    grid = np.array([(*c, parts - sum(c)) for c in points], dtype=np.float64)
    return grid / parts


def user_folds(n_users: int, k: int, seed: int) -> list[np.ndarray]:
    """``k`` disjoint, sorted arrays of user rows covering ``range(n_users)``, seeded."""
    if k < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {k}")
    if n_users < k:
        raise ValueError(f"{n_users} validation users cannot fill {k} folds; "
                         "use fewer folds or more validation users")
    perm = np.random.default_rng(seed).permutation(n_users)
    return [np.sort(f) for f in np.array_split(perm, k)]
