"""One entry point that turns a dataset name or path into a :class:`Dataset`."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from fedrec.data import movielens, synthetic, tabular
from fedrec.data.errors import DataError
from fedrec.data.schema import Dataset

log = logging.getLogger(__name__)

KNOWN = ("ml-100k", "synthetic", "synthetic:merchants=8,users=2000,items=1000")
SYNTHETIC_KEYS = {"merchants": "n_merchants", "users": "n_users", "items": "n_items",
                  "categories": "n_categories"}
SIDE_TABLES = ("items", "users")


def _int(value: str, part: str, spec: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataError(f"dataset 'synthetic:{spec}': {part!r} needs an integer value, "
                        "e.g. users=2000") from None


def _synthetic_options(spec: str) -> dict[str, int | tuple[int, int]]:
    """Keyword arguments for :func:`synthetic_ecommerce` from 'k=v,...' (interactions=lo-hi)."""
    options: dict[str, int | tuple[int, int]] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, _, value = part.partition("=")
        if key == "interactions":
            lo, _, hi = value.partition("-")
            options["interactions_per_user"] = (_int(lo, part, spec), _int(hi or lo, part, spec))
        elif key in SYNTHETIC_KEYS:
            options[SYNTHETIC_KEYS[key]] = _int(value, part, spec)
        else:
            raise DataError(f"dataset 'synthetic:{spec}': unknown option {key!r}; use "
                            f"{', '.join(SYNTHETIC_KEYS)} or interactions=<lo>-<hi>")
    return options


def _table_in(folder: Path, stem: str) -> Path | None:
    """The first CSV/Parquet file named ``stem.*`` in ``folder``, if any."""
    return next((p for p in sorted(folder.glob(f"{stem}.*")) if tabular.is_table_file(p)), None)


def _from_folder(folder: Path, columns: Mapping[str, str] | None) -> Dataset:
    """GroupLens folder, cached ML-100K Parquet folder, or interactions/items/users tables."""
    if (folder / "u.data").is_file():
        return movielens.load_movielens_folder(folder)
    if movielens.is_cached(folder):
        return movielens.load_ml100k_parquet(folder)
    inter = _table_in(folder, "interactions")
    if inter is None:
        raise DataError(f"{folder}: no u.data, ML-100K Parquet files or interactions.csv/"
                        ".parquet here; point at one of those")
    items, users = (_table_in(folder, stem) for stem in SIDE_TABLES)
    return tabular.load_table(inter, items, users, columns)


def is_dataset_name(name_or_path: str) -> bool:
    """Whether ``load_dataset`` reads this as a built-in name rather than a path."""
    kind, sep, spec = name_or_path.partition(":")
    return name_or_path == "ml-100k" or (kind == "synthetic" and (sep == "" or bool(spec)))


def load_dataset(name_or_path: str, *, seed: int = 0, columns: Mapping[str, str] | None = None,
                 cache_dir: Path | None = None) -> Dataset:
    """Load by name ('ml-100k', 'synthetic', 'synthetic:users=2000,...') or by path.

    A path may be a GroupLens ML-100K folder, a folder of the cached Parquet files, a folder
    with interactions.* (plus optional items.*, users.*), or one CSV/Parquet interactions
    file; ``columns`` maps fedrec column names to the file's. ``seed`` drives synthetic data.
    """
    if name_or_path == "ml-100k":
        return movielens.load_ml100k_parquet(movielens.fetch_ml100k(cache_dir))
    if is_dataset_name(name_or_path):  # synthetic[:options]
        options = _synthetic_options(name_or_path.partition(":")[2])
        return synthetic.synthetic_ecommerce(seed=seed, **options)  # type: ignore[arg-type]
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return _from_folder(path, columns)
    if path.is_file() and tabular.is_table_file(path):
        return tabular.load_table(path, columns=columns)
    raise DataError(f"dataset {name_or_path!r}: not a known name or an existing CSV/Parquet "
                    f"file or folder; use one of {', '.join(KNOWN)} or a path")
