"""From a config to what each party holds: the split, each client's users, the evaluation sets.

Built deterministically from (dataset, partition, seed), so the server process and every client
process derive the same partition without any data crossing a message.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from fedrec.config import FedrecConfig, TextConfig
from fedrec.data import DataError, Dataset, Partition, Split, load_dataset, make_partition
from fedrec.data.sequences import Sequences, build_sequences, context_of, user_item_sets
from fedrec.data.split import leave_last_out
from fedrec.models.base import ModelSpec
from fedrec.training import LocalData

log = logging.getLogger(__name__)
NUM_SAMPLED_NEGATIVES = 99  # the protocol of the federated-recommendation literature (NCF, FedMF)


@dataclass(frozen=True)
class EvalSet:
    """Users with a held-out item: their history, the target, 99 sampled negatives."""

    users: np.ndarray  # int64 [U] user indices
    history: LocalData  # rows aligned with users
    context: np.ndarray  # int64 [U, C] context of the held-out interaction
    targets: np.ndarray  # int64 [U]
    negatives: np.ndarray  # int64 [U, 99] items the user never interacted with
    exclude: list[np.ndarray]  # items to exclude from full ranking (the history)

    def subset(self, n: int) -> EvalSet:
        """The first ``n`` users."""
        return self if n >= len(self.users) else self.take(np.arange(n))

    def take(self, rows: np.ndarray) -> EvalSet:
        """The users at ``rows`` (e.g. one client's users), in that order."""
        h = self.history
        seqs = Sequences(*(getattr(h.seqs, f)[rows] for f in ("users", "items", "mask", "context")))
        return EvalSet(
            self.users[rows],
            LocalData(seqs, h.feats[rows]),
            self.context[rows],
            self.targets[rows],
            self.negatives[rows],
            [self.exclude[i] for i in rows],
        )

    def of_users(self, users: np.ndarray) -> EvalSet:
        """The rows of the given user indices that this set holds."""
        return self.take(np.flatnonzero(np.isin(self.users, users)))


@dataclass(frozen=True)
class Workload:
    dataset: Dataset
    split: Split
    partition: Partition
    train: LocalData  # one row per user (row index == user index)
    valid: EvalSet
    test: EvalSet
    spec: ModelSpec

    def client_data(self, client: int) -> LocalData:
        users = self.partition.users_of(client)
        users = users[self.train.seqs.mask[users].sum(axis=1) >= 2]  # need one target at least
        if users.size == 0:
            raise DataError(
                f"client {client} ({self.partition.names[client]}) has no user with two or more "
                "training interactions; choose a partition with fewer, larger clients"
            )
        return _rows(self.train, users)

    def central_data(self) -> LocalData:
        users = np.flatnonzero(self.train.seqs.mask.sum(axis=1) >= 2)
        return _rows(self.train, users)

    def item_text(self, text: TextConfig) -> np.ndarray | None:
        """Public item-text vectors for this catalogue (None when ``text.mode`` is 'off')."""
        from fedrec.text.features import item_text_features  # transformers: only when used

        return item_text_features(text, self.dataset)

    def task_spec(self, dim: int) -> ModelSpec:
        return replace(self.spec, dim=dim)


def _rows(data: LocalData, rows: np.ndarray) -> LocalData:
    s = data.seqs
    return LocalData(
        Sequences(s.users[rows], s.items[rows], s.mask[rows], s.context[rows]), data.feats[rows]
    )


def build_workload(cfg: FedrecConfig) -> Workload:
    return _build_cached(cfg.dataset, cfg.partition, cfg.clients, cfg.seed, cfg.max_len)


@functools.lru_cache(maxsize=4)
def _build_cached(dataset: str, partition: str, clients: int, seed: int, max_len: int) -> Workload:
    ds = load_dataset(dataset, seed=seed)
    split = leave_last_out(ds.interactions)
    if split.valid.empty or split.test.empty:
        raise DataError(
            f"{ds.name}: no user has 3 or more interactions, so none can hold out a validation "
            "and a test item (leave-last-out); models could be trained but never evaluated"
        )
    part = make_partition(ds, partition, clients or None, seed)
    feats = ds.user_feature_codes()
    train = LocalData(build_sequences(split.train, max_len, np.arange(ds.num_users)), feats)
    seen = user_item_sets(ds.interactions, ds.num_users)
    rng = np.random.default_rng(seed)
    valid = _eval_set(split.train, split.valid, ds, feats, seen, max_len, rng)
    test_hist = pd.concat([split.train, split.valid], ignore_index=True)
    test = _eval_set(test_hist, split.test, ds, feats, seen, max_len, rng)
    spec = ModelSpec(
        num_items=ds.num_items,
        item_category=tuple(int(c) for c in ds.items["category_index"]),
        num_categories=ds.num_categories,
        user_feature_cards=ds.user_feature_cards(),
        context_cards=(7, 6),
        max_len=max_len,
    )
    log.info(
        "workload: %s, %d users, %d items, %d clients",
        ds.name,
        ds.num_users,
        ds.num_items,
        part.n_clients,
    )
    return Workload(ds, split, part, train, valid, test, spec)


def _eval_set(history_df, heldout, ds, feats, seen, max_len, rng) -> EvalSet:
    heldout = heldout.sort_values("user", kind="stable")
    users = heldout["user"].to_numpy(np.int64)
    seqs = build_sequences(history_df, max_len, users)
    exclude = user_item_sets(history_df, ds.num_users)
    negatives = (
        np.stack([sampled_negatives(seen[u], ds.num_items, rng) for u in users])
        if len(users)
        else (np.zeros((0, NUM_SAMPLED_NEGATIVES), np.int64))
    )
    return EvalSet(
        users=users,
        history=LocalData(seqs, feats[users]),
        context=context_of(heldout["timestamp"].to_numpy(np.int64)),
        targets=heldout["item"].to_numpy(np.int64),
        negatives=negatives,
        exclude=[exclude[u] for u in users],
    )


def sampled_negatives(seen: np.ndarray, num_items: int, rng: np.random.Generator) -> np.ndarray:
    """99 items outside ``seen``, drawn without replacement from ``rng``."""
    pool = np.setdiff1d(np.arange(num_items), seen, assume_unique=False)
    if pool.size < NUM_SAMPLED_NEGATIVES:
        raise DataError(
            f"a user has interacted with all but {pool.size} of {num_items} items; the sampled "
            f"protocol needs {NUM_SAMPLED_NEGATIVES} unseen items per user"
        )
    return rng.choice(pool, NUM_SAMPLED_NEGATIVES, replace=False)
