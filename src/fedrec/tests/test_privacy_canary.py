"""Canary audit in one training run (Steinke, Nasr, Jagielski 2023) (fedrec.privacy.canary).

The two end-to-end tests are the audit's contract: it catches DP-SGD with the noise switched off
and does not accuse correctly calibrated DP-SGD at the same claim.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from fedrec.config import FedrecConfig, load_config
from fedrec.models.base import ModelSpec
from fedrec.models.registry import build_model
from fedrec.privacy import PrivacyError, epsilon_opacus
from fedrec.privacy.canary import (
    AuditSettings,
    CanaryAuditResult,
    canary_users,
    format_result,
    make_canaries,
    membership_scores,
    run_canary_audit,
    with_canary_items,
)

CLAIM = 1.0
DELTA = 1e-5
M = 500  # 200 guesses: all right would give a bound near 4.2
FAST = AuditSettings(max_len=10, negatives=8)  # short histories: a few seconds per run


@pytest.fixture(scope="module")
def cfg() -> FedrecConfig:
    return load_config(
        None, {"dataset": "synthetic:merchants=2,users=200,items=300", "partition": "site"}
    )


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny batches gain nothing from threads, and on a shared machine they can be 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _spec() -> ModelSpec:
    return ModelSpec(20, (0,) * 20, 1, (3,), (7, 6), max_len=10, dim=16)


@pytest.mark.usefixtures("one_thread")
def test_dp_sgd_without_noise_is_caught(cfg: FedrecConfig) -> None:
    result = run_canary_audit(
        cfg,
        m=M,
        noise_multiplier=0.0,
        clipping_norm=100.0,
        epsilon=CLAIM,
        delta=DELTA,
        seed=0,
        settings=FAST,
    )
    assert result.noise_multiplier == 0.0
    assert result.correct >= 0.95 * result.guesses
    assert result.lower_bound > CLAIM and result.violated


@pytest.mark.usefixtures("one_thread")
def test_calibrated_dp_sgd_is_not_accused(cfg: FedrecConfig) -> None:
    result = run_canary_audit(cfg, m=M, epsilon=CLAIM, delta=DELTA, seed=0, settings=FAST)
    history = [(result.noise_multiplier, result.sample_rate, result.steps)]
    assert epsilon_opacus(history, delta=DELTA) <= CLAIM  # the run keeps its claim ...
    assert result.lower_bound <= CLAIM and not result.violated  # ... and the audit agrees


def test_canaries_are_fresh_users_included_with_probability_one_half() -> None:
    canaries = make_canaries(300, 1000, np.random.default_rng(0))
    items = np.concatenate([canaries.first, canaries.second])
    assert items.min() == 300 and items.max() == 300 + 2000 - 1
    assert len(np.unique(items)) == 2000  # no item shared between canaries
    assert 0.45 < canaries.included.mean() < 0.55
    rows = np.array([3, 7])
    users = canary_users(canaries, rows, repeats=2, max_len=6, n_feats=1)
    a, b = canaries.first[rows], canaries.second[rows]
    np.testing.assert_array_equal(users.seqs.items[:, :4], np.stack([a, b, a, b], 1))
    np.testing.assert_array_equal(users.seqs.mask, [[True] * 4 + [False] * 2] * 2)
    assert (users.seqs.items[:, 4:] == 0).all() and users.feats.shape == (2, 1)


def test_membership_scores_are_log_probabilities_of_the_second_item() -> None:
    canaries = make_canaries(20, 5, np.random.default_rng(1))
    spec = with_canary_items(_spec(), 5)
    assert spec.num_items == 30 and len(spec.item_category) == 30
    torch.manual_seed(0)
    scores = membership_scores(build_model("personal", spec), canaries, n_feats=1)
    assert scores.shape == (5,) and np.all(scores < 0)
    assert np.all(scores > np.log(1e-6))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"task": "nope"}, "not in the run"),
        ({"client": 2}, "client 2 does not exist"),
        ({"m": 10, "k_guess": 6}, "exceeds the 10 canaries"),
        ({"noise_multiplier": -1.0}, "noise_multiplier must be >= 0"),
        ({"epsilon": 0.0}, "epsilon"),
        ({"delta": 1.0}, "delta"),
    ],
)
def test_bad_arguments_are_refused_before_training(
    cfg: FedrecConfig, kwargs: dict, match: str
) -> None:
    args = {"epsilon": CLAIM, "delta": DELTA, **kwargs}
    with pytest.raises(PrivacyError, match=match):
        run_canary_audit(cfg, **args)


def test_settings_are_validated() -> None:
    with pytest.raises(PrivacyError, match="max_len"):
        AuditSettings(max_len=4, repeats=3)
    with pytest.raises(PrivacyError, match="guess_share"):
        AuditSettings(guess_share=0.7)


def test_format_result_reports_claim_bound_and_verdict() -> None:
    result = CanaryAuditResult(1.0, 3.26, 200, 80, 80, 0.0, 1e-5, 24, 0.177, 2.0)
    text = format_result(result)
    assert "3.26" in text and "claimed 1" in text and "80/80" in text and "VIOLATED" in text
    assert "[" not in text  # rich would read brackets as markup
