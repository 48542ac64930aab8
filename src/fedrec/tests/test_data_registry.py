"""load_dataset dispatch: names, synthetic specs, folders and files (nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from fedrec.data import DataError, load_dataset
from fedrec.data.movielens import PARQUET_FILES
from fedrec.tests.test_data_movielens import write_grouplens, write_parquet


def test_synthetic_names_and_options() -> None:
    ds = load_dataset("synthetic:merchants=3,users=50,items=40,categories=5,interactions=2-4",
                      seed=7)
    assert (ds.num_users, ds.num_items, ds.num_categories) == (50, 40, 5)
    assert ds.interactions["site"].nunique() == 3
    assert ds.interactions.groupby("user").size().between(2, 4).all()
    again = load_dataset("synthetic:merchants=3,users=50,items=40,categories=5,interactions=2-4",
                         seed=7)
    pd.testing.assert_frame_equal(ds.interactions, again.interactions)


@pytest.mark.parametrize(("name", "message"), [
    ("synthetic:colour=red", "unknown option 'colour'"),
    ("synthetic:users=many", "'users=many' needs an integer value"),
    ("movielens-1m", "not a known name .* use one of ml-100k, synthetic"),
])
def test_bad_names(name: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_dataset(name)


def test_folders_and_files(tmp_path: Path) -> None:
    text = load_dataset(str(write_grouplens(tmp_path / "ml")))
    parquet = load_dataset(str(write_parquet(tmp_path / "pq")))
    pd.testing.assert_frame_equal(text.interactions, parquet.interactions)
    tables = tmp_path / "shop"
    tables.mkdir()
    (tables / "interactions.csv").write_text("u,i,t\n1,a,5\n2,b,6\n")
    (tables / "users.csv").write_text("u,tier\n1,gold\n2,basic\n")
    ds = load_dataset(str(tables), columns={"user": "u", "item": "i", "timestamp": "t"})
    assert ds.user_features == ("tier",) and ds.num_items == 2
    single = load_dataset(str(tables / "interactions.csv"),
                          columns={"user": "u", "item": "i", "timestamp": "t"})
    assert single.name == "interactions" and single.user_features == ()
    with pytest.raises(DataError, match=r"no u.data, ML-100K Parquet files or interactions"):
        load_dataset(str(tmp_path / "ml" / ".."))


def test_ml100k_uses_the_cache_without_fetching(tmp_path: Path) -> None:
    cache = write_parquet(tmp_path / "cache")
    assert sorted(p.name for p in cache.iterdir()) == sorted(PARQUET_FILES.values())
    assert load_dataset("ml-100k", cache_dir=cache).num_users == 3
