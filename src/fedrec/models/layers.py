"""``Linear`` and ``Embedding``: standard layers whose per-example gradient norms Opacus computes
faster, registered with Opacus under their own types (its rules for the base classes are untouched).

Ghost clipping (Li et al. 2022) gets a linear layer's per-example gradient norm from the
``N x N`` Gram matrices of its inputs and output gradients, which costs ``O(B N^2 (d_in + d_out))``
for N rows per example; instantiating each example's gradient costs ``O(B N d_in d_out)``. With
hundreds of candidates per user (positions x negatives) N^2 dwarfs ``d_in * d_out``, so this layer
picks per call, as mixed ghost clipping does (Bu et al. 2022, "Scalable and Efficient Training
of Large Convolutional Neural Networks with Differential Privacy"). It also accepts inputs of
any rank (Opacus's rule for ``nn.Linear`` handles only 2-D and 3-D ones). Both rules give exact
norms; the choice only changes speed and memory.

``Embedding`` computes the same norms as Opacus's ``embedding_norm_sample`` (sum each example's
output gradients per distinct row, then square and add) but finds distinct (example, row) pairs by a 1-D
``torch.unique`` on ``example * vocab + row`` instead of a much slower row-wise ``unique(dim=0)``.
"""

from __future__ import annotations

import torch
from opacus.grad_sample.embedding import compute_embedding_grad_sample
from opacus.grad_sample.linear import compute_linear_grad_sample
from opacus.grad_sample.utils import register_grad_sampler, register_norm_sampler
from torch import Tensor, nn


class Linear(nn.Linear):
    """``nn.Linear`` with a mixed ghost / instantiated per-example gradient norm under Opacus."""


register_grad_sampler(Linear)(compute_linear_grad_sample)


@register_norm_sampler(Linear)
def linear_norm_sample(
    layer: Linear, activations: list[Tensor], backprops: Tensor
) -> dict[Tensor, Tensor]:
    """Per-example gradient norms Float[B] of ``layer``'s weight and bias."""
    g = backprops.reshape(backprops.shape[0], -1, backprops.shape[-1])  # (B, N, d_out)
    a = activations[0].to(g.dtype).reshape(g.shape[0], -1, layer.in_features)  # (B, N, d_in)
    out: dict[Tensor, Tensor] = {}
    if layer.weight.requires_grad:
        out[layer.weight] = _weight_norm(a, g)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = g.sum(1).norm(dim=-1)  # the bias gradient is sum_n g_n
    return out


def _weight_norm(a: Tensor, g: Tensor) -> Tensor:
    """|| sum_n g_n a_n^T ||_F per example, by Gram matrices or by the gradient itself."""
    n, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
    if n * n <= d_in * d_out:
        gram = torch.bmm(g, g.transpose(1, 2)) * torch.bmm(a, a.transpose(1, 2))  # (B, N, N)
        return gram.sum((1, 2)).clamp(min=0).sqrt()
    return torch.bmm(g.transpose(1, 2), a).flatten(1).norm(dim=1)  # (B, d_out * d_in)


class Embedding(nn.Embedding):
    """``nn.Embedding`` with a faster (same-valued) per-example gradient norm under Opacus."""


register_grad_sampler(Embedding)(compute_embedding_grad_sample)


@register_norm_sampler(Embedding)
def embedding_norm_sample(
    layer: Embedding, activations: list[Tensor], backprops: Tensor
) -> dict[Tensor, Tensor]:
    """Per-example gradient norms Float[B] of ``layer.weight``."""
    ids = activations[0].reshape(activations[0].shape[0], -1)  # (B, N)
    b, n = ids.shape
    rows = torch.arange(b, device=ids.device).repeat_interleave(n)  # (B * N,)
    keys, inverse = torch.unique(rows * layer.num_embeddings + ids.reshape(-1), return_inverse=True)
    g = backprops.reshape(b * n, -1)  # (B * N, D)
    summed = g.new_zeros(len(keys), g.shape[1]).index_add_(0, inverse, g)  # (U, D)
    sq = g.new_zeros(b).index_add_(0, keys // layer.num_embeddings, summed.pow(2).sum(1))
    return {layer.weight: sq.sqrt()}
