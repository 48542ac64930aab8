"""Two-tower retrieval ('recall'): users and items embedded apart, scored by a dot product.

The user tower pools the user's history instead of learning a user-ID embedding, as in the
YouTube DNN candidate generator (Covington et al. 2016): no per-user parameters, so DP-SGD spends
no budget on them and a new user is scored from their history alone. Training uses a sampled
softmax over the true next item and K uniform negatives per position, with L2-normalised vectors
and a temperature (Yi et al. 2019).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fedrec.models.base import ModelSpec, SequenceBatch, TaskModel, UserBatch
from fedrec.models.common import (
    FieldEmbedding,
    ItemText,
    check_sequences,
    check_spec,
    check_users,
    clean_items,
    masked_mean,
    mlp,
    next_item_targets,
    per_user_mean,
    prefix_mean,
    sampled_softmax,
)
from fedrec.models.layers import Embedding


class TwoTower(TaskModel):
    """User tower: [mean of history item features, user features] -> MLP -> d.
    Item tower: [item-ID emb (optional), category emb, (projected public text)] -> MLP -> d.

    The history and the candidates share one item-feature table (looked up in one call, which
    Opacus ghost clipping requires); only the towers' MLPs differ.
    """

    task = "recall"
    hparams: dict[str, Any]
    item_category: Tensor

    def __init__(
        self,
        spec: ModelSpec,
        *,
        hidden: int = 128,
        dropout: float = 0.1,
        normalize: bool = True,
        temperature: float = 0.1,
        text_dim: int | None = None,
        item_text: Tensor | None = None,
        use_item_id: bool = True,
    ) -> None:
        """``item_text`` Float[I, T]: frozen public text embeddings of the items (or give only
        ``text_dim`` and fill them later with ``set_item_text``); a trainable projection maps them
        beside the ID embedding, or instead of it with ``use_item_id=False`` (then an item never
        seen in training still gets a vector from its text)."""
        super().__init__(spec)
        check_spec(spec)
        if temperature <= 0 or not 0.0 <= dropout < 1.0 or hidden < 1:
            raise ValueError("temperature must be > 0, dropout in [0, 1) and hidden >= 1")
        if item_text is not None:
            text_dim = int(item_text.shape[1])
        if not use_item_id and not text_dim:
            raise ValueError("use_item_id=False needs text_dim: items need some representation")
        d = spec.dim
        self.hparams = {
            "hidden": hidden, "dropout": dropout, "normalize": normalize,
            "temperature": temperature, "text_dim": text_dim, "use_item_id": use_item_id,
        }
        self.normalize, self.temperature = normalize, temperature
        self.item_id = Embedding(spec.num_items, d) if use_item_id else None
        self.item_cat = Embedding(spec.num_categories, d)
        self.register_buffer("item_category", torch.tensor(spec.item_category), persistent=False)
        self.text = ItemText(spec.num_items, text_dim, d) if text_dim else None
        if item_text is not None:
            self.set_item_text(item_text)
        self.user_feats = FieldEmbedding(spec.user_feature_cards, d)
        feat_dim = d * (1 + int(use_item_id) + int(bool(text_dim)))
        self.user_mlp = mlp([feat_dim + self.user_feats.out_dim, hidden, d], dropout)
        self.item_mlp = mlp([feat_dim, hidden, d], dropout)

    def set_item_text(self, item_text: Tensor) -> None:
        """Copy frozen public text embeddings Float[I, T] into the model (not trained)."""
        if self.text is None:
            raise ValueError("this model was built without text_dim: cannot set item_text")
        self.text.set(item_text)

    def _item_features(self, ids: Tensor) -> Tensor:
        """Float[B, N, d_feat] for item ids Long[B, N] (each table called exactly once)."""
        parts = [self.item_cat(self.item_category[ids])]
        if self.item_id is not None:
            parts.insert(0, self.item_id(ids))
        if self.text is not None:
            parts.append(self.text(ids))  # (B, N, d)
        return torch.cat(parts, -1)

    def _history_and_candidates(self, users: UserBatch, cand: Tensor) -> tuple[Tensor, Tensor]:
        """Item features of the history (B, L, d_feat) and of cand Long[B, N] (B, N, d_feat)."""
        length = users.items.shape[1]
        feats = self._item_features(torch.cat([clean_items(users), cand], 1))
        return feats[:, :length], feats[:, length:]

    def _unit(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=-1) if self.normalize else x

    def _user_tower(self, pooled: Tensor, feats: Tensor) -> Tensor:
        """pooled Float[B, *, d_feat], feats Long[B, F] -> Float[B, *, d]."""
        u = self.user_feats(feats)  # (B, F * d)
        if pooled.dim() == 3:
            u = u.unsqueeze(1).expand(-1, pooled.shape[1], -1)  # (B, T, F * d)
        return self._unit(self.user_mlp(torch.cat([pooled, u], -1)))

    def per_example_loss(self, batch: SequenceBatch) -> Tensor:
        """Float[B]: sampled-softmax loss of each user's next items, averaged over positions."""
        check_sequences(batch, self.spec)
        tg = next_item_targets(batch)
        b, t, k1 = tg.candidates.shape
        hist, cand = self._history_and_candidates(batch.users, tg.candidates.reshape(b, t * k1))
        u = self._user_tower(prefix_mean(hist, batch.users.mask)[:, :t], batch.users.feats)
        v = self._unit(self.item_mlp(cand)).view(b, t, k1, -1)  # (B, T, 1 + K, d)
        logits = (u.unsqueeze(2) * v).sum(-1) / self.temperature  # (B, T, 1 + K)
        return per_user_mean(sampled_softmax(logits, tg.hit), tg.valid)

    def score(self, users: UserBatch, candidates: Tensor) -> Tensor:
        """Float[B, N]: dot products (over the temperature) of users and candidates."""
        check_users(users, self.spec)
        hist, cand = self._history_and_candidates(users, candidates)
        u = self._user_tower(masked_mean(hist, users.mask), users.feats)  # (B, d)
        v = self._unit(self.item_mlp(cand))  # (B, N, d)
        return torch.einsum("bd,bnd->bn", u, v) / self.temperature

    def user_vectors(self, users: UserBatch) -> Tensor:
        """Float[B, d]: user embeddings; ``user_vectors @ item_vectors().T / temperature`` are the
        scores of the whole catalogue."""
        check_users(users, self.spec)
        hist = self._item_features(clean_items(users))  # (B, L, d_feat)
        return self._user_tower(masked_mean(hist, users.mask), users.feats)

    def item_vectors(self) -> Tensor:
        """Float[I, d]: every item's embedding, for full-catalogue retrieval."""
        ids = torch.arange(self.spec.num_items, device=self.item_category.device).unsqueeze(0)
        return self._unit(self.item_mlp(self._item_features(ids))).squeeze(0)
