"""Leave-last-out split, worked out by hand, including timestamp ties."""

from __future__ import annotations

import pandas as pd
import pytest

from fedrec.data import leave_last_out


def frame() -> pd.DataFrame:
    # user 7: rows a(t=5), b(t=5), c(t=3), d(t=9) -> order c, a, b, d
    # user 1: rows e(t=2), f(t=1) -> fewer than 3: all train
    # user 4: rows g(t=4), h(t=4), i(t=4) -> tie throughout: row order g, h, i
    return pd.DataFrame({
        "user": [7, 7, 7, 7, 1, 1, 4, 4, 4],
        "item": list("abcdefghi"),
        "timestamp": [5, 5, 3, 9, 2, 1, 4, 4, 4],
    })


def test_known_answer_with_ties() -> None:
    split = leave_last_out(frame())
    assert split.train["item"].tolist() == ["f", "e", "g", "c", "a"]
    assert split.valid["item"].tolist() == ["h", "b"]
    assert split.test["item"].tolist() == ["i", "d"]
    assert list(split.train.columns) == ["user", "item", "timestamp"]


def test_partition_of_rows() -> None:
    split = leave_last_out(frame())
    together = pd.concat([split.train, split.valid, split.test])
    assert sorted(together["item"]) == list("abcdefghi")
    assert split.test["user"].is_unique and split.valid["user"].is_unique


def test_empty_input() -> None:
    split = leave_last_out(frame().iloc[:0])
    assert len(split.train) == len(split.valid) == len(split.test) == 0


def test_a_dataset_no_user_can_be_evaluated_on_is_refused_before_training(tmp_path):
    """Every user with two events: training ran, then scoring crashed on empty arrays."""
    from fedrec.config import load_config
    from fedrec.data import DataError
    from fedrec.workload import build_workload

    csv = tmp_path / "two.csv"
    rows = [f"u{u},i{(u + k) % 30},{1000 * u + k},s{u % 3}" for u in range(60) for k in range(2)]
    csv.write_text("user,item,timestamp,site\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError, match="no user has 3 or more interactions"):
        build_workload(load_config(None, {"dataset": str(csv), "partition": "site"}))
