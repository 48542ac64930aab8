"""SASRec ('personal'): next-item prediction with causal self-attention (Kang & McAuley 2018).

Attention is written out with ``nn.Linear`` projections instead of ``nn.MultiheadAttention``
(whose packed ``in_proj_weight`` is a bare ``nn.Parameter``), so every trainable layer is an
``nn.Embedding``, ``nn.Linear`` or ``nn.LayerNorm`` (subclasses from ``layers``) that Opacus ghost
clipping supports.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedrec.models.base import ModelSpec, SequenceBatch, TaskModel, UserBatch
from fedrec.models.common import (
    check_sequences,
    check_spec,
    check_users,
    clean_items,
    last_valid_index,
    next_item_targets,
    per_user_mean,
    pointwise_bce,
    sampled_softmax,
)
from fedrec.models.layers import Embedding, Linear

LossName = Literal["softmax", "bce"]


class CausalSelfAttention(nn.Module):
    """Multi-head scaled dot-product attention under a boolean mask (Vaswani et al. 2017)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads, self.dropout = heads, dropout
        self.q, self.k, self.v, self.out = (Linear(dim, dim) for _ in range(4))

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:
        """x Float[B, L, D], allowed Bool[B, 1, L, L] (query, key) -> Float[B, L, D]."""
        b, length, d = x.shape

        def split(y: Tensor) -> Tensor:
            return y.view(b, length, self.heads, d // self.heads).transpose(1, 2)  # (B, H, L, Dh)

        y = F.scaled_dot_product_attention(
            split(self.q(x)), split(self.k(x)), split(self.v(x)), attn_mask=allowed,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B, H, L, Dh)
        return self.out(y.transpose(1, 2).reshape(b, length, d))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: attention, then a point-wise two-layer feed-forward."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, dropout)
        self.ffn = nn.Sequential(
            Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout), Linear(dim, dim)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.ln1(x), allowed))
        return x + self.drop(self.ffn(self.ln2(x)))


def attention_mask(mask: Tensor) -> Tensor:
    """Bool[B, 1, L, L]: query i sees valid keys j <= i, and always itself.

    Seeing itself keeps every row non-empty (no NaN for padded queries or empty users); a valid
    query never sees a padded key because padding is on the right.
    """
    length = mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    eye = torch.eye(length, dtype=torch.bool, device=mask.device)
    return (causal & (mask.unsqueeze(1) | eye)).unsqueeze(1)


class SASRec(TaskModel):
    """Self-attentive sequential recommender; the hidden state at t scores the item at t + 1
    against the shared item-embedding table."""

    task = "personal"
    hparams: dict[str, Any]

    def __init__(
        self,
        spec: ModelSpec,
        *,
        blocks: int = 2,
        heads: int = 1,
        dropout: float = 0.2,
        loss: LossName = "softmax",
    ) -> None:
        """``loss``: 'softmax' (sampled softmax over [positive, K negatives], the default: it
        trains faster and ranks better than the paper's BCE, cf. Klenitskiy & Vasilev 2023) or
        'bce' (the paper's loss)."""
        super().__init__(spec)
        check_spec(spec)
        if blocks < 1 or heads < 1 or not 0.0 <= dropout < 1.0 or loss not in ("softmax", "bce"):
            raise ValueError("need blocks >= 1, heads >= 1, 0 <= dropout < 1, "
                             "loss in ('softmax', 'bce')")
        self.hparams = {
            "blocks": blocks, "heads": heads, "dropout": dropout, "loss": loss,
        }
        self.loss_name = loss
        d = spec.dim
        self.item_emb = Embedding(spec.num_items, d)
        self.pos_emb = Embedding(spec.max_len, d)
        nn.init.normal_(self.item_emb.weight, std=d**-0.5)
        nn.init.normal_(self.pos_emb.weight, std=d**-0.5)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d, heads, dropout) for _ in range(blocks))
        self.ln = nn.LayerNorm(d)

    def _embed(self, users: UserBatch, cand: Tensor) -> tuple[Tensor, Tensor]:
        """Hidden states Float[B, L, D] and candidate embeddings Float[B, N, D] (cand Long[B, N]).

        History and candidates go through the item table in one call (ghost clipping forbids a
        second call); padded positions get a zero item vector, so their ids never matter.
        """
        b, length = users.items.shape
        if length > self.spec.max_len:
            raise ValueError(f"history length {length} exceeds spec.max_len={self.spec.max_len}; "
                             "keep the most recent max_len items")
        e = self.item_emb(torch.cat([clean_items(users), cand], 1))  # (B, L + N, D)
        seq = e[:, :length] * users.mask.unsqueeze(-1)  # (B, L, D)
        positions = torch.arange(length, device=seq.device).repeat(b, 1)  # (B, L) contiguous
        x = self.drop(seq * math.sqrt(seq.shape[-1]) + self.pos_emb(positions))
        allowed = attention_mask(users.mask)
        for block in self.blocks:
            x = block(x, allowed)
        return self.ln(x), e[:, length:]

    def per_example_loss(self, batch: SequenceBatch) -> Tensor:
        """Float[B]: each user's mean next-item loss over valid positions."""
        check_sequences(batch, self.spec)
        tg = next_item_targets(batch)
        b, t, k1 = tg.candidates.shape
        h, c = self._embed(batch.users, tg.candidates.reshape(b, t * k1))
        logits = (h[:, :t].unsqueeze(2) * c.view(b, t, k1, -1)).sum(-1)  # (B, T, 1 + K)
        loss = sampled_softmax if self.loss_name == "softmax" else pointwise_bce
        return per_user_mean(loss(logits, tg.hit), tg.valid)

    def score(self, users: UserBatch, candidates: Tensor) -> Tensor:
        """Float[B, N]: the hidden state at each user's last valid position dotted with the
        candidates' item embeddings."""
        check_users(users, self.spec)
        h, c = self._embed(users, candidates)
        last = last_valid_index(users.mask)  # (B,)
        h_last = h[torch.arange(h.shape[0], device=h.device), last]  # (B, D)
        return torch.einsum("bd,bnd->bn", h_last, c)
