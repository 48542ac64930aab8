"""Sequence arrays and calendar context, worked out by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedrec.data import CONTEXT_CARDS, DataError, build_sequences, context_of, user_item_sets

WED_2020_01_01 = 1_577_836_800


def frame() -> pd.DataFrame:
    # user 2 by (time, row): item 8 (t=3), 5 (t=10), 6 (t=10), 9 (t=20); user 0: item 7
    return pd.DataFrame({"user": [2, 2, 0, 2, 2], "item": [5, 6, 7, 8, 9],
                         "timestamp": [10, 10, WED_2020_01_01 + 23 * 3600, 3, 20]})


def test_context_known_days_and_hours() -> None:
    ts = np.array([0, WED_2020_01_01, WED_2020_01_01 + 5 * 86400 + 13 * 3600 + 59])
    # 1970-01-01 Thursday 00:00; 2020-01-01 Wednesday 00:00; Monday 13:00 -> bucket 3
    assert context_of(ts).tolist() == [[3, 0], [2, 0], [0, 3]]
    assert context_of(ts.reshape(3, 1)).shape == (3, 1, 2)
    assert CONTEXT_CARDS == (7, 6)


def test_last_items_oldest_first_right_padded() -> None:
    seq = build_sequences(frame(), max_len=3)
    assert seq.users.tolist() == [0, 2]
    assert seq.items.tolist() == [[7, 0, 0], [5, 6, 9]]
    assert seq.mask.tolist() == [[True, False, False], [True, True, True]]
    assert seq.context[0].tolist() == [[2, 5], [0, 0], [0, 0]]
    assert seq.items.dtype == np.int64 and seq.context.dtype == np.int64


def test_requested_users_in_order_with_empty_rows() -> None:
    seq = build_sequences(frame(), max_len=5, users=np.array([1, 2, 0, 2]))
    assert seq.users.tolist() == [1, 2, 0, 2]
    assert seq.items.tolist() == [[0] * 5, [8, 5, 6, 9, 0], [7, 0, 0, 0, 0], [8, 5, 6, 9, 0]]
    assert seq.mask.sum(axis=1).tolist() == [0, 4, 1, 4]
    empty = build_sequences(frame().iloc[:0], max_len=2, users=np.array([0, 3]))
    assert empty.items.shape == (2, 2) and not empty.mask.any()


def test_rejects_bad_max_len() -> None:
    with pytest.raises(DataError, match=r"max_len must be >= 1"):
        build_sequences(frame(), max_len=0)


def test_user_item_sets() -> None:
    sets = user_item_sets(frame().assign(item=[5, 5, 7, 8, 1]), n_users=4)
    assert [s.tolist() for s in sets] == [[7], [], [1, 5, 8], []]
    with pytest.raises(DataError, match=r"outside"):
        user_item_sets(frame(), n_users=2)
