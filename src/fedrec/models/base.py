"""The one contract every task model keeps, so training, evaluation and fusion treat them alike.

A training example is one *user* (their training history at one client), not one interaction:
per-example gradients are then per-user gradients, and DP-SGD protects a user's whole history at
that site (which implies record-level protection for each interaction).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn


@dataclass(frozen=True)
class UserBatch:
    """What a model may know about the users it scores. No user-ID: users are their histories.

    items:    Long[B, L]  item indices of the history, oldest first, right-padded with 0.
    mask:     Bool[B, L]  True where ``items`` holds a real interaction.
    feats:    Long[B, F]  categorical user features (F may be 0), each column in [0, card_f).
    context:  Long[B, C]  categorical context of the request (e.g. weekday, hour bucket).
    """

    items: Tensor
    mask: Tensor
    feats: Tensor
    context: Tensor


@dataclass(frozen=True)
class SequenceBatch:
    """A training batch: each row is one user's sequence; position t predicts the item at t + 1.

    users:     the histories (``users.context`` is unused in training; see ``context``).
    context:   Long[B, L, C]  context of the interaction at each position.
    negatives: Long[B, L, K]  items sampled uniformly for each position, independent of the batch
               (in-batch negatives would couple examples and break per-example DP clipping).
    """

    users: UserBatch
    context: Tensor
    negatives: Tensor


@dataclass(frozen=True)
class ModelSpec:
    """Everything a model needs to know about the catalogue and features (all public metadata)."""

    num_items: int
    item_category: tuple[int, ...]  # category index per item, len == num_items
    num_categories: int
    user_feature_cards: tuple[int, ...]  # cardinality of each categorical user feature
    context_cards: tuple[int, ...]  # cardinality of each categorical context feature
    max_len: int = 50  # history positions kept (the most recent)
    dim: int = 64  # embedding width


class TaskModel(nn.Module):
    """Base class: ``per_example_loss`` for training, ``score`` for ranking candidates.

    Built only from ``nn.Embedding``, ``nn.Linear`` and ``nn.LayerNorm`` (plus parameter-free ops)
    so Opacus's ghost clipping computes exact per-example gradient norms.
    """

    task: ClassVar[str]

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec

    def per_example_loss(self, batch: SequenceBatch) -> Tensor:
        """Float[B]: each user's mean loss over their valid positions (0 for a user without any)."""
        raise NotImplementedError

    def score(self, users: UserBatch, candidates: Tensor) -> Tensor:
        """Float[B, N] scores of candidates Long[B, N] for each user; higher is better."""
        raise NotImplementedError

    def loss(self, batch: SequenceBatch) -> Tensor:
        return self.per_example_loss(batch).mean()

    def forward(self, batch: SequenceBatch) -> Tensor:  # Opacus wraps forward
        return self.per_example_loss(batch)
