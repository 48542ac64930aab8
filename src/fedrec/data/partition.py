"""Assign users to federated clients.

A partition maps every user to exactly one client, so a user's history never spans
clients and per-user splits stay local. Schemes: by a user attribute or majority merchant
site (natural silos), one client per user (cross-device), or label-skewed Dirichlet over
item categories (the usual non-IID benchmark, Hsu et al. 2019, arXiv:1909.06335).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedrec.data.errors import DataError
from fedrec.data.schema import Dataset

log = logging.getLogger(__name__)

SPECS = "'column:<user attribute>', 'site', 'user' or 'dirichlet:<alpha>'"


@dataclass(frozen=True)
class Partition:
    """``client_of_user[u]`` is the client of user ``u``; ``names[c]`` labels client ``c``."""

    client_of_user: np.ndarray  # int64 (U,)
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        cou = np.asarray(self.client_of_user)
        if cou.ndim != 1 or not np.issubdtype(cou.dtype, np.integer):
            raise DataError("partition: client_of_user must be a 1-D integer array")
        object.__setattr__(self, "client_of_user", cou.astype(np.int64, copy=False))
        object.__setattr__(self, "names", tuple(str(n) for n in self.names))
        if len(cou) and (cou.min() < 0 or cou.max() >= len(self.names)):
            raise DataError(f"partition: client indices must be in [0, {len(self.names)}); "
                            "give one name per client")

    @property
    def n_clients(self) -> int:
        return len(self.names)

    def users_of(self, client: int) -> np.ndarray:
        """Sorted user indices of ``client``."""
        return np.flatnonzero(self.client_of_user == client)

    def sizes(self) -> np.ndarray:
        """int64 (n_clients,): users per client."""
        return np.bincount(self.client_of_user, minlength=self.n_clients).astype(np.int64)


def check_min_users(partition: Partition, min_users: int = 1) -> None:
    """Raise if any client has fewer than ``min_users`` users (empty clients break FL rounds)."""
    sizes = partition.sizes()
    small = np.flatnonzero(sizes < min_users)
    if len(small):
        named = ", ".join(f"{partition.names[c]}={sizes[c]}" for c in small[:3])
        raise DataError(f"partition: {len(small)} clients have fewer than {min_users} users "
                        f"({named}); use fewer clients or another partition scheme")


def _by_values(values: pd.Series) -> Partition:
    """One client per distinct value, in sorted order."""
    names = tuple(sorted(str(v) for v in pd.unique(values)))
    codes = pd.Categorical(values.astype(str), categories=list(names)).codes
    return Partition(np.asarray(codes, dtype=np.int64), names)


def _majority_site(ds: Dataset) -> pd.Series:
    """Each user's most frequent site (ties to the smallest name), indexed by user."""
    counts = ds.interactions.groupby(["user", "site"]).size().rename("n").reset_index()
    spans = int((counts.groupby("user").size() > 1).sum())
    if spans:
        log.info("site partition: %d users shop at several sites; each goes to its majority site",
                 spans)
    counts = counts.sort_values(["user", "n", "site"], ascending=[True, False, True])
    return counts.drop_duplicates("user").set_index("user")["site"]


def partition_by_column(ds: Dataset, column: str) -> Partition:
    """One client per value of a user attribute, or per merchant ``site`` of the events."""
    if column in ds.users.columns and column != "user_id":
        return _by_values(ds.users[column])
    if column == "site" and "site" in ds.interactions.columns:
        site = _majority_site(ds)
        idle = ds.num_users - len(site)
        if idle:
            log.warning("site partition: %d users have no events; they join the first site",
                        idle)
        first = str(site.min())
        return _by_values(site.reindex(range(ds.num_users), fill_value=first))
    known = [c for c in ds.users.columns if c != "user_id"]
    known += ["site"] if "site" in ds.interactions.columns else []
    raise DataError(f"partition: {ds.name} has no user attribute {column!r}; "
                    f"use one of: {', '.join(known) or '(none; try user or dirichlet:<alpha>)'}")


def partition_by_user(ds: Dataset) -> Partition:
    """One client per user (cross-device federated learning)."""
    return Partition(np.arange(ds.num_users, dtype=np.int64),
                     tuple(ds.users["user_id"].astype(str)))


def dominant_category(ds: Dataset) -> np.ndarray:
    """int64 (U,): each user's most frequent item category (ties to the lowest); -1 if none."""
    cats = ds.items["category_index"].to_numpy()[ds.interactions["item"].to_numpy()]
    counts = np.zeros((ds.num_users, ds.num_categories), dtype=np.int64)
    np.add.at(counts, (ds.interactions["user"].to_numpy(), cats), 1)
    return np.where(counts.sum(axis=1) > 0, counts.argmax(axis=1), -1)


def _fill_empty(client: np.ndarray, n_clients: int) -> int:
    """Give each empty client one user from the largest client (highest user index); in place."""
    moved = 0
    for empty in np.flatnonzero(np.bincount(client, minlength=n_clients) == 0):
        largest = int(np.argmax(np.bincount(client, minlength=n_clients)))
        client[np.flatnonzero(client == largest)[-1]] = empty
        moved += 1
    return moved


def partition_dirichlet(ds: Dataset, n_clients: int, alpha: float, seed: int = 0) -> Partition:
    """Non-IID users: per category c, client shares p_c ~ Dir(alpha); each user draws its
    client from p of its dominant category (users without events: uniform). Smaller alpha
    means more skew. Empty clients then get a user from the largest client."""
    if n_clients < 1 or not math.isfinite(alpha) or alpha <= 0:
        raise DataError(f"partition: dirichlet needs n_clients >= 1 and alpha > 0 "
                        f"(got {n_clients}, {alpha}); e.g. dirichlet:0.5 with --clients 4")
    if n_clients > ds.num_users:
        raise DataError(f"partition: {n_clients} clients but only {ds.num_users} users in "
                        f"{ds.name}; use at most {ds.num_users} clients")
    rng = np.random.default_rng(seed)
    shares = np.nan_to_num(rng.dirichlet(np.full(n_clients, float(alpha)), ds.num_categories))
    shares[shares.sum(axis=1) == 0] = 1.0  # underflow at tiny alpha: fall back to uniform
    shares = np.vstack([shares, np.full(n_clients, 1.0)])  # last row: users without events
    shares /= shares.sum(axis=1, keepdims=True)
    cdf = np.cumsum(shares, axis=1)[dominant_category(ds)]
    draws = rng.random(ds.num_users)[:, None]
    client = np.minimum((draws >= cdf).sum(axis=1), n_clients - 1).astype(np.int64)
    moved = _fill_empty(client, n_clients)
    if moved:
        log.info("dirichlet partition: moved %d users to fill empty clients", moved)
    return Partition(client, tuple(f"client-{c}" for c in range(n_clients)))


def make_partition(ds: Dataset, spec: str, n_clients: int | None = None,
                   seed: int = 0) -> Partition:
    """Partition from a spec string: 'column:occupation', 'site', 'user' or 'dirichlet:0.5'.

    ``n_clients`` is required for dirichlet; for the other schemes it is checked against the
    number of clients the data yields. Raises :class:`DataError` if any client is empty.
    """
    kind, _, arg = spec.partition(":")
    if kind == "column" and arg:
        part = partition_by_column(ds, arg)
    elif kind in ("site", "user") and not arg:
        part = partition_by_column(ds, "site") if kind == "site" else partition_by_user(ds)
    elif kind == "dirichlet" and arg:
        if n_clients is None:
            raise DataError(f"partition {spec!r}: needs a client count; pass --clients N")
        try:
            alpha = float(arg)
        except ValueError:
            raise DataError(f"partition {spec!r}: alpha must be a number, e.g. dirichlet:0.5") \
                from None
        part = partition_dirichlet(ds, n_clients, alpha, seed)
    else:
        raise DataError(f"partition {spec!r}: unknown scheme; use {SPECS}")
    if n_clients is not None and part.n_clients != n_clients:
        raise DataError(f"partition {spec!r}: gives {part.n_clients} clients on {ds.name} but "
                        f"{n_clients} were requested; set --clients {part.n_clients} or use "
                        "dirichlet:<alpha>")
    check_min_users(part, 1)
    return part
