"""Opacus ghost clipping on every task model equals clipping naive per-user gradients."""

from __future__ import annotations

import copy
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.grad_sample.embedding_norm_sample import compute_embedding_norm_sample
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

from fedrec.clipping import BookkeepingClipper
from fedrec.models import TASKS, ModelSpec, SequenceBatch, TaskModel, UserBatch, build_model
from fedrec.models.batching import make_sequence_batch
from fedrec.models.layers import Embedding, Linear, embedding_norm_sample, linear_norm_sample
from fedrec.models.synthetic import cyclic_users

B = 8


def _batch(seed: int) -> tuple[SequenceBatch, ModelSpec]:
    data = cyclic_users(B, seed=seed)
    mask = data.mask.copy()
    mask[0] = False  # an empty user: zero gradient
    mask[1, 1:] = False  # a single interaction: zero gradient
    data = replace(data, mask=mask, items=np.where(mask, data.items, 0))
    gen = torch.Generator().manual_seed(seed)
    batch = make_sequence_batch(data.items, data.mask, data.feats, data.ctx, 60, 6, gen)
    return batch, data.spec


def _row(batch: SequenceBatch, i: int) -> SequenceBatch:
    u = batch.users
    users = UserBatch(u.items[i : i + 1], u.mask[i : i + 1], u.feats[i : i + 1], u.context[i : i + 1])
    return SequenceBatch(users, batch.context[i : i + 1], batch.negatives[i : i + 1])


def _naive_grads(model: TaskModel, batch: SequenceBatch) -> torch.Tensor:
    """Float[B, P]: each user's gradient, one backward pass per user."""
    rows = []
    for i in range(B):
        model.zero_grad(set_to_none=True)
        model(_row(batch, i)).sum().backward()
        rows.append(torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
            for p in model.parameters()
        ]))
    return torch.stack(rows)


def _grad(p: torch.Tensor) -> torch.Tensor:
    if p.grad is None:
        raise AssertionError("every parameter should receive a gradient")
    return p.grad


@pytest.mark.parametrize("one_pass", [False, True], ids=["opacus-two-pass", "bookkeeping"])
@pytest.mark.parametrize("arch", ["id", "content"])
@pytest.mark.parametrize("task", TASKS)
def test_ghost_clipping_matches_naive_per_user_clipping(task: str, arch: str, one_pass: bool):
    """Opacus's two backward passes and fedrec's one (fedrec.clipping) give the clipped sum."""
    torch.manual_seed(0)
    batch, spec = _batch(seed=20)
    if arch == "id":
        model = build_model(task, spec, dropout=0.0)  # dropout would differ between the passes
    else:
        text = torch.randn(spec.num_items, 40, generator=torch.Generator().manual_seed(20))
        model = build_model(task, spec, arch="content", item_text=text)
        for p in model.parameters():  # off its zero initialisation: every gradient path live
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(p.numel()))
    grads = _naive_grads(copy.deepcopy(model), batch)  # (B, P)
    norms = grads.norm(dim=1)
    clip = float(norms[norms > 0].median())  # some users clipped, some not
    expected = (grads * (clip / (norms + 1e-6)).clamp(max=1.0)[:, None]).sum(0) / B

    gsm = BookkeepingClipper(model, max_grad_norm=clip) if one_pass else \
        GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean",
                                             max_grad_norm=clip, use_ghost_clipping=True)  # fmt: skip
    opt = DPOptimizerFastGradientClipping(
        torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=clip,
        expected_batch_size=B, loss_reduction="mean",
    )
    opt.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # full backward hooks on integer inputs
        if one_pass:
            gsm.clipped_backward(gsm(batch))
        else:
            DPTensorFastGradientClipping(gsm, opt, gsm(batch), "mean").backward()
    opt.step()  # noise 0: p.grad = sum of clipped per-user gradients / B
    got = torch.cat([_grad(p).flatten() for p in model.parameters()])

    assert norms[0] == 0 and norms[1] == 0
    torch.testing.assert_close(gsm.per_sample_gradient_norms, norms, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("rows", [3, 40])  # N^2 below / above d_in * d_out: both branches
def test_linear_norm_rule_is_exact(rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    layer = Linear(6, 5)
    a = torch.randn(4, rows, 2, 6, generator=g)  # rank 4: Opacus's own rule needs 2-D or 3-D
    back = torch.randn(4, rows, 2, 5, generator=g)
    norms = linear_norm_sample(layer, [a], back)
    w = torch.einsum("bnto,bnti->boi", back, a).flatten(1).norm(dim=1)
    torch.testing.assert_close(norms[layer.weight], w, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(norms[layer.bias], back.sum((1, 2)).norm(dim=1))


def test_embedding_norm_rule_matches_opacus() -> None:
    g = torch.Generator().manual_seed(1)
    layer = Embedding(7, 3)
    ids = torch.randint(0, 7, (5, 4, 6), generator=g)  # repeats within and across examples
    back = torch.randn(5, 4, 6, 3, generator=g)
    ours = embedding_norm_sample(layer, [ids], back)[layer.weight]
    theirs = compute_embedding_norm_sample(layer, [ids], back)[layer.weight]
    torch.testing.assert_close(ours, theirs)


class _Scaled(torch.nn.Linear):
    """A subclass whose forward is not a plain linear layer's: its gradient differs."""

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight / 10, self.bias)


@pytest.mark.parametrize(
    "layer, match",
    [
        (torch.nn.Conv1d(2, 3, 1), "Conv1d"),
        (torch.nn.Embedding(5, 2, padding_idx=0), "padding_idx"),
        (torch.nn.Embedding(5, 2, scale_grad_by_freq=True), "scale_grad_by_freq"),
        (_Scaled(2, 2), "_Scaled"),
    ],
)
def test_one_pass_clipper_refuses_layers_it_cannot_sum(layer, match) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), layer)
    with pytest.raises(NotImplementedError, match=match):
        BookkeepingClipper(model, max_grad_norm=1.0)
    frozen = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Conv1d(2, 3, 1).requires_grad_(False))
    BookkeepingClipper(frozen, max_grad_norm=1.0)  # a layer without trainable parameters is fine


def test_one_pass_equals_opacus_two_passes_under_dropout() -> None:
    """Dropout on (SASRec's defaults): both clippers see one forward pass, the same masks."""
    from fedrec.clipping import ClippingError

    batch, spec = _batch(seed=21)
    grads = {}
    for one_pass in (False, True):
        torch.manual_seed(0)
        model = build_model("personal", spec)  # default dropout
        assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
        gsm = BookkeepingClipper(model, max_grad_norm=4.5) if one_pass else \
            GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean",
                                                 max_grad_norm=4.5, use_ghost_clipping=True)  # fmt: skip
        opt = DPOptimizerFastGradientClipping(
            torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=4.5,
            expected_batch_size=B, loss_reduction="mean",
        )
        opt.zero_grad()
        torch.manual_seed(1)  # the same dropout masks in both forwards
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            if one_pass:
                coef = gsm.clipped_backward(gsm(batch))
                assert int((coef < 1).sum()) == 2  # two of the six with a gradient are clipped
            else:
                DPTensorFastGradientClipping(gsm, opt, gsm(batch), "mean").backward()
        opt.step()
        grads[one_pass] = torch.cat([_grad(p).flatten() for p in model.parameters()])
        if one_pass:  # a parameter made trainable after the clipper was built is refused
            extra = torch.nn.Parameter(torch.zeros(1))
            model.register_parameter("late", extra)
            with pytest.raises(ClippingError, match="trainable parameters changed"):
                gsm.clipped_backward(gsm(batch))
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-4, atol=1e-7)
