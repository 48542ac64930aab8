"""Fixtures shared by several test modules."""

import os
from collections import Counter

# Under pytest-xdist the workers already fill the cores: one BLAS/OpenMP thread per process
# (this worker, and the SuperNodes, ClientApps and CLI processes it starts, which inherit it).
# Two threads per process on two cores cost 20% more CPU time in a measured sample of the
# suite's slowest tests (spinning OpenMP threads), and 9% more wall time.
#
# For the same reason each simulation trains its clients on one Ray actor, not one per core:
# an actor is a process that imports torch, Opacus and fedrec before its first client trains.
# Measured on 3 small simulations in one process, run alone, three times alternately: 54-70
# CPU-s with one actor against 88-103 with one per core (two), wall time alike (52-64 s, 55-63).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("FEDREC_SIM_WORKERS", "1")
    import torch

    torch.set_num_threads(1)

import pytest  # noqa: E402 - after the thread setting, which must precede torch's first use

from fedrec.data import synthetic_ecommerce
from fedrec.data.sequences import build_sequences
from fedrec.models.base import ModelSpec
from fedrec.training import LocalData


@pytest.fixture(scope="module")
def small():
    """60 synthetic users' training data and a matching small model spec."""
    ds = synthetic_ecommerce(n_merchants=2, n_users=60, n_items=50, seed=3)
    seqs = build_sequences(ds.interactions, 20)
    data = LocalData(seqs, ds.user_feature_codes()[seqs.users])
    spec = ModelSpec(
        ds.num_items,
        tuple(int(c) for c in ds.items["category_index"]),
        ds.num_categories,
        ds.user_feature_cards(),
        (7, 6),
        max_len=20,
        dim=16,
    )
    return data, spec


def pytest_collection_modifyitems(config, items):
    """Files with the most slow (end-to-end) tests first, each file's tests kept together and
    in order. ``make test`` hands files to the xdist workers in this order
    (``--no-loadscope-reorder``; xdist's default order, most tests first, left the files with
    a few long federation runs for last, where one worker ran them while the others idled)."""
    slow = Counter(item.location[0] for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.location[0]])  # stable: each file's order kept
