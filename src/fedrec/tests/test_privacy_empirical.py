"""One-run audit lower bound (Steinke, Nasr, Jagielski 2023) (fedrec.privacy.empirical)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedrec.privacy import (
    PrivacyError,
    epsilon_lower_bound_from_scores,
    one_run_lower_bound,
    p_value_one_run,
)


def test_pure_dp_ceiling_has_a_closed_form() -> None:
    # delta = 0 and all r guesses right: p-value = p_eps^r, so eps_LB = logit(beta^(1/r)).
    expected = math.log(0.05 ** (1 / 1000) / (1 - 0.05 ** (1 / 1000)))
    bound = one_run_lower_bound(m=1000, k_pos=500, k_neg=500, correct=1000, delta=0.0)
    assert bound == pytest.approx(expected, abs=1e-6)
    assert bound == pytest.approx(5.809, abs=1e-3)


def test_perfect_guesses_with_delta_reach_the_ceiling() -> None:
    bound = one_run_lower_bound(m=1000, k_pos=500, k_neg=500, correct=1000, delta=1e-5)
    assert 5.7 < bound < 5.81  # the delta term costs a little
    fewer = one_run_lower_bound(m=1000, k_pos=200, k_neg=200, correct=400, delta=1e-5)
    assert fewer == pytest.approx(4.86, abs=0.02)  # ~4.9: the NOTES figure matches 400 guesses


def test_chance_level_guessing_gives_zero() -> None:
    assert one_run_lower_bound(m=1000, k_pos=500, k_neg=500, correct=500, delta=1e-5) == 0.0
    rng = np.random.default_rng(7)
    included = rng.random(1000) < 0.5
    scores = rng.normal(size=1000)
    assert epsilon_lower_bound_from_scores(
        scores, included, k_pos=100, k_neg=100, delta=1e-5
    ) == pytest.approx(0.0, abs=0.3)


def test_leaky_scores_give_a_positive_bound() -> None:
    rng = np.random.default_rng(8)
    included = rng.random(1000) < 0.5
    scores = included * 3.0 + rng.normal(size=1000)  # noise off: members stand out
    bound = epsilon_lower_bound_from_scores(scores, included, k_pos=100, k_neg=100, delta=1e-5)
    assert bound > 3.0


def test_p_value_is_monotone_in_epsilon() -> None:
    ps = [p_value_one_run(m=200, r=100, v=70, epsilon=e, delta=1e-5) for e in (0, 0.5, 1, 2)]
    assert ps == sorted(ps) and ps[0] < 0.05 < ps[-1]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"correct": 11}, "correct <= guesses"),
        ({"k_pos": 600, "k_neg": 600}, "guesses <= m"),
        ({"delta": 1.0}, "delta"),
        ({"beta": 0.0}, "beta"),
        ({"k_pos": -1}, "k_pos"),
    ],
)
def test_validation(kwargs, match) -> None:
    base = {"m": 1000, "k_pos": 5, "k_neg": 5, "correct": 10, "delta": 1e-5}
    with pytest.raises(PrivacyError, match=match):
        one_run_lower_bound(**{**base, **kwargs})


def test_scores_validation() -> None:
    with pytest.raises(PrivacyError, match="same length"):
        epsilon_lower_bound_from_scores([1.0, 2.0], [True], k_pos=1, k_neg=0, delta=1e-5)
    with pytest.raises(PrivacyError, match="exceeds"):
        epsilon_lower_bound_from_scores([1.0, 2.0], [True, False], k_pos=2, k_neg=1, delta=1e-5)
    with pytest.raises(PrivacyError, match="finite"):
        epsilon_lower_bound_from_scores([np.nan], [True], k_pos=1, k_neg=0, delta=1e-5)
