"""LoRA adapters on the text encoder and their DP fine-tuning (issue 6, item 3).

Uses the real all-MiniLM-L6-v2 (offline) on a tiny constructed catalogue: three themes, users
who stay within one theme, so the next item's text is predictable from the history's.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from fedrec.text import TextEncoder, TextError
from fedrec.text.adapter import (
    AdapterTrainConfig,
    AdapterTrainer,
    ItemTokens,
    TextContrastive,
    UserTextBatch,
    _grouped,
    adapter_parameters,
    adapter_state,
    add_lora,
    load_adapter_state,
    tokenize_items,
    train_adapter,
)
from fedrec.training import DPSGDParams

THEMES = {
    "fruit": ["red apple", "ripe banana", "green pear", "sweet mango"],
    "tools": ["steel hammer", "power drill", "wood saw", "tape measure"],
    "music": ["jazz album", "rock guitar", "piano sonata", "folk song"],
}
TEXTS = [t for items in THEMES.values() for t in items]
CFG = AdapterTrainConfig(sample_rate=1.0, lr=3e-3, negatives=3, history=3, max_tokens=32)


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder(max_tokens=32)


@pytest.fixture()
def model(encoder: TextEncoder) -> nn.Module:
    m = copy.deepcopy(encoder.model)
    add_lora(m, layers=2, rank=4, alpha=8, seed=0)
    return m


@pytest.fixture(scope="module")
def tokens(encoder: TextEncoder) -> ItemTokens:
    return tokenize_items(encoder.tokenizer, TEXTS, max_tokens=32)


def histories(n_users: int, seed: int) -> list[np.ndarray]:
    """Each user: 5 items from one theme (items 4t..4t+3), in random order."""
    rng = np.random.default_rng(seed)
    return [4 * (u % 3) + rng.integers(0, 4, size=5) for u in range(n_users)]


def perturb_b(model: nn.Module, seed: int, scale: float = 0.05) -> None:
    """Non-zero B so that A receives gradients too."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter_parameters(model).items():
            if name.endswith("lora_b.weight"):
                p.add_(scale * torch.randn(p.shape, generator=gen))


def hidden(model: nn.Module, encoder: TextEncoder, texts: list[str]) -> torch.Tensor:
    enc = encoder.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).last_hidden_state


def test_adapters_start_as_identity_and_fold_exactly(encoder, model) -> None:
    texts = ["Toy Story (1995). Animation", "a much longer text about lamps and desks", "x"]
    torch.testing.assert_close(
        hidden(model, encoder, texts), hidden(encoder.model, encoder, texts), atol=1e-6, rtol=0
    )
    perturb_b(model, seed=1)
    plain = hidden(model, encoder, texts * 2)
    with _grouped(model, 3):  # two groups of three rows: the same numbers
        torch.testing.assert_close(hidden(model, encoder, texts * 2), plain, atol=1e-5, rtol=0)


def test_only_adapters_are_trainable_and_travel(model) -> None:
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    state = adapter_state(model)
    assert trainable == set(state) == set(adapter_parameters(model))
    assert len(state) == 8  # 2 layers x (query, value) x (A, B)
    assert all(".layer.4." in k or ".layer.5." in k for k in state)
    assert {v.shape for v in state.values()} == {(4, 384), (384, 4)}
    assert all(v.dtype == np.float32 for v in state.values())
    b = [v for k, v in state.items() if k.endswith("lora_b.weight")]
    assert all(not v.any() for v in b)


def test_add_lora_rejects_bad_settings(encoder, model) -> None:
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model)
    fresh = copy.deepcopy(encoder.model)
    for kwargs in ({"layers": 0}, {"layers": 7}, {"rank": 0}, {"alpha": 0.0}):
        with pytest.raises(ValueError):
            add_lora(fresh, **kwargs)
    with pytest.raises(ValueError, match="no transformer block list"):
        add_lora(nn.Sequential(nn.Linear(2, 2)))


def test_load_adapter_state_round_trips_and_rejects(encoder, model) -> None:
    perturb_b(model, seed=2)
    state = adapter_state(model)
    other = copy.deepcopy(encoder.model)
    add_lora(other, seed=99)
    load_adapter_state(other, state)
    assert all(np.array_equal(v, adapter_state(other)[k]) for k, v in state.items())
    torch.testing.assert_close(
        hidden(other, encoder, ["red apple"]), hidden(model, encoder, ["red apple"])
    )
    key = next(iter(state))
    bad_states = {
        "missing": {k: v for k, v in state.items() if k != key},
        "unexpected": {**state, "encoder.layer.0.x.lora_a.weight": state[key]},
        "shape": {**state, key: np.zeros((8, 384), np.float32)},
        "non-finite": {**state, key: np.full_like(state[key], np.nan)},
    }
    before = adapter_state(other)
    for match, bad in bad_states.items():
        with pytest.raises(ValueError, match=match):
            load_adapter_state(other, bad)
    assert all(np.array_equal(v, adapter_state(other)[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="no LoRA adapters"):
        load_adapter_state(copy.deepcopy(encoder.model), state)


def test_batches_group_texts_per_user(model, tokens) -> None:
    trainer = AdapterTrainer(model, tokens, histories(30, seed=3), CFG, seed=0)
    batch = trainer.make_batch(np.arange(30), np.random.default_rng(0))
    assert batch.ids.shape[:2] == (30, CFG.history + 1 + CFG.negatives)
    pos = batch.ids[:, CFG.history : CFG.history + 1]
    assert not (batch.ids[:, CFG.history + 1 :] == pos).all(-1).any()  # no negative is the positive
    assert batch.history_weight.sum(1).min() >= 1


def test_non_private_steps_lower_the_loss(model, tokens) -> None:
    trainer = AdapterTrainer(model, tokens, histories(12, seed=4), CFG, seed=0)
    users = np.arange(12)
    before = trainer.loss_on(users, seed=7)
    for _ in range(4):
        trainer.step()
    after = trainer.loss_on(users, seed=7)
    trainer.close()
    assert after < before - 0.05, (before, after)


def grad_norm(model: nn.Module) -> float:
    grads = [p.grad.flatten() for p in adapter_parameters(model).values() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.cat(grads)))


def per_user_grad_norm(model, batch: UserTextBatch, i: int) -> float:
    for p in adapter_parameters(model).values():
        p.grad = None
    one = UserTextBatch(
        batch.ids[i : i + 1], batch.mask[i : i + 1], batch.history_weight[i : i + 1]
    )
    TextContrastive(model, history=CFG.history, temperature=CFG.temperature)(one).sum().backward()
    return grad_norm(model)


def test_opacus_norms_are_exact_per_user_norms(model, tokens) -> None:
    perturb_b(model, seed=5)
    dp = DPSGDParams(noise_multiplier=0.0, clipping_norm=1e6, noise_seed=0)
    trainer = AdapterTrainer(model, tokens, histories(2, seed=6), CFG, seed=0, dp=dp)
    batch = trainer.make_batch(np.arange(2), np.random.default_rng(1))
    state = adapter_state(model)
    trainer.make_batch = lambda users, rng: batch  # type: ignore[method-assign]
    trainer.step_on(np.arange(2))
    opacus_norms = trainer.gsm.per_sample_gradient_norms.tolist()
    trainer.close()
    load_adapter_state(model, state)
    alone = [per_user_grad_norm(model, batch, i) for i in range(2)]
    np.testing.assert_allclose(opacus_norms, alone, rtol=1e-4)


def test_clipping_bounds_each_users_contribution(model, tokens) -> None:
    perturb_b(model, seed=8)
    clip = 1e-3
    dp = DPSGDParams(noise_multiplier=0.0, clipping_norm=clip, noise_seed=0)
    trainer = AdapterTrainer(model, tokens, histories(2, seed=9), CFG, seed=0, dp=dp)
    trainer.step_on(np.arange(2))
    assert max(trainer.gsm.per_sample_gradient_norms.tolist()) > 10 * clip  # clipping was active
    trainer.close()
    assert 2 * grad_norm(model) <= 2 * clip * (
        1 + 1e-5
    )  # grad = sum of clipped / expected batch (2)


def test_dp_without_noise_or_clipping_equals_the_plain_step(encoder, tokens) -> None:
    deltas = []
    for dp in (None, DPSGDParams(noise_multiplier=0.0, clipping_norm=1e6, noise_seed=0)):
        m = copy.deepcopy(encoder.model)
        add_lora(m, seed=0)
        perturb_b(m, seed=10)
        start = adapter_state(m)
        trainer = AdapterTrainer(m, tokens, histories(3, seed=11), CFG, seed=0, dp=dp)
        trainer.step_on(np.arange(3))
        trainer.close()
        deltas.append({k: v - start[k] for k, v in adapter_state(m).items()})
    for k, plain in deltas[0].items():
        np.testing.assert_allclose(deltas[1][k], plain, rtol=1e-3, atol=1e-6)
    assert any(np.abs(v).max() > 0 for v in deltas[0].values())


def test_dp_training_changes_only_the_adapters(encoder, model) -> None:
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    start = adapter_state(model)
    dp = DPSGDParams(noise_multiplier=1.0, clipping_norm=1.0, noise_seed=0)
    cfg = AdapterTrainConfig(steps=2, sample_rate=0.5, negatives=2, history=2)
    texts = [*TEXTS, ""]  # one item without text: warned about, never encoded
    with pytest.warns(UserWarning, match="1 of 13 items have no text"):
        stats = train_adapter(model, encoder.tokenizer, histories(6, 12), texts, cfg, seed=0, dp=dp)
    assert stats.steps == 2 and stats.examples == 6 and stats.sample_rate == 0.5
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert all(not np.array_equal(v, start[k]) for k, v in adapter_state(model).items())
    assert not any(m.training for m in model.modules())


def test_bad_input_is_rejected_clearly(encoder, model, tokens) -> None:
    with pytest.raises(TextError, match="fewer than 2 items"):
        tokenize_items(encoder.tokenizer, ["only one", ""])
    with pytest.raises(TextError, match="not valid UTF-8"):
        tokenize_items(encoder.tokenizer, ["fine", b"\xff\xfe"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="invalid sample_rate, negatives"):
        AdapterTrainConfig(sample_rate=0.0, negatives=0)
    with pytest.raises(ValueError, match="no user has 2 or more items"):
        AdapterTrainer(model, tokens, [[0], []], CFG, seed=0)
    with pytest.raises(ValueError, match="out of range"):
        AdapterTrainer(model, tokens, [[0, 12]], CFG, seed=0)
