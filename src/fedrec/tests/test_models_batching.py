"""Batching of numpy histories into model batches, with uniform per-position negatives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrec.models.batching import make_sequence_batch, make_user_batch
from fedrec.models.synthetic import cyclic_users


def _make(seed: int, **kwargs: object):
    data = cyclic_users(32, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    args = (data.items, data.mask, data.feats, data.ctx, 60, 5, gen)
    return data, make_sequence_batch(*args, **kwargs)  # type: ignore[arg-type]


def test_sequence_batch_shapes_and_types() -> None:
    data, batch = _make(0)
    u = batch.users
    assert u.items.dtype == torch.long and u.mask.dtype == torch.bool
    assert u.items.shape == (32, 12) and u.feats.shape == (32, 2) and u.context.shape == (32, 1)
    assert batch.context.shape == (32, 12, 1) and batch.negatives.shape == (32, 12, 5)
    assert int(batch.negatives.min()) >= 0 and int(batch.negatives.max()) < 60
    last = data.mask.sum(1) - 1
    assert np.array_equal(u.context.numpy(), data.ctx[np.arange(32), last])


def test_negatives_follow_the_generator() -> None:
    _, a = _make(1)
    _, b = _make(1)
    assert torch.equal(a.negatives, b.negatives)


def test_resampling_removes_accidental_hits() -> None:
    data = cyclic_users(64, seed=2, num_items=5, group_size=5)
    gen = torch.Generator().manual_seed(2)
    batch = make_sequence_batch(data.items, data.mask, data.feats, data.ctx, 5, 4, gen,
                                resample_hits=True)
    target = torch.as_tensor(data.items[:, 1:])[..., None]
    valid = torch.as_tensor(data.mask[:, 1:])
    hits = (batch.negatives[:, :-1] == target)[valid]
    assert hits.float().mean() < 0.01  # about 0.2 without resampling


def test_rejects_bad_input() -> None:
    data = cyclic_users(4, seed=3)
    gen = torch.Generator().manual_seed(3)
    holes = data.mask.copy()
    holes[0, 0] = False
    with pytest.raises(ValueError, match="right-padded"):
        make_sequence_batch(data.items, holes, data.feats, data.ctx, 60, 3, gen)
    with pytest.raises(ValueError, match="k_neg"):
        make_sequence_batch(data.items, data.mask, data.feats, data.ctx, 60, 0, gen)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        make_sequence_batch(data.items, data.mask, data.feats, data.ctx, 10, 3, gen)
    with pytest.raises(ValueError, match="feats"):
        make_user_batch(data.items, data.mask, data.feats[:2], data.ctx[:, 0])
    with pytest.raises(ValueError, match="integer"):
        make_user_batch(data.items.astype(float), data.mask, data.feats, data.ctx[:, 0])
