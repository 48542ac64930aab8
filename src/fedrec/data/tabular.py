"""Load any interaction log (plus optional item and user tables) from CSV or Parquet.

``columns`` maps fedrec names to the file's column names, e.g.
``{"user": "customer_id", "item": "sku", "timestamp": "ts"}``; unmapped names are looked
up as written. Every problem becomes a one-line :class:`DataError` naming file and column.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from fedrec.data import coerce
from fedrec.data.errors import DataError
from fedrec.data.schema import Dataset, build_dataset

log = logging.getLogger(__name__)

REQUIRED = ("user", "item", "timestamp")
OPTIONAL = ("rating", "site")
ITEM_FIELDS = ("title", "category", "genres", "price")
KNOWN_KEYS = (*REQUIRED, *OPTIONAL, "item_id", "user_id", *ITEM_FIELDS)
PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = {".csv": ",", ".csv.gz": ",", ".tsv": "\t", ".tsv.gz": "\t"}


def is_table_file(path: Path) -> bool:
    """Whether ``path`` has a suffix :func:`read_table` understands."""
    name = path.name.lower()
    return name.endswith(PARQUET_SUFFIXES) or any(name.endswith(s) for s in CSV_SUFFIXES)


def read_table(path: Path, id_columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """A CSV/TSV (optionally gzipped) or Parquet file as a frame; ids in CSV stay text."""
    if not path.is_file():
        raise DataError(f"{path}: file not found; check the path")
    name = path.name.lower()
    try:
        if name.endswith(PARQUET_SUFFIXES):
            return pd.read_parquet(path)
        for suffix, sep in CSV_SUFFIXES.items():
            if name.endswith(suffix):
                return pd.read_csv(path, sep=sep, dtype=dict.fromkeys(id_columns, str))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        detail = " ".join(str(exc).split())[:200]
        raise DataError(f"{path.name}: cannot read ({detail}); "
                        "check that it is a valid CSV or Parquet file") from exc
    raise DataError(f"{path.name}: unknown file type; use .csv, .tsv or .parquet")


def _column(frame: pd.DataFrame, path: Path, key: str, columns: Mapping[str, str]) -> str:
    """The file's column for fedrec name ``key``; raise if it is absent."""
    col = columns.get(key, key)
    if col not in frame.columns:
        have = ", ".join(map(str, frame.columns[:8]))
        raise DataError(f"{path.name}: column {col!r} ({key}) is missing (columns: {have}); "
                        f"name the file's {key} column {key!r}, or map it in Python: "
                        f"load_table(..., columns={{{key!r}: '<name>'}})")
    return col


def _interactions(path: Path, columns: Mapping[str, str]) -> pd.DataFrame:
    ids = (columns.get("user", "user"), columns.get("item", "item"))
    frame = read_table(path, ids)
    cols = {key: _column(frame, path, key, columns) for key in REQUIRED}
    cols |= {k: columns.get(k, k) for k in OPTIONAL if columns.get(k, k) in frame.columns}
    for key in OPTIONAL:
        if key in columns and key not in cols:
            _column(frame, path, key, columns)
    out = pd.DataFrame({key: frame[col] for key, col in cols.items()})
    where = f"{path.name}: column {cols['timestamp']!r}"
    out["timestamp"] = coerce.timestamps(out["timestamp"], where)
    if "rating" in out:
        out["rating"] = coerce.ratings(out["rating"], f"{path.name}: column {cols['rating']!r}")
    return out


def _id_column(frame: pd.DataFrame, path: Path, key: str, columns: Mapping[str, str]) -> str:
    """The id column of a side table: mapped ``item_id``/``user_id``, else a likely name."""
    if key in columns:
        return _column(frame, path, key, columns)
    base = key.removesuffix("_id")
    for col in (columns.get(base, base), key, base):
        if col in frame.columns:
            return col
    return _column(frame, path, key, columns)


def _items(path: Path, columns: Mapping[str, str]) -> pd.DataFrame:
    frame = read_table(path, (columns.get("item_id", ""), columns.get("item", "item"), "item_id"))
    id_col = _id_column(frame, path, "item_id", columns)
    coerce.require_unique(frame[id_col], f"{path.name}: column {id_col!r}")
    out = pd.DataFrame({"item_id": frame[id_col]})
    for key in ITEM_FIELDS:
        if key in columns:
            out[key] = frame[_column(frame, path, key, columns)]
        elif key in frame.columns:
            out[key] = frame[key]
    if "price" in out:
        where = f"{path.name}: column {columns.get('price', 'price')!r}"
        out["price"] = coerce.prices(out["price"], where)
    return out


def _users(path: Path, columns: Mapping[str, str]) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """Users table and its feature names: every column other than the id, as text."""
    frame = read_table(path, (columns.get("user_id", ""), columns.get("user", "user"), "user_id"))
    id_col = _id_column(frame, path, "user_id", columns)
    coerce.require_unique(frame[id_col], f"{path.name}: column {id_col!r}")
    features = tuple(str(c) for c in frame.columns if c != id_col)
    out = frame.rename(columns={id_col: "user_id"}).rename(columns=str)
    return out[["user_id", *features]], features


def load_table(interactions_path: str | Path, items_path: str | Path | None = None,
               users_path: str | Path | None = None,
               columns: Mapping[str, str] | None = None) -> Dataset:
    """A :class:`Dataset` named after the interactions file; see the module docstring."""
    columns = dict(columns or {})
    unknown = sorted(set(columns) - set(KNOWN_KEYS))
    if unknown:
        raise DataError(f"columns: unknown name {unknown[0]!r}; use one of "
                        f"{', '.join(KNOWN_KEYS)}")
    path = Path(interactions_path)
    inter = _interactions(path, columns)
    items = _items(Path(items_path), columns) if items_path is not None else None
    users, features = _users(Path(users_path), columns) if users_path is not None else (None, ())
    name = path.name.split(".")[0]
    try:
        return build_dataset(name, inter, items, users, features)
    except DataError as exc:
        raise DataError(f"{path.name}: {exc}") from exc
