"""Fixed-length recent-history arrays for sequence models, numpy only.

Time context follows the calendar in UTC: weekday (Monday = 0) and a 4-hour bucket.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedrec.data.errors import DataError
from fedrec.data.split import chronological_order, rank_from_end

CONTEXT_CARDS = (7, 6)  # weekday, 4-hour bucket of the day
SECONDS_PER_DAY = 86_400
EPOCH_WEEKDAY = 3  # 1970-01-01 was a Thursday


@dataclass(frozen=True)
class Sequences:
    """Per row: a user's most recent ``L`` items, oldest first, right-padded with 0."""

    users: np.ndarray    # int64 (N,)
    items: np.ndarray    # int64 (N, L)
    mask: np.ndarray     # bool (N, L), True on real items
    context: np.ndarray  # int64 (N, L, 2), weekday and hour bucket; 0 where padded


def context_of(timestamps: np.ndarray) -> np.ndarray:
    """int64 (..., 2): UTC weekday (0 = Monday) and hour bucket (0-5) of Unix seconds."""
    ts = np.asarray(timestamps, dtype=np.int64)
    weekday = (ts // SECONDS_PER_DAY + EPOCH_WEEKDAY) % 7
    bucket = (ts % SECONDS_PER_DAY) // (4 * 3600)
    return np.stack([weekday, bucket], axis=-1).astype(np.int64)


def _require(interactions: pd.DataFrame, columns: tuple[str, ...]) -> None:
    for col in columns:
        if col not in interactions.columns:
            raise DataError(f"interactions: column {col!r} is missing; "
                            "pass Dataset.interactions or a Split frame")


def _all_present(interactions: pd.DataFrame, max_len: int) -> Sequences:
    """Sequences for every user present, users ascending."""
    ordered = interactions.iloc[chronological_order(interactions)]
    user = ordered["user"].to_numpy(np.int64)
    rank, count = rank_from_end(user)
    keep = rank < max_len
    present, row = np.unique(user, return_inverse=True)
    col = np.minimum(count, max_len) - 1 - rank
    n = len(present)
    items = np.zeros((n, max_len), dtype=np.int64)
    mask = np.zeros((n, max_len), dtype=bool)
    context = np.zeros((n, max_len, 2), dtype=np.int64)
    items[row[keep], col[keep]] = ordered["item"].to_numpy(np.int64)[keep]
    mask[row[keep], col[keep]] = True
    context[row[keep], col[keep]] = context_of(ordered["timestamp"].to_numpy()[keep])
    return Sequences(present, items, mask, context)


def _with_empty_row(a: np.ndarray) -> np.ndarray:
    return np.concatenate([a, np.zeros((1, *a.shape[1:]), dtype=a.dtype)])


def build_sequences(interactions: pd.DataFrame, max_len: int,
                    users: np.ndarray | None = None) -> Sequences:
    """One row per user present (ascending), or per entry of ``users`` in that order.

    Users in ``users`` without interactions get an all-False mask; order within a user
    is by timestamp, ties by row order.
    """
    if max_len < 1:
        raise DataError(f"build_sequences: max_len must be >= 1 (got {max_len}); "
                        "set the model's max sequence length")
    _require(interactions, ("user", "item", "timestamp"))
    full = _all_present(interactions, max_len)
    if users is None:
        return full
    wanted = np.asarray(users, dtype=np.int64)
    pos = np.searchsorted(full.users, wanted)
    found = pos < len(full.users)
    found[found] = full.users[pos[found]] == wanted[found]
    rows = np.where(found, pos, len(full.users))  # points at the empty row appended below
    return Sequences(wanted, _with_empty_row(full.items)[rows],
                     _with_empty_row(full.mask)[rows], _with_empty_row(full.context)[rows])


def user_item_sets(interactions: pd.DataFrame, n_users: int) -> list[np.ndarray]:
    """Per user 0..n_users-1, the sorted distinct items they have in ``interactions``
    (to exclude already-seen items when ranking)."""
    _require(interactions, ("user", "item"))
    user = interactions["user"].to_numpy(np.int64)
    if len(user) and (user.min() < 0 or user.max() >= n_users):
        raise DataError(f"interactions: user indices outside [0, {n_users}); "
                        "pass n_users=Dataset.num_users")
    pairs = np.unique(np.stack([user, interactions["item"].to_numpy(np.int64)], axis=1), axis=0)
    bounds = np.searchsorted(pairs[:, 0], np.arange(n_users + 1))
    return [pairs[bounds[u]:bounds[u + 1], 1] for u in range(n_users)]
