"""Turn numpy arrays of user histories into the models' batches, sampling training negatives.

Negatives are drawn uniformly over the catalogue, independently per user and position, so a
user's loss depends on no other user in the batch (per-example DP clipping needs that).
"""

from __future__ import annotations

import numpy as np
import torch

from fedrec.models.base import SequenceBatch, UserBatch

_RESAMPLE_ROUNDS = 8


def make_user_batch(
    items: np.ndarray, mask: np.ndarray, feats: np.ndarray, context: np.ndarray
) -> UserBatch:
    """A ``UserBatch`` from items int[B, L] (right-padded), mask bool[B, L], feats int[B, F]
    and request context int[B, C]."""
    items_t, mask_t = _history(items, mask)
    b = items_t.shape[0]
    return UserBatch(items_t, mask_t, _rows(feats, "feats", b), _rows(context, "context", b))


def make_sequence_batch(
    items: np.ndarray,
    mask: np.ndarray,
    feats: np.ndarray,
    ctx: np.ndarray,
    num_items: int,
    k_neg: int,
    generator: torch.Generator,
    *,
    resample_hits: bool = False,
) -> SequenceBatch:
    """A training ``SequenceBatch`` with ``k_neg`` uniform negatives in [0, num_items) per position.

    ctx int[B, L, C] is the context of each interaction; ``users.context`` is set to the context
    of each user's last interaction. A negative may equal the true next item (chance about
    ``k_neg / num_items``); the models drop such accidental hits from the loss, and
    ``resample_hits`` redraws them (a few rounds; they may remain when ``num_items`` is tiny).
    """
    if num_items < 1 or k_neg < 1:
        raise ValueError(f"need num_items >= 1 and k_neg >= 1, got {num_items} and {k_neg}")
    items_t, mask_t = _history(items, mask)
    ctx_t = _long(ctx, "ctx", 3)
    b, length = items_t.shape
    if ctx_t.shape[:2] != (b, length):
        raise ValueError(f"ctx must be [B, L, C] with B, L = {b}, {length}, got {tuple(ctx_t.shape)}")
    if bool(((items_t < 0) | (items_t >= num_items))[mask_t].any()):
        raise ValueError(f"item ids must lie in [0, {num_items})")
    negatives = torch.randint(0, num_items, (b, length, k_neg), generator=generator)  # (B, L, K)
    if resample_hits:
        negatives = _resample_hits(negatives, items_t, num_items, generator)
    last = torch.where(mask_t, torch.arange(length).expand(b, length), 0).amax(1)  # (B,)
    users = UserBatch(items_t, mask_t, _rows(feats, "feats", b), ctx_t[torch.arange(b), last])
    return SequenceBatch(users, ctx_t, negatives)


def _resample_hits(
    negatives: torch.Tensor, items: torch.Tensor, num_items: int, generator: torch.Generator
) -> torch.Tensor:
    """Redraw negatives equal to the next item (the target of their position)."""
    target = torch.cat([items[:, 1:], items[:, -1:]], 1).unsqueeze(-1)  # (B, L, 1)
    for _ in range(_RESAMPLE_ROUNDS):
        hits = negatives == target
        if not bool(hits.any()):
            break
        fresh = torch.randint(0, num_items, negatives.shape, generator=generator)
        negatives = torch.where(hits, fresh, negatives)
    return negatives


def _history(items: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    items_t = _long(items, "items", 2)
    mask_np = np.asarray(mask)
    if mask_np.shape != tuple(items_t.shape):
        raise ValueError(f"mask must have the shape of items {tuple(items_t.shape)}, "
                         f"got {mask_np.shape}")
    mask_t = torch.from_numpy(mask_np.astype(bool, copy=True))
    if bool((mask_t[:, 1:] & ~mask_t[:, :-1]).any()):
        raise ValueError("histories must be right-padded: mask True on a prefix of each row")
    return items_t, mask_t


def _rows(a: np.ndarray, name: str, b: int) -> torch.Tensor:
    t = _long(a, name, 2)
    if t.shape[0] != b:
        raise ValueError(f"{name} needs {b} rows like items, got {t.shape[0]}")
    return t


def _long(a: np.ndarray, name: str, ndim: int) -> torch.Tensor:
    arr = np.asarray(a)
    if arr.ndim != ndim or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be an integer array with {ndim} dimensions, "
                         f"got {arr.dtype} with shape {arr.shape}")
    return torch.from_numpy(arr.astype(np.int64, copy=True))
