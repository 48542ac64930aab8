"""Column coercion shared by the builder and the file loaders.

Each helper takes ``where`` (e.g. ``"ratings.csv: column 'ts'"``) so the one-line
:class:`DataError` it raises names the file and column the user has to fix.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fedrec.data.errors import DataError

MAX_EXAMPLES = 3


def examples(values: pd.Series | np.ndarray) -> str:
    """The first few values, quoted, for an error message."""
    head = list(pd.Series(values).head(MAX_EXAMPLES))
    return ", ".join(repr(str(v)) for v in head)


def raw_ids(values: pd.Series, where: str) -> pd.Series:
    """Raw ids as strings, so ``7``, ``7.0`` and ``'7'`` name the same entity.

    Integral floats (a CSV id column with gaps is read as float) lose their ``.0``.
    """
    missing = values.isna()
    if missing.any():
        raise DataError(f"{where}: {int(missing.sum())} ids are missing; drop or fill those rows")
    if pd.api.types.is_float_dtype(values) and bool(np.all(np.mod(values, 1) == 0)):
        values = values.astype(np.int64)
    text = values.astype(str).str.strip()  # " 1" in a CSV is user 1, not another user
    if (text == "").any():
        raise DataError(f"{where}: {int((text == '').sum())} ids are blank; drop or fill those "
                        "rows")  # fmt: skip
    return text.reset_index(drop=True)


def require_unique(ids: pd.Series, where: str) -> None:
    """Raise when a side table lists an id twice (indices would be ambiguous)."""
    dup = ids[ids.duplicated()]
    if len(dup):
        raise DataError(f"{where}: {len(dup)} duplicate ids such as {examples(dup)}; "
                        "keep one row per id")


def sorted_unique_ids(ids: pd.Series) -> pd.Series:
    """Distinct ids in natural order: numerically when all are integers, else as text."""
    uniq = pd.Series(pd.unique(ids), dtype=str)
    if bool(uniq.str.fullmatch(r"-?\d+").all()):  # as Python ints: any size (2^64 ids too)
        numbers = np.array([int(x) for x in uniq], dtype=object)
        return uniq.iloc[np.argsort(numbers, kind="stable")]
    return uniq.sort_values(kind="stable")


def _numeric(values: pd.Series, where: str, fix: str) -> pd.Series:
    """Numbers from ``values``; missing or non-numeric entries raise naming ``fix``."""
    missing = int(values.isna().sum())
    if missing:
        raise DataError(f"{where}: {missing} values are missing; drop or fill those rows")
    if pd.api.types.is_bool_dtype(values):
        values = values.astype(np.int64)
    num = pd.to_numeric(values, errors="coerce")
    bad = num.isna() | ~np.isfinite(num.astype(np.float64))
    if bad.any():
        raise DataError(f"{where}: non-numeric values such as {examples(values[bad])}; {fix}")
    return num


def time_order(values: pd.Series) -> np.ndarray:
    """A key that orders the events as their timestamps do, finer than the whole seconds
    ``timestamps`` keeps (two events in one second keep their sub-second order)."""
    if pd.api.types.is_datetime64_any_dtype(values):
        return np.asarray(values.astype("int64"), dtype=np.int64)
    return np.asarray(pd.to_numeric(values, errors="coerce"), dtype=np.float64)


def timestamps(values: pd.Series, where: str) -> np.ndarray:
    """Unix seconds as int64; datetime columns are converted, text is rejected."""
    if pd.api.types.is_datetime64_any_dtype(values):
        missing = int(values.isna().sum())
        if missing:
            raise DataError(f"{where}: {missing} timestamps are missing; fill or drop them")
        epoch = pd.Timestamp(0, tz="UTC") if values.dt.tz is not None else pd.Timestamp(0)
        return np.asarray((values - epoch) // pd.Timedelta(seconds=1), dtype=np.int64)
    num = _numeric(values, where, "convert them to Unix seconds")
    return np.floor(np.asarray(num, dtype=np.float64)).astype(np.int64)


def ratings(values: pd.Series, where: str) -> np.ndarray:
    """Ratings as float32; implicit feedback uses 1.0 and never reaches here."""
    num = _numeric(values, where, "use numbers, or drop the rating mapping for implicit data")
    return np.asarray(num, dtype=np.float32)


def prices(values: pd.Series, where: str) -> np.ndarray:
    """Prices as float64; missing prices stay NaN (the schema allows it)."""
    num = pd.to_numeric(values, errors="coerce")
    bad = num.isna() & values.notna()
    if bad.any():
        raise DataError(f"{where}: non-numeric prices such as {examples(values[bad])}; "
                        "write plain numbers without currency symbols")
    return np.asarray(num, dtype=np.float64)


def labels(values: pd.Series, default: pd.Series | str) -> pd.Series:
    """Text labels with missing entries replaced by ``default`` (a value or a series)."""
    values = values.reset_index(drop=True)
    filled = values.where(values.notna(), default)
    return filled.astype(str)
