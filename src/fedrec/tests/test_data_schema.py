"""Dataset contract: id remapping, validation and user feature codes, by hand."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from fedrec.data import DataError, Dataset, build_dataset, validate_dataset


def raw_tables() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    inter = pd.DataFrame({"user": ["b", "a", "b", "a"], "item": [20, 10, 10, 30],
                          "timestamp": [5, 9, 1, 2], "rating": [4, 3, 5, 1]})
    items = pd.DataFrame({"item_id": [30, 10, 20], "title": ["Z", "X", None],
                          "genres": ["Drama", "Comedy|Drama", "Action"], "price": [1.5, None, 2]})
    users = pd.DataFrame({"user_id": ["a", "b"], "gender": ["F", None]})
    return inter, items, users


def test_build_remaps_ids_in_side_table_order() -> None:
    ds = build_dataset("toy", *raw_tables(), user_features=("gender",))
    # items: 30->0, 10->1, 20->2; users: a->0, b->1; rows sorted by (user, timestamp)
    assert ds.interactions["user"].tolist() == [0, 0, 1, 1]
    assert ds.interactions["item"].tolist() == [0, 1, 1, 2]
    assert ds.interactions["timestamp"].tolist() == [2, 9, 1, 5]
    assert ds.interactions["rating"].tolist() == [1.0, 3.0, 5.0, 4.0]
    assert ds.interactions["rating"].dtype == np.float32
    assert ds.items["item_id"].tolist() == ["30", "10", "20"]
    assert ds.items["title"].tolist() == ["Z", "X", "20"]  # missing title falls back to id
    assert ds.items["category"].tolist() == ["Drama", "Comedy", "Action"]
    assert ds.items["category_index"].tolist() == [2, 1, 0]  # sorted: Action, Comedy, Drama
    assert ds.items["text"].tolist()[1] == "X | Comedy|Drama"
    assert np.isnan(ds.items["price"][1]) and ds.items["price"][0] == 1.5
    assert ds.users["gender"].tolist() == ["F", "unknown"]
    assert (ds.num_users, ds.num_items, ds.num_categories) == (2, 3, 3)


def test_feature_codes_follow_sorted_values() -> None:
    inter = pd.DataFrame({"user": [1, 2, 3], "item": [1, 1, 1], "timestamp": [0, 0, 0]})
    users = pd.DataFrame({"user_id": [1, 2, 3], "occ": ["z", "a", "z"], "g": ["M", "M", "F"]})
    ds = build_dataset("toy", inter, None, users, ("occ", "g"))
    assert ds.user_feature_codes().tolist() == [[1, 1], [0, 1], [1, 0]]
    assert ds.user_feature_cards() == (2, 2)
    assert ds.user_feature_values() == {"occ": ["a", "z"], "g": ["F", "M"]}
    assert ds.interactions["rating"].tolist() == [1.0, 1.0, 1.0]  # implicit default


def test_without_side_tables_ids_sort_naturally() -> None:
    inter = pd.DataFrame({"user": [10, 9], "item": ["b", "a"], "timestamp": [1.7, 2.2]})
    ds = build_dataset("toy", inter)
    assert ds.users["user_id"].tolist() == ["9", "10"]  # numeric, not text, order
    assert ds.items["item_id"].tolist() == ["a", "b"]
    assert ds.interactions["timestamp"].tolist() == [2, 1]  # floored seconds, user 9 first
    assert ds.user_feature_codes().shape == (2, 0)


def test_datetime_timestamps_become_unix_seconds() -> None:
    inter = pd.DataFrame({"user": [1], "item": [1],
                          "timestamp": pd.to_datetime(["1970-01-02 00:00:01"])})
    assert build_dataset("toy", inter).interactions["timestamp"].tolist() == [86401]


def test_unknown_ids_name_count_and_examples() -> None:
    inter, items, users = raw_tables()
    inter.loc[len(inter)] = ["a", 99, 3, 1]
    with pytest.raises(DataError, match=r"1 rows have item ids missing .* '99'"):
        build_dataset("toy", inter, items, users)


@pytest.mark.parametrize(("table", "column", "value", "message"), [
    ("inter", "timestamp", "soon", r"column 'timestamp': non-numeric values such as 'soon'"),
    ("inter", "rating", None, r"column 'rating': 1 values are missing"),
    ("inter", "user", None, r"column 'user': 1 ids are missing"),
    ("items", "item_id", 10, r"items: 1 duplicate ids such as '10'"),
    ("items", "price", "$3", r"non-numeric prices such as '\$3'"),
])
def test_bad_raw_values_raise_one_line(table: str, column: str, value: object,
                                       message: str) -> None:
    tables = dict(zip(("inter", "items", "users"), raw_tables(), strict=True))
    frame = tables[table].astype({column: object})
    frame.loc[0, column] = value
    tables[table] = frame
    with pytest.raises(DataError, match=message) as info:
        build_dataset("toy", tables["inter"], tables["items"], tables["users"])
    assert "\n" not in str(info.value)


def test_missing_column_and_empty_interactions() -> None:
    inter, items, users = raw_tables()
    with pytest.raises(DataError, match=r"column 'timestamp' is missing; .*rename the file's column"):
        build_dataset("toy", inter.drop(columns="timestamp"))
    with pytest.raises(DataError, match=r"no interactions"):
        build_dataset("toy", inter.iloc[:0], items, users)


def test_validate_catches_broken_contract() -> None:
    ds = build_dataset("toy", *raw_tables())
    bad_item = ds.interactions.assign(item=ds.interactions["item"].replace(2, 3))
    with pytest.raises(DataError, match=r"'item' has 1 indices outside \[0, 3\)"):
        validate_dataset(dataclasses.replace(ds, interactions=bad_item))
    unsorted = ds.interactions.iloc[::-1].reset_index(drop=True)
    with pytest.raises(DataError, match=r"sorted by"):
        validate_dataset(dataclasses.replace(ds, interactions=unsorted))
    dup_users = ds.users.assign(user_id=["a", "a"])
    with pytest.raises(DataError, match=r"duplicate ids"):
        validate_dataset(dataclasses.replace(ds, users=dup_users))
    text_ts = ds.interactions.assign(timestamp=ds.interactions["timestamp"].astype(str))
    with pytest.raises(DataError, match=r"must be int64 Unix seconds"):
        validate_dataset(dataclasses.replace(ds, interactions=text_ts))
    nan_title = ds.items.assign(title=[None, "X", "Y"])
    with pytest.raises(DataError, match=r"'title' has 1 missing"):
        validate_dataset(dataclasses.replace(ds, items=nan_title))


def test_repr_is_short() -> None:
    ds = build_dataset("toy", *raw_tables())
    assert isinstance(ds, Dataset)
    assert repr(ds) == "Dataset('toy', users=2, items=3, interactions=4, categories=3)"


def test_an_event_logged_twice_is_kept_once(caplog) -> None:
    """A repeated last event would be its own held-out item's history."""
    inter, items, users = raw_tables()
    doubled = pd.concat([inter, inter.iloc[[0]]], ignore_index=True)
    with caplog.at_level("WARNING", logger="fedrec.data.schema"):
        ds = build_dataset("dup", doubled, items, users)
    assert len(ds.interactions) == len(inter)
    assert "1 rows repeat" in caplog.text


def test_ids_are_stripped_any_size_and_sub_second_order_is_kept() -> None:
    """' 1' was another user than '1'; an id of 2^64 crashed the sort; events 0.1 s, 5.9 s
    and 5.3 s apart (file order a, c, b) held out b, floored to the same second as c."""
    inter = pd.DataFrame({
        "user": [" 1", "1", "1", str(2**64)],
        "item": ["a", "c", "b", "a"],
        "timestamp": [0.1, 5.9, 5.3, 1.0],
    })
    ds = build_dataset("fine", inter)
    assert ds.users["user_id"].tolist() == ["1", str(2**64)]
    mine = ds.interactions[ds.interactions["user"] == 0]
    items = ds.items["item_id"].to_numpy()
    assert items[mine["item"].to_numpy()].tolist() == ["a", "b", "c"]  # c is the latest
