"""Building blocks the task models share: input checks, pooling, next-item targets and losses.

Everything here is either parameter-free or built from ``layers.Embedding`` / ``layers.Linear``, and
every layer is called once per forward pass with its batch dimension first, because Opacus's ghost
clipping (Li et al. 2022) supports neither reused layers nor inputs whose first dimension is not
the example.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate, pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedrec.models.base import ModelSpec, SequenceBatch, UserBatch
from fedrec.models.layers import Embedding, Linear


def check_spec(spec: ModelSpec) -> None:
    """Reject a catalogue description the models cannot embed."""
    if spec.num_items < 1 or spec.num_categories < 1 or spec.dim < 1 or spec.max_len < 1:
        raise ValueError(f"num_items, num_categories, dim and max_len must be >= 1, got {spec}")
    if len(spec.item_category) != spec.num_items:
        raise ValueError(
            f"item_category has {len(spec.item_category)} entries, expected num_items="
            f"{spec.num_items}"
        )
    if min(spec.item_category) < 0 or max(spec.item_category) >= spec.num_categories:
        raise ValueError(f"item_category values must lie in [0, {spec.num_categories})")
    if any(c < 1 for c in (*spec.user_feature_cards, *spec.context_cards)):
        raise ValueError("every feature cardinality must be >= 1")


def check_users(users: UserBatch, spec: ModelSpec) -> None:
    """Shape checks on a ``UserBatch`` (values are checked where they are embedded)."""
    if users.items.dim() != 2 or users.mask.shape != users.items.shape:
        raise ValueError(
            f"items and mask must both be [B, L]; got {tuple(users.items.shape)} and "
            f"{tuple(users.mask.shape)}"
        )
    if users.mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {users.mask.dtype}")
    b = users.items.shape[0]
    if users.feats.shape != (b, len(spec.user_feature_cards)):
        raise ValueError(f"feats must be [B, {len(spec.user_feature_cards)}], got "
                         f"{tuple(users.feats.shape)}")
    if users.context.shape != (b, len(spec.context_cards)):
        raise ValueError(f"context must be [B, {len(spec.context_cards)}], got "
                         f"{tuple(users.context.shape)}")


def check_sequences(batch: SequenceBatch, spec: ModelSpec) -> None:
    """Shape checks on a ``SequenceBatch``."""
    check_users(batch.users, spec)
    b, length = batch.users.items.shape
    if batch.context.shape != (b, length, len(spec.context_cards)):
        raise ValueError(f"context must be [B, L, {len(spec.context_cards)}], got "
                         f"{tuple(batch.context.shape)}")
    if batch.negatives.dim() != 3 or batch.negatives.shape[:2] != (b, length):
        raise ValueError(f"negatives must be [B, L, K], got {tuple(batch.negatives.shape)}")
    if batch.negatives.shape[2] < 1:
        raise ValueError("negatives must hold at least one item per position (K >= 1)")


def clean_items(users: UserBatch) -> Tensor:
    """Long[B, L] item ids with padded positions set to 0, so padding ids never matter."""
    return users.items.masked_fill(~users.mask, 0)


def mlp(dims: Sequence[int], dropout: float, *, last_activation: bool = False) -> nn.Sequential:
    """Linear layers of widths ``dims`` with ReLU (and dropout) between them."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(pairwise(dims)):
        layers.append(Linear(d_in, d_out))
        if i < len(dims) - 2 or last_activation:
            layers += [nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


class FieldEmbedding(nn.Module):
    """Categorical fields embedded through one table (per-field offsets), concatenated.

    One table instead of one per field keeps every field in a single ``nn.Embedding`` call.
    """

    cards: Tensor
    offsets: Tensor
    table: nn.Embedding | None

    def __init__(self, cards: Sequence[int], dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("cards", torch.tensor(list(cards), dtype=torch.long), persistent=False)
        offsets = [0, *accumulate(cards)][:-1]
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.long), persistent=False)
        self.table = Embedding(sum(cards), dim) if len(cards) else None

    @property
    def out_dim(self) -> int:
        return self.dim * len(self.cards)

    def forward(self, x: Tensor) -> Tensor:
        """Long[..., F] -> Float[..., F * dim]."""
        if self.table is None:
            return torch.zeros(*x.shape[:-1], 0, device=x.device)
        if ((x < 0) | (x >= self.cards)).any():
            raise ValueError(f"categorical feature out of range: cardinalities {self.cards.tolist()}")
        return self.table(x + self.offsets).flatten(-2)  # (..., F * dim)


def prefix_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Float[B, L, D]: at t, the mean of x over valid positions <= t (zeros before any)."""
    w = mask.unsqueeze(-1).to(x.dtype)  # (B, L, 1)
    return (x * w).cumsum(1) / w.cumsum(1).clamp(min=1.0)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Float[B, D]: mean of x Float[B, L, D] over valid positions (zeros for an empty row)."""
    w = mask.unsqueeze(-1).to(x.dtype)  # (B, L, 1)
    return (x * w).sum(1) / w.sum(1).clamp(min=1.0)


def last_valid_index(mask: Tensor) -> Tensor:
    """Long[B]: index of each row's last valid position (0 for an empty row)."""
    pos = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, pos, 0).amax(1)


@dataclass(frozen=True)
class NextItemTargets:
    """What position t (0 <= t < L - 1) is trained to predict: the item at t + 1 among negatives.

    candidates: Long[B, T, 1 + K]  column 0 is the true next item, the rest its negatives.
    valid:      Bool[B, T]         position t has a history and a target (mask[t] & mask[t + 1]).
    hit:        Bool[B, T, 1 + K]  a negative equal to the true next item (an accidental hit).
    """

    candidates: Tensor
    valid: Tensor
    hit: Tensor


def next_item_targets(batch: SequenceBatch) -> NextItemTargets:
    """Align each position with its target and negatives (T = L - 1 positions)."""
    mask = batch.users.mask
    pos = clean_items(batch.users)[:, 1:]  # (B, T)
    neg = batch.negatives[:, :-1]  # (B, T, K)
    candidates = torch.cat([pos.unsqueeze(-1), neg], -1)  # (B, T, 1 + K)
    hit = candidates == pos.unsqueeze(-1)
    hit[..., 0] = False
    return NextItemTargets(candidates, mask[:, :-1] & mask[:, 1:], hit)


def sampled_softmax(logits: Tensor, hit: Tensor) -> Tensor:
    """Float[B, T]: cross-entropy of column 0 against the sampled columns (Jean et al. 2015).

    Negatives are uniform, so the logQ correction of Yi et al. (2019) is a constant and cancels;
    accidental hits are removed, as in TensorFlow's ``sampled_softmax_loss``.
    """
    logits = logits.masked_fill(hit, float("-inf"))  # column 0 is never masked
    return torch.logsumexp(logits, -1) - logits[..., 0]


def pointwise_bce(logits: Tensor, hit: Tensor) -> Tensor:
    """Float[B, T]: mean binary cross-entropy, label 1 for column 0, 0 for each negative."""
    labels = torch.zeros_like(logits)
    labels[..., 0] = 1.0
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    keep = (~hit).to(logits.dtype)
    return (bce * keep).sum(-1) / keep.sum(-1)


def per_user_mean(loss: Tensor, valid: Tensor) -> Tensor:
    """Float[B]: each user's mean loss over valid positions, 0 for a user without any."""
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    return loss.sum(1) / valid.sum(1).clamp(min=1).to(loss.dtype)


class ItemText(nn.Module):
    """Frozen public item-text vectors (a persistent buffer: saved with the model, never sent,
    never trained) and the trainable projection that maps them to the model's width."""

    table: Tensor

    def __init__(self, num_items: int, text_dim: int, out_dim: int) -> None:
        super().__init__()
        self.register_buffer("table", torch.zeros(num_items, text_dim))
        self.proj = Linear(text_dim, out_dim)

    def set(self, item_text: Tensor) -> None:
        """Copy Float[I, T] text vectors in; the shape must match the catalogue."""
        item_text = torch.as_tensor(item_text, dtype=self.table.dtype)
        if item_text.shape != self.table.shape:
            raise ValueError(
                f"item_text must be [num_items, text_dim] = {tuple(self.table.shape)}, "
                f"got {tuple(item_text.shape)}"
            )
        self.table.copy_(item_text.detach())

    def forward(self, ids: Tensor) -> Tensor:
        return self.proj(self.table[ids])  # (*ids, out_dim)


def item_field(item_id: nn.Module | None, text: ItemText | None, ids: Tensor) -> Tensor:
    """One item field: the ID embedding, the projected text, or their sum."""
    parts = [m(ids) for m in (item_id, text) if m is not None]
    return parts[0] if len(parts) == 1 else parts[0] + parts[1]
