"""Per-user temporal leave-last-out split (the standard protocol for sequential
recommendation, e.g. SASRec, Kang & McAuley, ICDM 2018)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedrec.data.errors import DataError

log = logging.getLogger(__name__)

MIN_EVENTS = 3  # one each for train, valid and test


@dataclass(frozen=True)
class Split:
    """Train/valid/test interactions; same columns as the input, rows in (user, time) order."""

    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame


def chronological_order(interactions: pd.DataFrame) -> np.ndarray:
    """Row positions sorted by (user, timestamp, original row order)."""
    for col in ("user", "timestamp"):
        if col not in interactions.columns:
            raise DataError(f"interactions: column {col!r} is missing; "
                            "pass Dataset.interactions or a frame with user and timestamp")
    return np.lexsort((np.arange(len(interactions)), interactions["timestamp"].to_numpy(),
                       interactions["user"].to_numpy()))


def rank_from_end(users_sorted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows grouped by user: (0 for a user's last row, 1 for the one before, ...;
    the user's number of rows)."""
    starts = np.flatnonzero(np.r_[True, users_sorted[1:] != users_sorted[:-1]])
    counts = np.diff(np.r_[starts, len(users_sorted)])
    count = np.repeat(counts, counts)
    position = np.arange(len(users_sorted)) - np.repeat(starts, counts)
    return count - 1 - position, count


def leave_last_out(interactions: pd.DataFrame) -> Split:
    """Each user's last event is test, the one before is valid, the rest train.

    Order is by timestamp, ties by original row order. Users with fewer than three events
    keep them all in train (they still shape the model but are not evaluated).
    """
    ordered = interactions.iloc[chronological_order(interactions)].reset_index(drop=True)
    rank, count = rank_from_end(ordered["user"].to_numpy())
    evaluable = count >= MIN_EVENTS
    short = len(np.unique(ordered["user"].to_numpy()[~evaluable]))
    if short:
        log.info("leave_last_out: %d users with fewer than %d events stay in train only",
                 short, MIN_EVENTS)
    test, valid = evaluable & (rank == 0), evaluable & (rank == 1)
    train = ~(test | valid)
    return Split(*(ordered[m].reset_index(drop=True) for m in (train, valid, test)))
