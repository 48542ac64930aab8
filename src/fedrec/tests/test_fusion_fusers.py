"""Fusers on constructed cases whose right weights are known, plus the CV objective."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedrec.evaluation.metrics import ndcg, rank_of_target
from fedrec.fusion import (
    FUSERS,
    AverageFuser,
    StackingFuser,
    WeightedFuser,
    cv_objective,
    fit_fuser,
    fuser_from_dict,
    refine_simplex,
    simplex_grid,
    user_folds,
)

U, N = 300, 100


def informative_noise_anti(seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Task a tracks the latent relevance, b is noise, c tracks its negation."""
    rng = np.random.default_rng(seed)
    rel = rng.normal(size=(U, N))
    scores = {"a": rel + 0.5 * rng.normal(size=(U, N)), "b": rng.normal(size=(U, N)),
              "c": -rel + 0.5 * rng.normal(size=(U, N))}
    return scores, rel.argmax(axis=1)


def mixture(seed: int, w_a: float, scale_b: float = 1.0) -> tuple[dict[str, np.ndarray],
                                                                 np.ndarray]:
    """Two complementary tasks; the target maximises ``w_a a + (1 - w_a) b`` plus noise."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(U, N)), rng.normal(size=(U, N))
    latent = w_a * a + (1 - w_a) * b + 0.3 * rng.normal(size=(U, N))
    return {"a": a, "b": scale_b * b}, latent.argmax(axis=1)


def mean_ndcg(fused: np.ndarray, target: np.ndarray) -> float:
    return float(ndcg(rank_of_target(fused, target), 10).mean())


# --- WeightedFuser -----------------------------------------------------------------------------


def test_weighted_puts_the_weight_on_the_informative_task() -> None:
    scores, target = informative_noise_anti(0)
    fuser = WeightedFuser(seed=0).fit(scores, target)
    assert fuser.weights["a"] >= 0.9
    assert fuser.weights["c"] <= 0.05
    assert sum(fuser.weights.values()) == pytest.approx(1.0)
    assert set(fuser.cv_scores) == {"zscore", "rank", "sigmoid", "none"}
    assert fuser.cv_scores[fuser.normalization] == max(fuser.cv_scores.values())


@pytest.mark.parametrize(("seed", "w_a"), [(1, 0.3), (2, 0.6)])
def test_weighted_recovers_the_mixing_weight(seed: int, w_a: float) -> None:
    scores, target = mixture(seed, w_a)
    fuser = WeightedFuser(seed=seed).fit(scores, target)
    assert fuser.weights["a"] == pytest.approx(w_a, abs=0.1)


def test_weighted_recovers_mixture_next_to_a_noise_task() -> None:
    scores, target = mixture(3, 0.3)
    scores["noise"] = np.random.default_rng(4).normal(size=(U, N))
    weights = WeightedFuser(seed=3).fit(scores, target).weights
    assert weights["a"] == pytest.approx(0.3, abs=0.1)
    assert weights["noise"] <= 0.1


def test_normalisation_matters_when_one_task_is_1000x_scaled() -> None:
    scores, target = mixture(5, 0.5, scale_b=1000.0)
    fuser = WeightedFuser(seed=5).fit(scores, target)
    assert fuser.normalization in ("zscore", "rank")
    assert fuser.cv_scores[fuser.normalization] > fuser.cv_scores["none"] + 0.1
    assert fuser.weights["a"] == pytest.approx(0.5, abs=0.15)
    raw = AverageFuser(normalization="none").fit(scores, target).fuse(scores)
    scaled = AverageFuser(normalization="zscore").fit(scores, target).fuse(scores)
    assert mean_ndcg(scaled, target) > mean_ndcg(raw, target) + 0.1


def test_weighted_generalises_to_fresh_users_and_is_seeded() -> None:
    train, test = mixture(6, 0.3), mixture(7, 0.3)
    fuser = WeightedFuser(seed=6).fit(*train)
    again = WeightedFuser(seed=6).fit(*train)
    assert fuser.weights == again.weights and fuser.cv_scores == again.cv_scores
    fused = mean_ndcg(fuser.fuse(test[0]), test[1])
    assert fused > max(mean_ndcg(s, test[1]) for s in test[0].values()) + 0.05


def test_from_weights_and_single_task() -> None:
    scores, target = informative_noise_anti(8)
    fixed = WeightedFuser.from_weights({"a": 1.0, "b": 0.0, "c": 0.0}, "none")
    np.testing.assert_allclose(fixed.fuse(scores), scores["a"])
    single = WeightedFuser(seed=0).fit({"a": scores["a"]}, target)
    assert single.weights == {"a": 1.0}


# --- StackingFuser -----------------------------------------------------------------------------


def test_stacking_beats_average_and_uses_the_anti_informative_task() -> None:
    (train, target), (test, test_target) = informative_noise_anti(9), informative_noise_anti(10)
    stack = StackingFuser(seed=0).fit(train, target)
    avg = AverageFuser().fit(train, target)
    assert stack.weights["a"] > 0 and stack.weights["c"] < 0
    assert abs(stack.weights["b"]) < 0.2 * stack.weights["a"]
    assert mean_ndcg(stack.fuse(test), test_target) > mean_ndcg(avg.fuse(test), test_target) + 0.3
    assert set(stack.cv_scores) == {"1", "0.1", "0.01", "0.001"}


def test_stacking_uses_an_informative_feature() -> None:
    def case(seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
        rng = np.random.default_rng(seed)
        a, log_pop = rng.normal(size=(U, N)), np.log1p(rng.poisson(20.0, size=(U, N)))
        target = (a + 3.0 * log_pop + 0.3 * rng.normal(size=(U, N))).argmax(axis=1)
        return {"a": a}, {"log_pop": log_pop}, target

    scores, feats, target = case(11)
    stack = StackingFuser(seed=0).fit(scores, target, feats)
    assert stack.weights["log_pop"] > 0
    t_scores, t_feats, t_target = case(12)
    stacked = mean_ndcg(stack.fuse(t_scores, t_feats), t_target)
    weighted = fit_fuser("weighted", scores, target, feats, seed=0)
    assert stacked > mean_ndcg(weighted.fuse(t_scores), t_target) + 0.1
    with pytest.raises(ValueError, match="features"):
        stack.fuse(t_scores)


# --- shared contract ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", FUSERS)
def test_round_trip_through_json(method: str) -> None:
    scores, target = informative_noise_anti(13)
    fuser = fit_fuser(method, scores, target, seed=1)
    back = fuser_from_dict(json.loads(json.dumps(fuser.to_dict())))
    assert type(back) is type(fuser) and back.weights == pytest.approx(fuser.weights)
    np.testing.assert_allclose(back.fuse(scores), fuser.fuse(scores))


@pytest.mark.parametrize("method", FUSERS)
def test_contract_errors(method: str) -> None:
    scores, target = informative_noise_anti(14)
    fuser = fit_fuser(method, scores, target)
    with pytest.raises(ValueError, match="tasks"):
        fuser.fuse({"a": scores["a"]})
    with pytest.raises(ValueError, match="NaN"):
        fuser.fuse({**scores, "b": np.full((U, N), np.nan)})
    with pytest.raises(ValueError, match="target_col"):
        fit_fuser(method, scores, np.full(U, N))


def test_registry_and_constructor_checks() -> None:
    assert FUSERS == ("average", "weighted", "stacking")
    with pytest.raises(ValueError, match="unknown fusion method"):
        fit_fuser("median", {"a": np.zeros((5, 3))}, 0)
    with pytest.raises(ValueError, match="not fitted"):
        _ = AverageFuser().weights
    with pytest.raises(ValueError, match="unknown normalization"):
        WeightedFuser(normalizations=("minmax",))
    with pytest.raises(ValueError, match="l2"):
        StackingFuser(l2_grid=(0.0,))
    with pytest.raises(ValueError, match="cannot fill"):
        WeightedFuser().fit({"a": np.zeros((3, 4))}, 0)


# --- objective helpers -------------------------------------------------------------------------


def test_cv_objective_aggregates_exactly_across_clients() -> None:
    scores, target = mixture(15, 0.4)
    weights = {"a": 0.4, "b": 0.6}
    total, n = cv_objective(weights, "zscore", scores, target)
    halves = [cv_objective(weights, "zscore", {t: s[rows] for t, s in scores.items()},
                           target[rows]) for rows in (np.arange(0, 120), np.arange(120, U))]
    assert n == U and sum(h[1] for h in halves) == U
    assert sum(h[0] for h in halves) == pytest.approx(total)
    oracle = {"a": np.eye(N)[target]}
    assert cv_objective({"a": 1.0}, "none", oracle, target) == (pytest.approx(U), U)
    with pytest.raises(ValueError, match="different tasks"):
        cv_objective({"a": 1.0}, "zscore", scores, target)


def test_simplex_grid() -> None:
    grid = simplex_grid(3, 0.1)
    assert grid.shape == (66, 3)
    np.testing.assert_allclose(grid.sum(axis=1), 1.0)
    assert len({tuple(np.round(g, 6)) for g in grid}) == 66
    np.testing.assert_array_equal(simplex_grid(1, 0.1), [[1.0]])
    with pytest.raises(ValueError, match="1/m"):
        simplex_grid(3, 0.3)


def test_refine_simplex_climbs_to_a_smooth_optimum() -> None:
    best = np.array([0.32, 0.18, 0.5])

    def objective(w: np.ndarray) -> float:
        return -float(np.sum((w - best) ** 2))

    w = refine_simplex(objective, np.array([1.0, 0.0, 0.0]), 0.05, 0.00625)
    np.testing.assert_allclose(w, best, atol=0.01)
    assert w.sum() == pytest.approx(1.0) and w.min() >= 0


def test_user_folds_partition_users() -> None:
    folds = user_folds(23, 5, seed=0)
    assert len(folds) == 5 and sorted(np.concatenate(folds).tolist()) == list(range(23))
    assert [f.tolist() for f in folds] == [f.tolist() for f in user_folds(23, 5, seed=0)]
