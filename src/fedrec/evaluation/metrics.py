"""Ranking and CTR metrics as plain numpy functions.

Ranking metrics return one value per user (spotlight's convention, e.g. ``mrr_score``), so a
client can report sums and counts and the server's mean over all users is exact. Every user has a
single held-out (relevant) item, the leave-one-out protocol of He et al. 2017, "Neural
Collaborative Filtering": the sampled protocol ranks it among 99 unseen items, the full protocol
among the whole catalogue minus the user's training items.

Ties are broken pessimistically: the target's rank counts every other candidate scoring at least
as high. A constant scorer therefore gets the worst possible rank instead of a lucky one, and a
model cannot gain by collapsing its scores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def _as_scores(scores: np.ndarray, name: str = "scores") -> np.ndarray:
    arr = np.asarray(scores)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (users, candidates), got shape {arr.shape}")
    if arr.shape[1] == 0:
        raise ValueError(f"{name} must have at least one candidate column")
    if np.isnan(arr).any():
        raise ValueError(f"{name} contain NaN; check the scorer (a NaN cannot be ranked)")
    return arr


def _as_cols(cols: int | np.ndarray, n_rows: int, n_cols: int, name: str) -> np.ndarray:
    arr = np.broadcast_to(np.asarray(cols), (n_rows,)) if np.ndim(cols) == 0 else np.asarray(cols)
    if arr.shape != (n_rows,) or (n_rows and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must be an int or an integer array of shape ({n_rows},), "
                         f"got {arr.dtype} {arr.shape}")
    if n_rows and (arr.min() < 0 or arr.max() >= n_cols):
        raise ValueError(f"{name} must index columns in [0, {n_cols})")
    return arr.astype(np.int64)


def _check_k(k: int) -> None:
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")


def rank_of_target(scores: np.ndarray, target_col: int | np.ndarray) -> np.ndarray:
    """int64 (U,): 0-based rank of each user's target among its candidates.

    ``scores`` is (U, N); ``target_col`` is one column for all users or one per user. The rank
    is the number of *other* candidates scoring >= the target (pessimistic ties), so 0 is best.
    """
    s = _as_scores(scores)
    cols = _as_cols(target_col, s.shape[0], s.shape[1], "target_col")
    target = s[np.arange(s.shape[0]), cols]
    return (s >= target[:, None]).sum(axis=1).astype(np.int64) - 1


def hit_rate(ranks: np.ndarray, k: int) -> np.ndarray:
    """float64 (U,): 1 where the target is in the top ``k`` (rank < k), else 0."""
    _check_k(k)
    return (np.asarray(ranks) < k).astype(np.float64)


def ndcg(ranks: np.ndarray, k: int) -> np.ndarray:
    """float64 (U,): NDCG@k with one relevant item, ``1 / log2(rank + 2)`` if rank < k else 0.

    With a single relevant item the ideal DCG is 1, so no normalisation term is needed.
    """
    _check_k(k)
    r = np.asarray(ranks, dtype=np.float64)
    return np.where(r < k, 1.0 / np.log2(r + 2.0), 0.0)


def recall_at_k(ranks: np.ndarray, k: int) -> np.ndarray:
    """float64 (U,): Recall@k; with a single held-out item it equals the hit rate."""
    return hit_rate(ranks, k)


def full_ranking_ranks(
    scores: np.ndarray, targets: np.ndarray, exclude: Sequence[np.ndarray]
) -> np.ndarray:
    """int64 (U,): rank of each target among all items, the user's excluded items removed.

    ``scores`` is (U, I) over the whole catalogue, ``exclude[u]`` the items to drop for user
    ``u`` (its training history, which it would otherwise be rewarded for re-recommending).
    Excluded items act as if scored -inf; the target itself is never excluded.
    """
    s = _as_scores(scores)
    n_users, n_items = s.shape
    cols = _as_cols(targets, n_users, n_items, "targets")
    if len(exclude) != n_users:
        raise ValueError(f"exclude needs one array per user: got {len(exclude)} for {n_users}")
    target = s[np.arange(n_users), cols]
    above = s >= target[:, None]
    rows, items = _exclusion_cells(exclude, n_items)
    above[rows, items] = False
    above[np.arange(n_users), cols] = True
    return above.sum(axis=1).astype(np.int64) - 1


def _exclusion_cells(exclude: Sequence[np.ndarray], n_items: int) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((np.size(e) for e in exclude), dtype=np.int64, count=len(exclude))
    rows = np.repeat(np.arange(len(exclude)), lengths)
    items = (np.concatenate([np.asarray(e, dtype=np.int64).ravel() for e in exclude])
             if lengths.sum() else np.zeros(0, np.int64))
    if items.size and (items.min() < 0 or items.max() >= n_items):
        raise ValueError(f"exclude holds item ids outside [0, {n_items})")
    return rows, items


def _binary_labels(labels: np.ndarray, n: int) -> np.ndarray:
    y = np.asarray(labels, dtype=np.float64).ravel()
    if y.size != n:
        raise ValueError(f"labels and scores differ in size: {y.size} vs {n}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    return y


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with tied values given the mean of their ranks."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)
    return ((upper - counts + 1 + upper) / 2.0)[inverse]


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney U statistic, tied scores counting one half.

    AUC = (R+ - n+(n+ + 1)/2) / (n+ n-), R+ the sum of the positives' average ranks
    (Hanley & McNeil 1982, "The meaning and use of the area under a ROC curve").
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = _binary_labels(labels, s.size)
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    n_pos = float(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("auc needs at least one positive and one negative label")
    rank_sum = float(_average_ranks(s)[y == 1.0].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def log_loss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy; probabilities are clipped to [eps, 1 - eps] so it stays finite."""
    p = np.asarray(probs, dtype=np.float64).ravel()
    y = _binary_labels(labels, p.size)
    if not 0.0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps}")
    if p.size == 0:
        raise ValueError("log_loss needs at least one prediction")
    if np.isnan(p).any() or p.min() < 0.0 or p.max() > 1.0:
        raise ValueError("probs must be probabilities in [0, 1]; apply a sigmoid to logits first")
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def sample_negatives(
    user_items: Sequence[np.ndarray], num_items: int, n: int = 99, *, rng: np.random.Generator
) -> np.ndarray:
    """int64 (U, n): per user, ``n`` distinct items it never interacted with.

    ``user_items[u]`` must hold the user's items from *every* split, so no negative is in fact a
    positive. Sampling is uniform without replacement over the unseen items.
    """
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    out = np.empty((len(user_items), n), dtype=np.int64)
    for u, items in enumerate(user_items):
        seen = np.zeros(num_items, dtype=bool)
        idx = np.asarray(items, dtype=np.int64).ravel()
        if idx.size and (idx.min() < 0 or idx.max() >= num_items):
            raise ValueError(f"user {u} has item ids outside [0, {num_items})")
        seen[idx] = True
        pool = np.flatnonzero(~seen)
        if pool.size < n:
            raise ValueError(f"user {u} has only {pool.size} unseen items, fewer than the {n} "
                             "negatives requested; lower n or drop the user")
        out[u] = rng.choice(pool, size=n, replace=False)
    return out


def metric_key(name: str, k: int) -> str:
    """The canonical key of a cut-off metric, e.g. ``metric_key("ndcg", 10) == "ndcg@10"``."""
    return f"{name}@{k}"


def summarize(per_user: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Mean over users of each per-user metric array (NaN for an empty array)."""
    return {key: float(np.mean(v)) if np.size(v) else float("nan") for key, v in per_user.items()}
