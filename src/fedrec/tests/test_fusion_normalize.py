"""Per-user normalisations: known values, invariances and input checks."""

from __future__ import annotations

import numpy as np
import pytest

from fedrec.evaluation.metrics import rank_of_target
from fedrec.fusion.normalize import NORMALIZATIONS, normalize


def test_known_values() -> None:
    s = np.array([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    np.testing.assert_allclose(normalize(s, "zscore"),
                               [[-np.sqrt(1.5), 0.0, np.sqrt(1.5)], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(normalize(s, "rank"), [[0.0, 0.5, 1.0], [0.5, 0.5, 0.5]])
    np.testing.assert_allclose(normalize(np.array([[0.0, np.log(3.0)]]), "sigmoid"), [[0.5, 0.75]])
    np.testing.assert_array_equal(normalize(s, "none"), s)


def test_rank_averages_ties() -> None:
    np.testing.assert_allclose(normalize(np.array([[3.0, 1.0, 3.0, 2.0, 1.0]]), "rank"),
                               [[0.875, 0.125, 0.875, 0.5, 0.125]])
    np.testing.assert_allclose(normalize(np.array([[7.0], [1.0]]), "rank"), [[0.5], [0.5]])


@pytest.mark.parametrize("method", NORMALIZATIONS)
def test_every_method_keeps_each_users_order(method: str) -> None:
    rng = np.random.default_rng(0)
    s = rng.normal(size=(30, 40)) * rng.uniform(0.1, 3.0, size=(30, 1))
    cols = rng.integers(0, 40, size=30)
    np.testing.assert_array_equal(rank_of_target(normalize(s, method), cols),
                                  rank_of_target(s, cols))


def test_zscore_and_rank_are_scale_free_per_user() -> None:
    rng = np.random.default_rng(1)
    s = rng.normal(size=(10, 20))
    scaled = s * np.arange(1, 11)[:, None] * 1000 + 7
    for method in ("zscore", "rank"):
        np.testing.assert_allclose(normalize(scaled, method), normalize(s, method), atol=1e-9)
    z = normalize(s, "zscore")
    np.testing.assert_allclose(z.mean(axis=1), 0, atol=1e-12)
    np.testing.assert_allclose(z.std(axis=1), 1)
    r = normalize(s, "rank")
    assert r.min() == 0.0 and r.max() == 1.0


def test_sigmoid_does_not_overflow() -> None:
    out = normalize(np.array([[-1e4, 0.0, 1e4]]), "sigmoid")
    np.testing.assert_allclose(out, [[0.0, 0.5, 1.0]])


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown normalization"):
        normalize(np.zeros((1, 2)), "minmax")
    with pytest.raises(ValueError, match="finite"):
        normalize(np.array([[1.0, np.inf]]), "zscore")
    with pytest.raises(ValueError, match="2-D"):
        normalize(np.zeros(3), "none")
