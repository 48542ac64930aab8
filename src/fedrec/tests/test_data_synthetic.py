"""Synthetic e-commerce data: valid, deterministic, and carrying the structure it promises."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedrec.data import DataError, Dataset, synthetic_ecommerce, validate_dataset
from fedrec.data.synthetic import _catalogues


def small(seed: int) -> Dataset:
    return synthetic_ecommerce(n_users=60, n_items=80, seed=seed)


def test_default_shape_and_contract() -> None:
    ds = synthetic_ecommerce(seed=0)
    validate_dataset(ds)
    assert (ds.num_users, ds.num_items, ds.num_categories) == (400, 300, 8)
    per_user = ds.interactions.groupby("user").size()
    assert per_user.min() >= 5 and per_user.max() <= 40 and len(per_user) == 400
    assert ds.user_features == ("segment",)
    assert set(ds.users["segment"]) == {"budget", "regular", "premium"}
    assert sorted(ds.interactions["site"].unique()) == [f"merchant-{m}" for m in range(4)]
    assert (ds.items["price"] > 0).all()
    assert ds.items["title"][0].split()[-2] == "by"  # "<Adjective> <noun> by <Brand>"


def test_deterministic_given_seed() -> None:
    a, b, c = small(1), small(1), small(2)
    pd.testing.assert_frame_equal(a.interactions, b.interactions)
    pd.testing.assert_frame_equal(a.items, b.items)
    assert not a.interactions.equals(c.interactions)


def test_each_user_one_merchant_distinct_items_increasing_time() -> None:
    inter = small(3).interactions
    by_user = inter.groupby("user")
    assert (by_user["site"].nunique() == 1).all()
    assert (by_user["item"].nunique() == by_user.size()).all()
    assert by_user["timestamp"].apply(lambda t: bool(np.all(np.diff(t) > 0))).all()


def test_catalogues_overlap_and_cover_everything() -> None:
    cats = _catalogues(np.random.default_rng(0), 10, 4)
    assert [len(c) for c in cats] == [4, 4, 4, 4]  # ceil(1.5 * 10 / 4)
    assert set(np.concatenate(cats)) == set(range(10))
    ds = small(4)
    items_of_site = ds.interactions.groupby("site")["item"].apply(set)
    assert len(items_of_site["merchant-0"] & items_of_site["merchant-1"]) > 0


def test_sequences_stay_in_category_more_than_chance() -> None:
    ds = synthetic_ecommerce(n_users=200, seed=5)
    cat = ds.items["category_index"].to_numpy()[ds.interactions["item"].to_numpy()]
    user = ds.interactions["user"].to_numpy()
    same_user = user[1:] == user[:-1]
    stay = np.mean(cat[1:][same_user] == cat[:-1][same_user])
    assert stay > 0.5  # about 0.6 stickiness + chance; random would be about 1/8


def test_popularity_is_long_tailed() -> None:
    counts = np.sort(synthetic_ecommerce(seed=6).interactions["item"].value_counts().to_numpy())
    top_decile = counts[-len(counts) // 10:].sum() / counts.sum()
    assert top_decile > 0.25


def test_any_size_and_bad_settings() -> None:
    tiny = synthetic_ecommerce(n_merchants=1, n_users=1, n_items=1, n_categories=1,
                               interactions_per_user=(1, 1), seed=0)
    assert len(tiny.interactions) == 1
    many = synthetic_ecommerce(n_users=30, n_items=40, n_categories=20, seed=0)
    assert "apparel-2" in set(many.items["category"])
    with pytest.raises(DataError, match=r"n_users must be >= n_merchants"):
        synthetic_ecommerce(n_merchants=5, n_users=3)
    with pytest.raises(DataError, match=r"interactions_per_user"):
        synthetic_ecommerce(interactions_per_user=(4, 2))
