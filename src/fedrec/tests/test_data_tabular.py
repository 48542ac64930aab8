"""CSV/Parquet loading with column mappings, and the errors users will actually hit."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from fedrec.data import DataError, load_table

EVENTS = "customer,sku,ts,stars,shop\nc2,007,30,4,s1\nc1,010,20,5,s1\nc2,010,10,3,s2\n"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


MAPPING = {"user": "customer", "item": "sku", "timestamp": "ts", "rating": "stars",
           "site": "shop"}


def test_csv_with_mapping_and_side_tables(tmp_path: Path) -> None:
    events = write(tmp_path, "events.csv", EVENTS)
    items = write(tmp_path, "items.csv", "sku,title,category,price\n010,Mug,home,3.5\n007,Hat,,\n")
    users = write(tmp_path, "users.csv", "customer,region\nc1,north\nc2,south\n")
    ds = load_table(events, items, users, MAPPING)
    assert ds.name == "events"
    assert ds.items["item_id"].tolist() == ["010", "007"]  # leading zeros kept
    assert ds.items["category"].tolist() == ["home", "unknown"]
    assert ds.user_features == ("region",)
    assert ds.interactions[["user", "item", "timestamp"]].to_numpy().tolist() == [
        [0, 0, 20], [1, 0, 10], [1, 1, 30]]
    assert ds.interactions["site"].tolist() == ["s1", "s2", "s1"]
    assert ds.interactions["rating"].tolist() == [5.0, 3.0, 4.0]


def test_parquet_with_default_names(tmp_path: Path) -> None:
    frame = pd.DataFrame({"user": [5, 5, 6], "item": [1, 2, 1], "timestamp": [3, 1, 2]})
    frame.to_parquet(tmp_path / "log.parquet")
    ds = load_table(tmp_path / "log.parquet")
    assert (ds.num_users, ds.num_items) == (2, 2)
    assert ds.interactions["item"].tolist() == [1, 0, 0]
    assert "site" not in ds.interactions and ds.interactions["rating"].eq(1.0).all()


@pytest.mark.parametrize(("text", "columns", "message"), [
    (EVENTS, {"user": "customer", "item": "sku"},
     r"events.csv: column 'timestamp' \(timestamp\) is missing .* columns=\{'timestamp': '<name>'\}"),
    (EVENTS.replace(",30,", ",noon,"), MAPPING,
     r"events.csv: column 'ts': non-numeric values such as 'noon'; convert them to Unix"),
    (EVENTS.replace(",4,", ",four,"), MAPPING,
     r"events.csv: column 'stars': non-numeric values such as 'four'"),
    (EVENTS, {**MAPPING, "site": "store"}, r"column 'store' \(site\) is missing"),
    (EVENTS, {**MAPPING, "colour": "x"}, r"columns: unknown name 'colour'"),
    ('a,b\n"1,2\n', {}, r"events.csv: cannot read .*valid CSV or Parquet"),
])
def test_bad_files_name_file_and_column(tmp_path: Path, text: str, columns: dict[str, str],
                                        message: str) -> None:
    with pytest.raises(DataError, match=message) as info:
        load_table(write(tmp_path, "events.csv", text), columns=columns)
    assert "\n" not in str(info.value)


def test_missing_unknown_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"absent.csv: file not found"):
        load_table(tmp_path / "absent.csv")
    with pytest.raises(DataError, match=r"events.json: unknown file type"):
        load_table(write(tmp_path, "events.json", "{}"))
    with pytest.raises(DataError, match=r"broken.parquet: cannot read"):
        load_table(write(tmp_path, "broken.parquet", "not parquet"))


def test_side_table_problems(tmp_path: Path) -> None:
    events = write(tmp_path, "events.csv", EVENTS)
    dup = write(tmp_path, "items.csv", "sku\n007\n007\n010\n")
    with pytest.raises(DataError, match=r"items.csv: column 'sku': 1 duplicate ids"):
        load_table(events, dup, columns=MAPPING)
    short = write(tmp_path, "items2.csv", "sku\n007\n")
    with pytest.raises(DataError, match=r"2 rows have item ids missing .* '010'"):
        load_table(events, short, columns=MAPPING)
    no_id = write(tmp_path, "users.csv", "name,region\nc1,north\n")
    with pytest.raises(DataError, match=r"users.csv: column 'user_id' \(user_id\) is missing"):
        load_table(events, None, no_id, MAPPING)
