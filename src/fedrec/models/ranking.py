"""DCN-V2 ranking ('ranking'): a click-through-rate model over (user, candidate) pairs.

Deep & Cross Network V2 (Wang et al. 2021): explicit feature crosses
``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l`` with full-rank ``W_l``, in parallel with a deep MLP,
then one logit. The pair's fields are the candidate's ID and category embeddings, the user's
categorical features, the request context, a pooled history vector (its own table) and the
history-candidate elementwise product, a DIN-style interaction (Zhou et al. 2018) kept linear.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fedrec.models.base import ModelSpec, SequenceBatch, TaskModel, UserBatch
from fedrec.models.common import (
    FieldEmbedding,
    ItemText,
    check_sequences,
    check_spec,
    check_users,
    clean_items,
    item_field,
    masked_mean,
    mlp,
    next_item_targets,
    per_user_mean,
    pointwise_bce,
    prefix_mean,
)
from fedrec.models.layers import Embedding, Linear


class DCNv2(TaskModel):
    """Logit of "this candidate is the user's next item"; trained with pointwise BCE.

    Training pairs are the true next item (label 1) and the K uniform negatives (label 0) of each
    position, so ``sigmoid(score)`` is calibrated to that 1 : K mix, not to a deployed CTR.
    """

    task = "ranking"
    hparams: dict[str, Any]
    item_category: Tensor

    def __init__(
        self,
        spec: ModelSpec,
        *,
        field_dim: int = 16,
        cross_layers: int = 2,
        hidden: int = 128,
        dropout: float = 0.1,
        text_dim: int | None = None,
        use_item_id: bool = True,
    ) -> None:
        """``field_dim``: width of each field embedding (CTR models keep fields narrow: the
        cross layers are ``x0_dim ** 2`` parameters each). ``text_dim``: width of the frozen
        public item-text vectors (filled with ``set_item_text``); a trainable projection adds
        them to the item field, beside the item-ID embedding or, with ``use_item_id=False``,
        instead of it (then items unseen in training are scored from their text)."""
        super().__init__(spec)
        check_spec(spec)
        if field_dim < 1 or hidden < 1 or not 1 <= cross_layers <= 4 or not 0.0 <= dropout < 1.0:
            raise ValueError("need field_dim >= 1, hidden >= 1, 1 <= cross_layers <= 4, "
                             "0 <= dropout < 1")
        if not use_item_id and not text_dim:
            raise ValueError("use_item_id=False needs text_dim: items need some representation")
        self.hparams = {
            "field_dim": field_dim, "cross_layers": cross_layers, "hidden": hidden,
            "dropout": dropout, "text_dim": text_dim, "use_item_id": use_item_id,
        }
        f = field_dim
        self.item_id = Embedding(spec.num_items, f) if use_item_id else None
        self.text = ItemText(spec.num_items, text_dim, f) if text_dim else None
        self.item_cat = Embedding(spec.num_categories, f)
        self.history = Embedding(spec.num_items, f)
        self.register_buffer("item_category", torch.tensor(spec.item_category), persistent=False)
        self.user_feats = FieldEmbedding(spec.user_feature_cards, f)
        self.context = FieldEmbedding(spec.context_cards, f)
        x0_dim = 4 * f + self.user_feats.out_dim + self.context.out_dim
        self.cross = nn.ModuleList(Linear(x0_dim, x0_dim) for _ in range(cross_layers))
        self.deep = mlp([x0_dim, hidden, hidden], dropout, last_activation=True)
        self.head = Linear(x0_dim + hidden, 1)

    def _pair_logits(self, cand: Tensor, hist: Tensor, feats: Tensor, ctx: Tensor) -> Tensor:
        """Float[B, T, N] logits of cand Long[B, T, N] given, per position, the pooled history
        Float[B, T, f], user features Long[B, F] and context Long[B, T, C]."""
        b, t, n = cand.shape
        e = item_field(self.item_id, self.text, cand)  # (B, T, N, f)
        grid = (b, t, n, -1)
        h = hist.unsqueeze(2).expand(grid)  # (B, T, N, f)
        u = self.user_feats(feats)[:, None, None, :].expand(grid)  # (B, T, N, F * f)
        x = self.context(ctx).unsqueeze(2).expand(grid)  # (B, T, N, C * f)
        c = self.item_cat(self.item_category[cand])  # (B, T, N, f)
        x0 = torch.cat([e, c, h, h * e, u, x], -1).reshape(b, t * n, -1)  # (B, T * N, x0_dim)
        out = self.head(torch.cat([self._cross(x0), self.deep(x0)], -1))  # (B, T * N, 1)
        return out.view(b, t, n)

    def set_item_text(self, item_text: Tensor) -> None:
        """Copy frozen public text vectors Float[I, T] into the model (not trained)."""
        if self.text is None:
            raise ValueError("this model was built without text_dim: cannot set item_text")
        self.text.set(item_text)

    def _cross(self, x0: Tensor) -> Tensor:
        """DCN-V2 cross network, Float[B, M, x0_dim] -> same shape."""
        x = x0
        for layer in self.cross:
            x = x0 * layer(x) + x
        return x

    def per_example_loss(self, batch: SequenceBatch) -> Tensor:
        """Float[B]: BCE of each position's (next item, negatives), averaged per user."""
        check_sequences(batch, self.spec)
        users = batch.users
        tg = next_item_targets(batch)
        t = tg.candidates.shape[1]
        hist = prefix_mean(self.history(clean_items(users)), users.mask)[:, :t]  # (B, T, f)
        logits = self._pair_logits(tg.candidates, hist, users.feats, batch.context[:, 1:])
        return per_user_mean(pointwise_bce(logits, tg.hit), tg.valid)

    def score(self, users: UserBatch, candidates: Tensor) -> Tensor:
        """Float[B, N] logits; ``sigmoid`` gives the (1 : K calibrated) probability."""
        check_users(users, self.spec)
        hist = masked_mean(self.history(clean_items(users)), users.mask)  # (B, f)
        logits = self._pair_logits(
            candidates.unsqueeze(1), hist.unsqueeze(1), users.feats, users.context.unsqueeze(1)
        )
        return logits.squeeze(1)
