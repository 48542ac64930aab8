"""Datasets, partitions and splits for federated recommendation (numpy/pandas only).

Loaders produce a validated :class:`Dataset`; :func:`make_partition` assigns users to
clients; :func:`leave_last_out` and :func:`build_sequences` prepare training and
evaluation arrays.
"""

from fedrec.data.errors import DataError
from fedrec.data.movielens import (
    default_cache_dir,
    fetch_ml100k,
    load_ml100k_parquet,
    load_movielens_folder,
)
from fedrec.data.partition import (
    Partition,
    check_min_users,
    make_partition,
    partition_by_column,
    partition_by_user,
    partition_dirichlet,
)
from fedrec.data.registry import load_dataset
from fedrec.data.schema import Dataset, build_dataset, validate_dataset
from fedrec.data.sequences import (
    CONTEXT_CARDS,
    Sequences,
    build_sequences,
    context_of,
    user_item_sets,
)
from fedrec.data.split import Split, leave_last_out
from fedrec.data.synthetic import synthetic_ecommerce
from fedrec.data.tabular import load_table

__all__ = [
    "CONTEXT_CARDS",
    "DataError",
    "Dataset",
    "Partition",
    "Sequences",
    "Split",
    "build_dataset",
    "build_sequences",
    "check_min_users",
    "context_of",
    "default_cache_dir",
    "fetch_ml100k",
    "leave_last_out",
    "load_dataset",
    "load_ml100k_parquet",
    "load_movielens_folder",
    "load_table",
    "make_partition",
    "partition_by_column",
    "partition_by_user",
    "partition_dirichlet",
    "synthetic_ecommerce",
    "user_item_sets",
    "validate_dataset",
]
