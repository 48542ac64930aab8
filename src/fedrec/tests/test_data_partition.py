"""Client partitions: known answers for column/site/user schemes, properties for Dirichlet."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedrec.data import (
    DataError,
    Dataset,
    Partition,
    build_dataset,
    check_min_users,
    make_partition,
    partition_by_column,
    partition_by_user,
    partition_dirichlet,
    synthetic_ecommerce,
)
from fedrec.data.partition import dominant_category


def toy() -> Dataset:
    # user u0: sites A, B, B -> B; u1: B, A (tie) -> A; u2: C; u3: no events -> first site A
    inter = pd.DataFrame({"user": ["u0", "u0", "u0", "u1", "u1", "u2"],
                          "item": ["x", "y", "y", "x", "z", "z"],
                          "timestamp": [1, 2, 3, 1, 2, 1],
                          "site": ["A", "B", "B", "B", "A", "C"]})
    items = pd.DataFrame({"item_id": ["x", "y", "z"], "category": ["c0", "c1", "c1"]})
    users = pd.DataFrame({"user_id": ["u0", "u1", "u2", "u3"], "job": ["vet", "cook", "vet", "ai"]})
    return build_dataset("toy", inter, items, users, ("job",))


def test_by_user_attribute_sorted_names() -> None:
    part = partition_by_column(toy(), "job")
    assert part.names == ("ai", "cook", "vet")
    assert part.client_of_user.tolist() == [2, 1, 2, 0]
    assert part.users_of(2).tolist() == [0, 2]
    assert part.sizes().tolist() == [1, 1, 2] and part.n_clients == 3


def test_by_site_majority_ties_to_smallest_name() -> None:
    part = make_partition(toy(), "site")
    assert part.names == ("A", "B", "C")
    assert part.client_of_user.tolist() == [1, 0, 2, 0]


def test_by_user_one_client_each() -> None:
    part = partition_by_user(toy())
    assert part.names == ("u0", "u1", "u2", "u3")
    assert part.client_of_user.tolist() == [0, 1, 2, 3]


def test_dominant_category_ties_low_and_idle_users() -> None:
    # u0: x (c0), y, y (c1) -> 1; u1: x (c0), z (c1) tie -> 0; u2: z -> 1; u3: none -> -1
    assert dominant_category(toy()).tolist() == [1, 0, 1, -1]


def test_dirichlet_deterministic_nonempty_and_skewed() -> None:
    ds = synthetic_ecommerce(n_users=300, seed=0)
    a = partition_dirichlet(ds, 6, 0.1, seed=3)
    b = partition_dirichlet(ds, 6, 0.1, seed=3)
    np.testing.assert_array_equal(a.client_of_user, b.client_of_user)
    assert a.names == tuple(f"client-{c}" for c in range(6))
    assert a.sizes().min() >= 1 and a.sizes().sum() == 300
    dom = dominant_category(ds)
    skew = partition_dirichlet(ds, 6, 0.05, seed=1)
    even = partition_dirichlet(ds, 6, 1000.0, seed=1)

    def purity(part: Partition) -> float:  # share of users in their category's top client
        tab = pd.crosstab(dom, part.client_of_user).to_numpy()
        return float(tab.max(axis=1).sum() / tab.sum())

    assert purity(skew) > purity(even) + 0.3


def test_dirichlet_repairs_empty_clients() -> None:
    ds = toy()
    part = partition_dirichlet(ds, 4, 1e-3, seed=0)  # tiny alpha piles users together
    assert sorted(part.client_of_user.tolist()) == [0, 1, 2, 3]
    with pytest.raises(DataError, match=r"5 clients but only 4 users"):
        partition_dirichlet(ds, 5, 0.5, seed=0)


@pytest.mark.parametrize(("spec", "n_clients", "message"), [
    ("column:zodiac", None, "no user attribute 'zodiac'; use one of: job, site"),
    ("dirichlet:0.5", None, "needs a client count; pass --clients N"),
    ("dirichlet:lots", 2, "alpha must be a number"),
    ("dirichlet:-1", 2, "alpha > 0"),
    ("geo", None, "unknown scheme; use 'column:<user attribute>'"),
    ("column:job", 4, "gives 3 clients on toy but 4 were requested; set --clients 3"),
])
def test_make_partition_errors(spec: str, n_clients: int | None, message: str) -> None:
    with pytest.raises(DataError, match=message):
        make_partition(toy(), spec, n_clients, seed=0)


def test_make_partition_specs_and_min_users() -> None:
    ds = toy()
    assert make_partition(ds, "column:job").names == ("ai", "cook", "vet")
    assert make_partition(ds, "user", 4).n_clients == 4
    assert make_partition(ds, "dirichlet:0.5", 2, seed=0).n_clients == 2
    with pytest.raises(DataError, match=r"2 clients have fewer than 2 users \(ai=1, cook=1\)"):
        check_min_users(make_partition(ds, "column:job"), 2)
    with pytest.raises(DataError, match=r"client indices must be in \[0, 1\)"):
        Partition(np.array([0, 1]), ("only",))


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), 0.0])
def test_dirichlet_refuses_an_alpha_that_is_not_a_positive_number(alpha) -> None:
    with pytest.raises(DataError, match="alpha > 0"):  # nan and inf became a uniform split
        partition_dirichlet(synthetic_ecommerce(n_users=50, seed=0), 3, alpha)
