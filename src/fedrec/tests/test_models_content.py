"""The content models (fedrec.models.content): what they compute untrained, what they learn,
what travels, and that they rebuild from disk."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedrec.models import TASKS, build_model, get_weights, load_model, make_user_batch, save_model
from fedrec.models.content import ContentModel, prepare_text, principal_axes
from fedrec.models.registry import arch_of
from fedrec.models.synthetic import CyclicUsers, cyclic_users, hold_out_last
from fedrec.tests.test_models_contract import _all_items, _batch, _train, hit_rate

TEXT_DIM = 40


def _text(num_items: int, seed: int) -> torch.Tensor:
    return torch.randn(num_items, TEXT_DIM, generator=torch.Generator().manual_seed(seed)) + 3.0


def _content(task: str, data: CyclicUsers, seed: int = 0) -> ContentModel:
    torch.manual_seed(seed)
    model = build_model(task, data.spec, arch="content", item_text=_text(data.spec.num_items, seed))
    assert isinstance(model, ContentModel)
    return model


def test_text_is_centred_and_normalised_and_axes_are_orthonormal() -> None:
    table = prepare_text(_text(60, 1))
    torch.testing.assert_close(table.norm(dim=1), torch.ones(60))
    assert float(prepare_text(_text(60, 1) - 5.0).sub(table).abs().max()) < 1e-5  # shift-free
    axes = principal_axes(table, 8)
    torch.testing.assert_close(axes @ axes.T, torch.eye(8), atol=1e-5, rtol=0)
    flipped = principal_axes(-table, 8)  # the sign convention makes the axes unique
    torch.testing.assert_close(flipped, axes, atol=1e-5, rtol=0)


@pytest.mark.parametrize("task", TASKS)
def test_untrained_model_ranks_by_content_similarity(task: str) -> None:
    """Untrained, every task scores cos(mean of the history's projected text, candidate's):
    worked out here directly from the table and the principal axes."""
    data = cyclic_users(6, seed=2)
    model = _content(task, data).eval()
    users = _batch(data, np.arange(6), seed=2).users
    cands = _all_items(users, 60)
    table = prepare_text(_text(60, 0))
    proj = table @ principal_axes(table, data.spec.dim).T  # (I, d)
    hist = torch.stack([proj[users.items[b][users.mask[b]]].mean(0) for b in range(6)])
    expected = F.normalize(hist, dim=-1) @ F.normalize(proj, dim=-1).T / 0.1
    with torch.no_grad():
        torch.testing.assert_close(model.score(users, cands), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("task", TASKS)
def test_learns_and_only_small_weights_travel(task: str, tmp_path) -> None:
    train, test = cyclic_users(512, seed=5), cyclic_users(256, seed=6)
    model = _content(task, train)
    before = hit_rate(model, test, k=5)
    losses = _train(model, train, steps=120, seed=7)
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:5])
    assert hit_rate(model, test, k=5) > before + 0.1
    weights = get_weights(model)
    assert "table" not in weights and sum(w.size for w in weights.values()) < 5_000
    save_model(model.eval(), tmp_path)
    loaded = load_model(tmp_path)
    assert type(loaded) is type(model) and arch_of(loaded) == "content"
    users = _batch(test, np.arange(16), seed=1).users
    with torch.no_grad():
        assert torch.equal(loaded.score(users, _all_items(users, 60)),
                           model.score(users, _all_items(users, 60)))


def test_sequential_recency_weights_find_the_cycle() -> None:
    """Cyclic users walk groups of 5 items in order, so the next item is the one seen 4 steps
    ago: the learned recency logit peaks there (age 0 = the current item)."""
    data = cyclic_users(512, seed=8)
    model = _content("personal", data)
    _train(model, data, steps=150, seed=8)
    r = model.recency.weight.detach().squeeze(1)
    assert int(r[:8].argmax()) == 4, r[:8]


def test_retrieval_vectors_reproduce_scores() -> None:
    data = cyclic_users(64, seed=12)
    model = _content("recall", data)
    _train(model, data, steps=10, seed=12)  # a non-zero popularity head
    model.eval()
    users = _batch(data, np.arange(8), seed=12).users
    with torch.no_grad():
        assert float(model.pop.weight.abs().sum()) > 0
        full = model.user_vectors(users) @ model.item_vectors().T
        torch.testing.assert_close(full, model.score(users, _all_items(users, 60)))


def test_rejects_a_width_beyond_the_text_and_a_wrong_table() -> None:
    data = cyclic_users(4, seed=13)
    from dataclasses import replace

    with pytest.raises(ValueError, match="principal axes"):
        build_model("recall", replace(data.spec, dim=64), arch="content", text_dim=TEXT_DIM)
    model = _content("recall", data)
    with pytest.raises(ValueError, match="item_text must be"):
        model.set_item_text(torch.zeros(60, 5))
    with pytest.raises(ValueError, match="unknown model family"):
        build_model("recall", data.spec, arch="bert")


def test_held_out_user_scored_from_history_alone() -> None:
    """No per-user parameters: a user never seen in training is scored from their history."""
    data = cyclic_users(32, seed=14)
    model = _content("recall", data).eval()
    items, mask, _ = hold_out_last(data.items, data.mask)
    users = make_user_batch(items, mask, data.feats, data.ctx[:, 0])
    with torch.no_grad():
        assert torch.isfinite(model.score(users, _all_items(users, 60))).all()
