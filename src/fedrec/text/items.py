"""The texts the encoder sees: checked one by one, and built one per item of a dataset.

:func:`clean_texts` turns input into ``str`` or raises :class:`TextError` naming the culprits:
missing, empty or whitespace-only texts, bytes that are not UTF-8, lone surrogates. Never a
silent zero vector.

:func:`item_texts` gives each item its title, then its labels (category and genres,
deduplicated): "Toy Story (1995). Animation, Children's, Comedy" for ML-100K, "Cozy lamp by
Fernhill. home" for the synthetic catalogue. Placeholders mean nothing to a language model and
are left out: a title equal to the item id (what ``build_dataset`` fills in when there is
none) or to 'unknown', and the label 'unknown'. An item left with no text gets "", which the
encoder rejects by index.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from fedrec.data.schema import UNKNOWN, Dataset
from fedrec.errors import FedrecError

LABEL_COLUMNS = ("category", "genres")
GENRE_SEP = "|"
SHOWN = 5  # indices named in an error message


class TextError(FedrecError):
    """Bad text input or an unusable model folder; the one-line message says how to fix it."""


def _decode(raw: bytes | bytearray, i: int) -> str:
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TextError(
            f"text {i}: bytes are not valid UTF-8 at byte offset {exc.start} "
            f"({exc.reason}); decode them with the right codec first"
        ) from None


def _check_encodable(text: str, i: int) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise TextError(
            f"text {i}: lone surrogate at character {exc.start} (bytes decoded "
            "with errors='surrogateescape'?); decode the source as UTF-8"
        ) from None


def first_indices(idx: Sequence[int]) -> str:
    """The first few of ``idx`` for an error message, with '...' when there are more."""
    more = ", ..." if len(idx) > SHOWN else ""
    return ", ".join(map(str, idx[:SHOWN])) + more


def clean_texts(texts: Sequence[str | bytes | None]) -> list[str]:
    """Texts as ``str``: UTF-8 bytes decoded; missing, blank or undecodable ones raise."""
    if isinstance(texts, str | bytes):
        raise TextError("texts: got a single string; pass a list of strings, e.g. [text]")
    out: list[str] = []
    blank: list[int] = []
    for i, text in enumerate(texts):
        if isinstance(text, bytes | bytearray):
            text = _decode(text, i)
        elif text is None or (pd.api.types.is_scalar(text) and pd.isna(text)):
            text = ""
        elif not isinstance(text, str):
            raise TextError(f"text {i}: got {type(text).__name__}; pass str or UTF-8 bytes")
        else:
            _check_encodable(text, i)
        if not text.strip():
            blank.append(i)
        out.append(text)
    if blank:
        raise TextError(
            f"{len(blank)} of {len(out)} texts are missing, empty or whitespace "
            f"only (indices {first_indices(blank)}); give every item a title or "
            "category, or drop those items"
        )
    return out


def _present(value: object) -> str:
    """``value`` as stripped text, or "" when it is missing or the 'unknown' placeholder."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return ""
    text = str(value).strip()
    return "" if text == UNKNOWN else text


def _labels(row: pd.Series) -> list[str]:
    """Distinct non-placeholder labels from the category and '|'-joined genres columns."""
    labels: list[str] = []
    for col in LABEL_COLUMNS:
        for part in _present(row.get(col)).split(GENRE_SEP):
            if (label := _present(part)) and label not in labels:
                labels.append(label)
    return labels


def item_text(row: pd.Series) -> str:
    """'<title>. <label>, <label>' for one row of an items table (see the module docstring)."""
    title = _present(row.get("title"))
    if title == str(row.get("item_id")):
        title = ""
    labels = ", ".join(_labels(row))
    return ". ".join(part for part in (title, labels) if part)


def item_texts(dataset: Dataset) -> list[str]:
    """One text per item index of ``dataset`` (row i of its items table is item i)."""
    return [item_text(row) for _, row in dataset.items.iterrows()]
