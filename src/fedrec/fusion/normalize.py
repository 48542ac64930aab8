"""Per-user score normalisations that put task models on a common scale before fusion.

Task models score on unrelated scales (dot products, logits, cosine / temperature), so a linear
fusion of raw scores lets the widest-ranging task dominate (Fox & Shaw 1994, "Combination of
Multiple Searches"; Montague & Aslam 2001, "Relevance Score Normalization for Metasearch").
Each method works on one user's candidate row at a time, so it never mixes users and can run
on a client:

* ``zscore``: subtract the row mean, divide by the row standard deviation (a constant row -> 0);
* ``rank``: the row's average ranks scaled to [0, 1], 1 for the best candidate (scale free);
* ``sigmoid``: ``1 / (1 + exp(-s))``, the calibrated probability of a model trained on logits;
* ``none``: the raw scores.
"""

from __future__ import annotations

import numpy as np

NORMALIZATIONS: tuple[str, ...] = ("zscore", "rank", "sigmoid", "none")
"""Supported methods, in the order used to break ties when one is chosen by validation."""


def normalize(scores: np.ndarray, method: str) -> np.ndarray:
    """float64 (U, N): ``scores`` (U, N) normalised per user with ``method``."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be 2-D (users, candidates), got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite to be normalised; check the task model")
    if method == "zscore":
        return zscore(s)
    if method == "rank":
        return rank01(s)
    if method == "sigmoid":
        return 0.5 * (1.0 + np.tanh(0.5 * s))  # the logistic function, without overflow
    if method == "none":
        return s.copy()
    raise ValueError(f"unknown normalization {method!r}; choose one of {NORMALIZATIONS}")


def zscore(scores: np.ndarray) -> np.ndarray:
    """Per-row standard scores; rows with zero spread map to 0 (they carry no ranking)."""
    centred = scores - scores.mean(axis=1, keepdims=True)
    sd = scores.std(axis=1, keepdims=True)
    return np.divide(centred, sd, out=np.zeros_like(centred), where=sd > 0)


def rank01(scores: np.ndarray) -> np.ndarray:
    """Per-row average ranks (ties share their mean rank) scaled to [0, 1]; one column -> 0.5."""
    n_rows, n_cols = scores.shape
    if n_cols == 1:
        return np.full_like(scores, 0.5)
    order = np.argsort(scores, axis=1, kind="stable")
    srt = np.take_along_axis(scores, order, axis=1)
    pos = np.broadcast_to(np.arange(n_cols), scores.shape)
    differs = srt[:, 1:] != srt[:, :-1]
    edge = np.ones((n_rows, 1), dtype=bool)
    starts = np.where(np.hstack([edge, differs]), pos, 0)
    first = np.maximum.accumulate(starts, axis=1)
    ends = np.where(np.hstack([differs, edge]), pos, n_cols - 1)
    last = np.minimum.accumulate(ends[:, ::-1], axis=1)[:, ::-1]
    out = np.empty_like(scores)
    np.put_along_axis(out, order, (first + last) / (2.0 * (n_cols - 1)), axis=1)
    return out
