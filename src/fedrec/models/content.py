"""Content models: the three tasks as small linear models over frozen public item text, for DP.

Why they exist. Under record-level DP-SGD every trained parameter gets Gaussian noise of the same
scale, and fedrec's silos hold about 45 users each: the ID-based models (TwoTower, DCNv2,
SASRec; 100k-200k parameters, mostly item-ID rows) fall to HR@10 0.12-0.19 at epsilon 8, below
item popularity (README, "Privacy"). Text from a public pretrained encoder costs no budget, and
on ML-100K it already ranks well with no training at all: the mean of a user's (centred,
normalised) history text vectors, dotted with each candidate's, gives test HR@10 0.398
(popularity: 0.404). These models start exactly there and let DP-SGD learn only a projection of
the text (``text_dim x dim``, 24.6k parameters at dim 64) and a text-based popularity head.

* The text table is a buffer: centred on the catalogue mean and L2-normalised (public metadata,
  saved with the model, never sent, never trained).
* ``proj`` (text -> dim, no bias) is initialised to the table's top ``dim`` principal axes
  (computed from the public table alone, so it costs no privacy), which keeps the untrained
  model's cosine scores close to the full-width ones.
* ``pop`` (text -> 1) is a per-item popularity logit predicted from the item's text,
  initialised to zero: a few hundred parameters that every user's positives push the same way,
  the strongest signal there is under heavy noise.

Three heads share this base, one per task, each trained with the task's own loss:

* ``ContentRetrieval`` (recall): user = mean of the projected history; sampled softmax;
  ``user_vectors`` / ``item_vectors`` fold the popularity logit in, so exact or approximate
  inner-product search ranks by the model's own score.
* ``ContentRanking`` (ranking, CTR): the same affinity plus the user's categorical features
  (age, gender, occupation...) against a second text projection; pointwise BCE with a bias, so
  ``sigmoid`` of the score is a (1 : K calibrated) click probability.
* ``ContentSequential`` (personal): the history is averaged with learned recency weights
  (``softmax`` over how many steps ago each item was, zero at start: a plain mean), so recent
  items can count more, as in SASRec, with ``max_len`` parameters instead of attention blocks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedrec.models.base import ModelSpec, SequenceBatch, TaskModel, UserBatch
from fedrec.models.common import (
    FieldEmbedding,
    check_sequences,
    check_spec,
    check_users,
    clean_items,
    last_valid_index,
    masked_mean,
    next_item_targets,
    per_user_mean,
    pointwise_bce,
    prefix_mean,
    sampled_softmax,
)
from fedrec.models.layers import Embedding, Linear


def prepare_text(item_text: Tensor) -> Tensor:
    """Float[I, T]: text vectors centred on the catalogue mean, then L2-normalised.

    Raw sentence embeddings share a large common component (all cosines are positive); removing
    it is what makes the untrained cosine ranking useful (ML-100K test HR@10 0.258 raw, 0.398
    centred)."""
    x = torch.as_tensor(item_text, dtype=torch.float32)
    return F.normalize(x - x.mean(0, keepdim=True), dim=-1)


def principal_axes(table: Tensor, k: int) -> Tensor:
    """Float[k, T]: the top ``k`` right singular vectors of ``table`` (rows: the axes), each
    signed so its largest coordinate is positive (SVD signs are otherwise arbitrary)."""
    _, _, vh = torch.linalg.svd(table.double(), full_matrices=False)
    axes = vh[:k]
    sign = torch.sign(axes.gather(1, axes.abs().argmax(1, keepdim=True)))
    return (axes * sign).float()


class ContentModel(TaskModel):
    """Shared base: the frozen text table, the projection and the popularity head."""

    hparams: dict[str, Any]
    table: Tensor
    pop_bias = False  # a global bias on the popularity logit: BCE needs one, softmax cancels it

    def __init__(
        self,
        spec: ModelSpec,
        *,
        text_dim: int | None = None,
        temperature: float = 0.1,
        item_text: Tensor | None = None,
    ) -> None:
        super().__init__(spec)
        check_spec(spec)
        if item_text is not None:
            text_dim = int(item_text.shape[1])
        if text_dim is None or text_dim < 1:
            raise ValueError("content models need item_text or text_dim >= 1 (the text width)")
        if spec.dim > min(text_dim, spec.num_items):
            raise ValueError(
                f"dim {spec.dim} exceeds the text width {text_dim} or the catalogue size "
                f"{spec.num_items}: the projection is initialised to that many principal axes"
            )
        if temperature <= 0:
            raise ValueError("temperature must be > 0")
        self.hparams = {"text_dim": text_dim, "temperature": temperature}
        self.temperature = temperature
        self.register_buffer("table", torch.zeros(spec.num_items, text_dim))
        self.proj = Linear(text_dim, spec.dim, bias=False)
        self.pop = Linear(text_dim, 1, bias=self.pop_bias)
        nn.init.zeros_(self.pop.weight)
        if self.pop.bias is not None:
            nn.init.zeros_(self.pop.bias)
        if item_text is not None:
            self.set_item_text(item_text)

    def set_item_text(self, item_text: Tensor) -> None:
        """Load public text vectors Float[I, T] (centred and normalised here) and initialise the
        projection to their principal axes."""
        table = prepare_text(item_text)
        if table.shape != self.table.shape:
            raise ValueError(
                f"item_text must be [num_items, text_dim] = {tuple(self.table.shape)}, "
                f"got {tuple(table.shape)}"
            )
        self.table.copy_(table)
        with torch.no_grad():
            self.proj.weight.copy_(principal_axes(table, self.spec.dim))

    def _text(self, ids: Tensor) -> Tensor:
        return self.table[ids]  # (*ids, T)

    def _encode(self, users: UserBatch, cand: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Projected history Float[B, L, d], projected candidates Float[B, N, d] and candidate
        text Float[B, N, T] for cand Long[B, N]. Each layer is called once per forward, as
        Opacus ghost clipping requires."""
        length = users.items.shape[1]
        x = self._text(torch.cat([clean_items(users), cand], 1))
        p = self.proj(x)
        return p[:, :length], p[:, length:], x[:, length:]

    def _affinity(self, user: Tensor, cand_vec: Tensor, cand_text: Tensor) -> Tensor:
        """Cosine of user Float[B, *, d] and candidates Float[B, *, N, d] over the temperature,
        plus each candidate's popularity logit from its text Float[B, *, N, T]: Float[B, *, N]."""
        cos = (F.normalize(user, dim=-1).unsqueeze(-2) * F.normalize(cand_vec, dim=-1)).sum(-1)
        return cos / self.temperature + self.pop(cand_text).squeeze(-1)

    def _history_vector(self, hist: Tensor, users: UserBatch) -> Tensor:
        """Float[B, d]: the user's representation from their projected history Float[B, L, d]."""
        return masked_mean(hist, users.mask)

    def _prefix_vectors(self, hist: Tensor, users: UserBatch, t: int) -> Tensor:
        """Float[B, t, d]: the representation after each of the first t positions."""
        return prefix_mean(hist, users.mask)[:, :t]

    def _user_term(self, feats: Tensor, cand_text: Tensor) -> Tensor | float:
        return 0.0

    def _logits(self, batch: SequenceBatch) -> tuple[Tensor, Any]:
        check_sequences(batch, self.spec)
        tg = next_item_targets(batch)
        b, t, k1 = tg.candidates.shape
        hist, cand, text = self._encode(batch.users, tg.candidates.reshape(b, t * k1))
        user = self._prefix_vectors(hist, batch.users, t)  # (B, T, d)
        text = text.view(b, t, k1, -1)
        logits = self._affinity(user, cand.view(b, t, k1, -1), text)  # (B, T, 1 + K)
        return logits + self._user_term(batch.users.feats, text), tg

    def per_example_loss(self, batch: SequenceBatch) -> Tensor:
        """Float[B]: sampled softmax of each user's next items, averaged over positions."""
        logits, tg = self._logits(batch)
        return per_user_mean(sampled_softmax(logits, tg.hit), tg.valid)

    def score(self, users: UserBatch, candidates: Tensor) -> Tensor:
        """Float[B, N]: the model's logit for each candidate."""
        check_users(users, self.spec)
        hist, cand, text = self._encode(users, candidates)
        user = self._history_vector(hist, users)  # (B, d)
        return self._affinity(user, cand, text) + self._user_term(users.feats, text)


class ContentRetrieval(ContentModel):
    """Recall: a two-tower model whose towers are one shared linear map of the item text."""

    task = "recall"

    def user_vectors(self, users: UserBatch) -> Tensor:
        """Float[B, d + 1]: ``user_vectors @ item_vectors().T`` are the scores of the whole
        catalogue (the last column carries the popularity logit)."""
        check_users(users, self.spec)
        hist = self.proj(self._text(clean_items(users)))
        u = F.normalize(self._history_vector(hist, users), dim=-1) / self.temperature
        return torch.cat([u, torch.ones_like(u[:, :1])], -1)

    def item_vectors(self) -> Tensor:
        """Float[I, d + 1]: every item's normalised projection and popularity logit."""
        v = F.normalize(self.proj(self.table), dim=-1)
        return torch.cat([v, self.pop(self.table)], -1)


class ContentRanking(ContentModel):
    """Ranking (CTR): affinity + popularity + user features against the item text; BCE."""

    task = "ranking"
    pop_bias = True

    def __init__(self, spec: ModelSpec, *, feature_dim: int = 16, **kwargs: Any) -> None:
        super().__init__(spec, **kwargs)
        self.hparams["feature_dim"] = feature_dim
        self.user_feats = FieldEmbedding(spec.user_feature_cards, feature_dim)
        self.feat_proj = Linear(self.table.shape[1], self.user_feats.out_dim, bias=False)
        nn.init.zeros_(self.feat_proj.weight)  # untrained: exactly the content affinity

    def _user_term(self, feats: Tensor, cand_text: Tensor) -> Tensor:
        """Float[B, *, N]: the user's categorical features dotted with each candidate's text."""
        f = self.user_feats(feats)  # (B, F * k)
        c = self.feat_proj(cand_text)  # (B, *, N, F * k)
        while f.dim() < c.dim():
            f = f.unsqueeze(1)
        return (f * c).sum(-1)

    def per_example_loss(self, batch: SequenceBatch) -> Tensor:
        """Float[B]: BCE of each position's (next item, negatives), averaged per user."""
        logits, tg = self._logits(batch)
        return per_user_mean(pointwise_bce(logits, tg.hit), tg.valid)


class ContentSequential(ContentModel):
    """Personalization: the history weighted by learned recency, then the content affinity."""

    task = "personal"

    def __init__(self, spec: ModelSpec, **kwargs: Any) -> None:
        super().__init__(spec, **kwargs)
        self.recency = Embedding(spec.max_len, 1)  # logit by steps-ago; zero: a plain mean
        nn.init.zeros_(self.recency.weight)

    def _weighted(self, vecs: Tensor, ages: Tensor, mask: Tensor) -> Tensor:
        """Float[B, T, d]: for each row of ages Long[B, T, L] (steps ago; negative: later), the
        recency-weighted mean of vecs Float[B, L, d] over the valid (mask Bool[B, L]), earlier
        positions."""
        valid = (ages >= 0) & mask[:, None, :]
        logit = self.recency(ages.clamp(0, self.spec.max_len - 1)).squeeze(-1)  # (B, T, L)
        w = torch.softmax(logit.masked_fill(~valid, float("-inf")), -1)
        w = torch.nan_to_num(w) * valid.any(-1, keepdim=True)  # a row with no history: zeros
        return w @ vecs

    def _prefix_vectors(self, hist: Tensor, users: UserBatch, t: int) -> Tensor:
        b, length = users.mask.shape
        pos = torch.arange(length, device=hist.device)
        ages = (pos[:t, None] - pos[None, :]).expand(b, t, length)  # (B, T, L): steps ago
        return self._weighted(hist, ages, users.mask)

    def _history_vector(self, hist: Tensor, users: UserBatch) -> Tensor:
        length = users.mask.shape[1]
        pos = torch.arange(length, device=hist.device)
        ages = (last_valid_index(users.mask)[:, None] - pos[None, :]).unsqueeze(1)  # (B, 1, L)
        return self._weighted(hist, ages, users.mask).squeeze(1)


CONTENT_MODELS: dict[str, type[ContentModel]] = {
    "recall": ContentRetrieval,
    "ranking": ContentRanking,
    "personal": ContentSequential,
}
