"""The in-memory dataset contract every loader produces and every trainer consumes.

Raw ids (strings) live in the ``items``/``users`` tables; interactions refer to them by
contiguous int64 indices so models can use them directly as embedding rows.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedrec.data import coerce
from fedrec.data.errors import DataError

log = logging.getLogger(__name__)

INTERACTION_COLUMNS = ("user", "item", "timestamp", "rating")
ITEM_COLUMNS = ("item_id", "title", "category", "genres", "price", "text", "category_index")
UNKNOWN = "unknown"


def _sorted_codes(values: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Integer codes of ``values`` against their sorted distinct values (a stable vocabulary)."""
    vocab = sorted(str(v) for v in pd.unique(values))
    codes = pd.Categorical(values.astype(str), categories=vocab).codes
    return np.asarray(codes, dtype=np.int64), vocab


@dataclass(frozen=True, repr=False)
class Dataset:
    """Interactions plus item and user side tables; see the module docstring for the contract.

    ``interactions``: user, item (int64 indices), timestamp (int64 Unix seconds), rating
    (float32, 1.0 for implicit events), optional site (merchant id); sorted by
    (user, timestamp) stably. ``items`` and ``users`` have a RangeIndex matching those indices.
    """

    name: str
    interactions: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame
    user_features: tuple[str, ...] = ()

    @property
    def num_users(self) -> int:
        return len(self.users)

    @property
    def num_items(self) -> int:
        return len(self.items)

    @property
    def num_categories(self) -> int:
        return int(self.items["category_index"].max()) + 1 if len(self.items) else 0

    def user_feature_codes(self) -> np.ndarray:
        """int64 [U, F]: per feature, the code of each user's value in sorted value order."""
        cols = [_sorted_codes(self.users[f])[0] for f in self.user_features]
        if not cols:
            return np.zeros((self.num_users, 0), dtype=np.int64)
        return np.stack(cols, axis=1)

    def user_feature_cards(self) -> tuple[int, ...]:
        """Number of distinct values per user feature (embedding table sizes)."""
        return tuple(len(_sorted_codes(self.users[f])[1]) for f in self.user_features)

    def user_feature_values(self) -> dict[str, list[str]]:
        """Per feature, the sorted values whose positions are the codes."""
        return {f: _sorted_codes(self.users[f])[1] for f in self.user_features}

    def stats(self) -> dict[str, float | int | str]:
        """Headline numbers for logs and reports."""
        n = len(self.interactions)
        cells = max(self.num_users * self.num_items, 1)
        return {"name": self.name, "users": self.num_users, "items": self.num_items,
                "interactions": n, "categories": self.num_categories,
                "density": n / cells, "user_features": ",".join(self.user_features)}

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, users={self.num_users}, items={self.num_items}, "
                f"interactions={len(self.interactions)}, categories={self.num_categories})")


def _require(frame: pd.DataFrame, table: str, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{table}: column {missing[0]!r} is missing; "
                        f"add it, or rename the file's column to {missing[0]!r}")


def _no_nans(frame: pd.DataFrame, table: str, columns: Sequence[str]) -> None:
    for col in columns:
        n = int(frame[col].isna().sum())
        if n:
            raise DataError(f"{table}: column {col!r} has {n} missing values; fill or drop them")


def _range_index(frame: pd.DataFrame, table: str) -> None:
    if not frame.index.equals(pd.RangeIndex(len(frame))):
        raise DataError(f"{table}: index must be 0..{len(frame) - 1}; call reset_index(drop=True)")


def _in_range(values: pd.Series, table: str, col: str, bound: int) -> None:
    if not pd.api.types.is_integer_dtype(values):
        raise DataError(f"{table}: column {col!r} must be int64 indices, not {values.dtype}; "
                        "build the dataset with build_dataset")
    bad = values[(values < 0) | (values >= bound)]
    if len(bad):
        raise DataError(f"{table}: column {col!r} has {len(bad)} indices outside [0, {bound}) "
                        f"such as {coerce.examples(bad)}; remap ids with build_dataset")


def _check_interactions(ds: Dataset) -> None:
    inter, table = ds.interactions, f"{ds.name} interactions"
    if inter.empty:
        raise DataError(f"{table}: no interactions; load a file with at least one event")
    _require(inter, table, INTERACTION_COLUMNS)
    _no_nans(inter, table, [*INTERACTION_COLUMNS, *(["site"] if "site" in inter else [])])
    if not pd.api.types.is_integer_dtype(inter["timestamp"]):
        raise DataError(f"{table}: column 'timestamp' must be int64 Unix seconds, "
                        f"not {inter['timestamp'].dtype}; convert it to numbers")
    _in_range(inter["user"], table, "user", ds.num_users)
    _in_range(inter["item"], table, "item", ds.num_items)
    order = np.lexsort((inter["timestamp"].to_numpy(), inter["user"].to_numpy()))
    if not np.array_equal(order, np.arange(len(inter))):
        raise DataError(f"{table}: rows must be sorted by (user, timestamp); "
                        "build the dataset with build_dataset")


def validate_dataset(ds: Dataset) -> None:
    """Raise :class:`DataError` on the first broken invariant of the :class:`Dataset` contract."""
    _check_interactions(ds)
    items, users = f"{ds.name} items", f"{ds.name} users"
    _require(ds.items, items, ITEM_COLUMNS)
    _require(ds.users, users, ("user_id", *ds.user_features))
    _no_nans(ds.items, items, [c for c in ITEM_COLUMNS if c != "price"])
    _no_nans(ds.users, users, ("user_id", *ds.user_features))
    _range_index(ds.items, items)
    _range_index(ds.users, users)
    coerce.require_unique(ds.items["item_id"], items)
    coerce.require_unique(ds.users["user_id"], users)
    _in_range(ds.items["category_index"], items, "category_index", len(ds.items))


def _index_of(raw: pd.Series, known: pd.Series, table: str, col: str) -> np.ndarray:
    """Contiguous indices of raw ids; ids absent from the side table raise."""
    idx = pd.Index(known).get_indexer(raw)
    unknown = raw[idx < 0]
    if len(unknown):
        raise DataError(f"{table}: {len(unknown)} rows have {col} ids missing from the {col}s "
                        f"table such as {coerce.examples(unknown.drop_duplicates())}; "
                        f"add them to the {col}s file or drop those rows")
    return np.asarray(idx, dtype=np.int64)


def _items_table(items_raw: pd.DataFrame | None, item_ids: pd.Series) -> pd.DataFrame:
    """The items contract from a raw table (or from the ids alone when there is none)."""
    if items_raw is None:
        items_raw = pd.DataFrame({"item_id": coerce.sorted_unique_ids(item_ids)})
    _require(items_raw, "items", ("item_id",))
    ids = coerce.raw_ids(items_raw["item_id"], "items: column 'item_id'")
    coerce.require_unique(ids, "items")
    raw = items_raw.reset_index(drop=True)
    title = coerce.labels(raw["title"], ids) if "title" in raw else ids
    genres = coerce.labels(raw["genres"], UNKNOWN) if "genres" in raw else None
    if "category" in raw:
        category = coerce.labels(raw["category"], UNKNOWN)
    elif genres is not None:
        category = genres.str.split("|").str[0].astype(str)
    else:
        category = pd.Series(UNKNOWN, index=ids.index, dtype=str)
    genres = category if genres is None else genres
    out = pd.DataFrame({"item_id": ids, "title": title, "category": category, "genres": genres})
    out["price"] = (coerce.prices(raw["price"], "items: column 'price'") if "price" in raw
                    else np.full(len(out), np.nan))
    out["text"] = out["title"] + " | " + out["genres"]
    out["category_index"] = _sorted_codes(out["category"])[0]
    return out


def _users_table(users_raw: pd.DataFrame | None, user_ids: pd.Series,
                 user_features: tuple[str, ...]) -> pd.DataFrame:
    """The users contract: raw id plus each listed feature as text ('unknown' if missing)."""
    if users_raw is None:
        if user_features:
            raise DataError(f"users: features {user_features} were requested but no users "
                            "table was given; pass a users file or drop the features")
        users_raw = pd.DataFrame({"user_id": coerce.sorted_unique_ids(user_ids)})
    _require(users_raw, "users", ("user_id", *user_features))
    ids = coerce.raw_ids(users_raw["user_id"], "users: column 'user_id'")
    coerce.require_unique(ids, "users")
    out = pd.DataFrame({"user_id": ids})
    for feat in user_features:
        out[feat] = coerce.labels(users_raw[feat], UNKNOWN)
    return out


def _interactions(raw: pd.DataFrame, users: pd.DataFrame, items: pd.DataFrame,
                  ids: tuple[pd.Series, pd.Series]) -> pd.DataFrame:
    """Indexed, typed and (user, timestamp)-sorted interactions."""
    out = pd.DataFrame({
        "user": _index_of(ids[0], users["user_id"], "interactions", "user"),
        "item": _index_of(ids[1], items["item_id"], "interactions", "item"),
        "timestamp": coerce.timestamps(raw["timestamp"], "interactions: column 'timestamp'"),
    })
    out["rating"] = (coerce.ratings(raw["rating"], "interactions: column 'rating'")
                     if "rating" in raw else np.float32(1.0))
    out["rating"] = out["rating"].astype(np.float32)
    if "site" in raw:
        out["site"] = coerce.labels(raw["site"], UNKNOWN).to_numpy()
    precise = coerce.time_order(raw["timestamp"].reset_index(drop=True))
    key = pd.DataFrame({"user": out["user"], "item": out["item"], "time": precise})
    if (dup := key.duplicated().to_numpy()).any():
        # a logged-twice event would be its own held-out item's history (inflated metrics)
        log.warning("interactions: %d rows repeat a (user, item, timestamp) already seen; kept "
                    "the first of each", int(dup.sum()))
        out, precise = out[~dup], precise[~dup]
    # by user, then time to below the second the timestamps keep (ties: row order)
    order = np.lexsort((precise, out["user"].to_numpy()))
    return out.iloc[order].reset_index(drop=True)


def build_dataset(name: str, interactions_raw: pd.DataFrame,
                  items_raw: pd.DataFrame | None = None, users_raw: pd.DataFrame | None = None,
                  user_features: Sequence[str] = ()) -> Dataset:
    """Map raw-id tables to a validated :class:`Dataset`.

    ``interactions_raw`` needs user, item, timestamp (optional rating, site); ``items_raw``
    needs item_id (optional title, category, genres, price); ``users_raw`` needs user_id
    and the ``user_features`` columns. Indices follow the side tables' row order; without a
    side table, the distinct ids in natural order. Ids unknown to a side table raise.
    """
    if isinstance(user_features, str):
        raise DataError(f"user_features: got the string {user_features!r}; "
                        f"pass a tuple such as ({user_features!r},)")
    _require(interactions_raw, "interactions", ("user", "item", "timestamp"))
    raw = interactions_raw.reset_index(drop=True)
    ids = (coerce.raw_ids(raw["user"], "interactions: column 'user'"),
           coerce.raw_ids(raw["item"], "interactions: column 'item'"))
    users = _users_table(users_raw, ids[0], tuple(user_features))
    items = _items_table(items_raw, ids[1])
    inter = _interactions(raw, users, items, ids)
    ds = Dataset(name, inter, items, users, tuple(user_features))
    validate_dataset(ds)
    log.info("built %r", ds)
    return ds
