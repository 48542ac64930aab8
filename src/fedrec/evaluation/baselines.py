"""Item popularity: the non-personalised baseline every recommender must beat.

A popularity ranker is surprisingly strong on MovieLens under the sampled protocol (Krichene &
Rendle 2020), so reporting it beside each model shows how much personalisation adds.
"""

from __future__ import annotations

import numpy as np


def popularity_scores(train_items: np.ndarray, num_items: int) -> np.ndarray:
    """float64 (I,): how often each item occurs among the training interactions."""
    items = np.asarray(train_items).ravel()
    if num_items < 1:
        raise ValueError(f"num_items must be positive, got {num_items}")
    if items.size and not np.issubdtype(items.dtype, np.integer):
        raise ValueError(f"train_items must be integer item ids, got {items.dtype}")
    if items.size and (items.min() < 0 or items.max() >= num_items):
        raise ValueError(f"train_items hold item ids outside [0, {num_items})")
    return np.bincount(items.astype(np.int64), minlength=num_items).astype(np.float64)


class PopularityScorer:
    """A ``score_fn`` that scores every candidate by its training popularity, ignoring the user."""

    def __init__(self, train_items: np.ndarray, num_items: int) -> None:
        self.counts = popularity_scores(train_items, num_items)  # (I,)

    def __call__(self, user_rows: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """float64 (b, N): the popularity of each candidate item."""
        return self.counts[np.asarray(candidates, dtype=np.int64)]
