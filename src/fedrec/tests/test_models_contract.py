"""One contract suite for every task model, on synthetic users with a known next item."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from fedrec.models import (
    TASKS,
    SequenceBatch,
    TaskModel,
    TwoTower,
    UserBatch,
    build_model,
    get_weights,
    load_model,
    make_sequence_batch,
    make_user_batch,
    save_model,
    set_weights,
)
from fedrec.models.synthetic import CyclicUsers, cyclic_users, hold_out_last

K_NEG = 8


def _model(task: str, data: CyclicUsers, seed: int = 0, **hparams: object) -> TaskModel:
    torch.manual_seed(seed)
    return build_model(task, data.spec, **hparams)


def _batch(data: CyclicUsers, rows: np.ndarray, seed: int) -> SequenceBatch:
    gen = torch.Generator().manual_seed(seed)
    return make_sequence_batch(
        data.items[rows], data.mask[rows], data.feats[rows], data.ctx[rows],
        data.spec.num_items, K_NEG, gen,
    )


def _all_items(users: UserBatch, num_items: int) -> torch.Tensor:
    return torch.arange(num_items).expand(users.items.shape[0], num_items)


def _train(model: TaskModel, data: CyclicUsers, steps: int, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    model.train()
    for step in range(steps):
        loss = model.loss(_batch(data, rng.choice(len(data.items), 64, replace=False), step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def hit_rate(model: TaskModel, data: CyclicUsers, k: int) -> float:
    """Share of users whose held-out last item is in the model's top k of the whole catalogue."""
    items, mask, target = hold_out_last(data.items, data.mask)
    users = make_user_batch(items, mask, data.feats, data.ctx[:, 0])
    model.eval()
    with torch.no_grad():
        scores = model.score(users, _all_items(users, data.spec.num_items))
    rank = (scores > scores.gather(1, torch.as_tensor(target)[:, None])).sum(1)
    return float((rank < k).float().mean())


@pytest.mark.parametrize("task", TASKS)
def test_shapes(task: str) -> None:
    data = cyclic_users(16, seed=0)
    model = _model(task, data)
    batch = _batch(data, np.arange(16), seed=0)
    loss = model(batch)
    assert loss.shape == (16,) and bool(torch.isfinite(loss).all()) and bool((loss > 0).all())
    scores = model.score(batch.users, torch.randint(0, 60, (16, 7)))
    assert scores.shape == (16, 7) and bool(torch.isfinite(scores).all())


@pytest.mark.parametrize("task", TASKS)
def test_empty_and_single_item_users_are_harmless(task: str) -> None:
    data = cyclic_users(6, seed=1)
    mask = data.mask.copy()
    mask[0] = False  # empty history
    mask[1, 1:] = False  # a single interaction: nothing to predict
    data = replace(data, mask=mask, items=np.where(mask, data.items, 0))
    model = _model(task, data)
    batch = _batch(data, np.arange(6), seed=1)
    loss = model(batch)
    assert loss[0].item() == 0.0 and loss[1].item() == 0.0
    loss.mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is None or bool(torch.isfinite(p.grad).all()), name
    model.eval()
    scores = model.score(batch.users, _all_items(batch.users, 60))
    assert bool(torch.isfinite(scores).all())


def _pad(batch: SequenceBatch, extra: int, seed: int) -> SequenceBatch:
    """The same users with ``extra`` more padded positions and arbitrary ids where padded."""
    g = torch.Generator().manual_seed(seed)
    u = batch.users
    b, length = u.items.shape
    k, c = batch.negatives.shape[2], batch.context.shape[2]
    mask = torch.cat([u.mask, torch.zeros(b, extra, dtype=torch.bool)], 1)
    noise = torch.randint(0, 60, (b, length + extra), generator=g)
    items = torch.where(mask, torch.cat([u.items, noise[:, length:]], 1), noise)
    negatives = torch.cat([batch.negatives, torch.randint(0, 60, (b, extra, k), generator=g)], 1)
    context = torch.cat([batch.context, torch.randint(0, 7, (b, extra, c), generator=g)], 1)
    return SequenceBatch(UserBatch(items, mask, u.feats, u.context), context, negatives)


@pytest.mark.parametrize("task", TASKS)
def test_padding_invariance(task: str) -> None:
    data = cyclic_users(12, seed=2)
    model = _model(task, data).eval()
    batch = _batch(data, np.arange(12), seed=2)
    padded = _pad(batch, extra=5, seed=3)
    cands = torch.randint(0, 60, (12, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model(padded), model(batch), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            model.score(padded.users, cands), model.score(batch.users, cands), atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("task", TASKS)
def test_learns_the_known_next_item(task: str) -> None:
    train, test = cyclic_users(512, seed=5), cyclic_users(256, seed=6)
    model = _model(task, train)
    losses = _train(model, train, steps=150, seed=7)
    assert np.mean(losses[-10:]) < 0.25 * np.mean(losses[:5])
    hr5 = hit_rate(model, test, k=5)
    assert hr5 > 0.9, f"{task}: HR@5 {hr5:.3f}"


@pytest.mark.parametrize("task", TASKS)
def test_save_load_round_trip(task: str, tmp_path) -> None:
    data = cyclic_users(8, seed=8)
    model = _model(task, data, seed=3).eval()
    save_model(model, tmp_path / task)
    loaded = load_model(tmp_path / task)
    users = _batch(data, np.arange(8), seed=8).users
    cands = _all_items(users, 60)
    with torch.no_grad():
        assert torch.equal(loaded.score(users, cands), model.score(users, cands))
    assert loaded.hparams == model.hparams and loaded.spec == model.spec


@pytest.mark.parametrize("task", TASKS)
def test_weights_travel_between_copies(task: str) -> None:
    data = cyclic_users(8, seed=9)
    a, b = _model(task, data, seed=1).eval(), _model(task, data, seed=2).eval()
    weights = get_weights(a)
    assert list(weights) == [n for n, _ in a.named_parameters()]
    set_weights(b, weights)
    users = _batch(data, np.arange(8), seed=9).users
    with torch.no_grad():
        assert torch.equal(a.score(users, _all_items(users, 60)), b.score(users, _all_items(users, 60)))
    with pytest.raises(ValueError, match="missing"):
        set_weights(b, dict(list(weights.items())[1:]))


@pytest.mark.parametrize("task", TASKS)
def test_rejects_malformed_batches(task: str) -> None:
    data = cyclic_users(4, seed=10)
    model = _model(task, data)
    batch = _batch(data, np.arange(4), seed=10)
    bad_users = replace(batch.users, feats=batch.users.feats[:, :1])
    with pytest.raises(ValueError, match="feats"):
        model(replace(batch, users=bad_users))
    with pytest.raises(ValueError, match="negatives"):
        model(replace(batch, negatives=batch.negatives[..., :0]))


def test_unknown_task_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="recall, ranking, personal"):
        build_model("ctr", cyclic_users(2, seed=0).spec)


def test_two_tower_uses_public_item_text(tmp_path) -> None:
    data = cyclic_users(64, seed=11)
    text = torch.randn(60, 12, generator=torch.Generator().manual_seed(11))
    model = _model("recall", data, item_text=text)
    assert isinstance(model, TwoTower)
    assert model.hparams["text_dim"] == 12 and "item_text" not in get_weights(model)
    losses = _train(model, data, steps=20, seed=11)
    assert losses[-1] < losses[0]
    save_model(model.eval(), tmp_path)
    loaded = load_model(tmp_path)
    assert isinstance(loaded, TwoTower) and torch.equal(loaded.text.table, text)
    with pytest.raises(ValueError, match="item_text"):
        model.set_item_text(torch.zeros(60, 5))


def test_two_tower_vectors_reproduce_scores() -> None:
    data = cyclic_users(8, seed=12)
    model = _model("recall", data).eval()
    assert isinstance(model, TwoTower)
    users = _batch(data, np.arange(8), seed=12).users
    with torch.no_grad():
        full = model.user_vectors(users) @ model.item_vectors().T / model.temperature
        torch.testing.assert_close(full, model.score(users, _all_items(users, 60)))


def test_sasrec_rejects_histories_longer_than_max_len() -> None:
    data = cyclic_users(4, seed=13)
    model = _model("personal", replace(data, spec=replace(data.spec, max_len=5)))
    with pytest.raises(ValueError, match="max_len"):
        model(_batch(data, np.arange(4), seed=13))


@pytest.mark.parametrize("task", ["recall", "ranking"])
def test_text_instead_of_ids_scores_items_by_their_text(task: str, tmp_path) -> None:
    """Without item-ID embeddings two items with the same text are the same item to the model
    (so an item never seen in training is scored from its text), and the text table is public
    data that is saved but never travels."""
    data = cyclic_users(64, seed=13)
    text = torch.randn(60, 12, generator=torch.Generator().manual_seed(13))
    cats = np.asarray(data.spec.item_category)
    twin = int(np.flatnonzero(cats == cats[3])[-1])  # same category as item 3, different id
    other = int(np.flatnonzero(cats == cats[3])[-2])
    assert twin != 3 and other != 3
    text[twin] = text[3]  # a text twin of item 3
    model = _model(task, data, text_dim=12, use_item_id=False)
    model.set_item_text(text)
    weights = get_weights(model)
    assert not any(k.startswith("item_id") for k in weights)
    assert not any(k.endswith("table") for k in weights) and any("text.proj" in k for k in weights)
    losses = _train(model, data, steps=30, seed=13)
    assert losses[-1] < losses[0]
    model.eval()
    batch = _batch(data, np.arange(8), 0).users
    with torch.no_grad():
        scores = model.score(batch, torch.tensor([[3, twin, other]]).expand(batch.items.shape[0], 3))
    torch.testing.assert_close(scores[:, 0], scores[:, 1])
    assert not torch.allclose(scores[:, 0], scores[:, 2])
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    assert torch.equal(loaded.text.table, text) and loaded.item_id is None


def test_ids_off_needs_text() -> None:
    data = cyclic_users(4, seed=14)
    for task in ("recall", "ranking"):
        with pytest.raises(ValueError, match="use_item_id=False needs text_dim"):
            _model(task, data, use_item_id=False)
