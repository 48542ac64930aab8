"""A small synthetic catalogue with a known answer, for contract tests of every task model.

Items fall into groups of ``group_size`` consecutive ids; each user cycles through one group in
order: after item ``g * s + j`` comes ``g * s + (j + 1) % s``. The history's set of items names
the group (so pooled-history models can put the whole group in their top ``group_size``), and
its last item names the exact next one (so a sequential model can rank it first).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedrec.models.base import ModelSpec


@dataclass(frozen=True)
class CyclicUsers:
    """Right-padded histories (oldest first) and features of synthetic users, aligned by row."""

    spec: ModelSpec
    items: np.ndarray  # int64 [U, L]
    mask: np.ndarray  # bool [U, L]
    feats: np.ndarray  # int64 [U, F]
    ctx: np.ndarray  # int64 [U, L, C]


def cyclic_users(
    num_users: int,
    *,
    seed: int,
    num_items: int = 60,
    group_size: int = 5,
    length: int = 12,
    min_len: int = 2,
    dim: int = 32,
) -> CyclicUsers:
    """``num_users`` users with ``min_len`` to ``length`` interactions each (see module doc)."""
    if num_items % group_size or not 1 <= min_len <= length:
        raise ValueError("num_items must be a multiple of group_size and 1 <= min_len <= length")
    rng = np.random.default_rng(seed)
    group = rng.integers(0, num_items // group_size, num_users)
    start = rng.integers(0, group_size, num_users)
    steps = (start[:, None] + np.arange(length)[None, :]) % group_size  # (U, L)
    items = (group[:, None] * group_size + steps).astype(np.int64)
    n = rng.integers(min_len, length + 1, num_users)
    mask = np.arange(length)[None, :] < n[:, None]
    items = np.where(mask, items, 0)
    spec = ModelSpec(
        num_items=num_items,
        item_category=tuple(int(i % 6) for i in range(num_items)),
        num_categories=6,
        user_feature_cards=(3, 4),
        context_cards=(7,),
        max_len=length + 8,  # room for padding-invariance tests
        dim=dim,
    )
    feats = np.stack([rng.integers(0, c, num_users) for c in spec.user_feature_cards], 1)
    ctx = rng.integers(0, 7, (num_users, length, 1))
    return CyclicUsers(spec, items, mask, feats.astype(np.int64), ctx.astype(np.int64))


def hold_out_last(items: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split off each row's last interaction: (history items, history mask, target int[U]).
    Rows need at least one interaction; a row with one keeps an empty history."""
    n = mask.sum(1)
    if (n < 1).any():
        raise ValueError("every row needs at least one interaction to hold out")
    rows = np.arange(len(items))
    target = items[rows, n - 1]
    hist_mask = mask.copy()
    hist_mask[rows, n - 1] = False
    return np.where(hist_mask, items, 0), hist_mask, target
