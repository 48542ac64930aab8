"""The sampled and full-ranking protocols, CTR metrics and the popularity baseline."""

from __future__ import annotations

from typing import TypedDict

import numpy as np
import pytest

from fedrec.evaluation.baselines import PopularityScorer, popularity_scores
from fedrec.evaluation.metrics import sample_negatives
from fedrec.evaluation.protocol import (
    ScoreFn,
    evaluate_ctr,
    evaluate_scorer,
    evaluate_scorer_per_user,
)

KEYS = {"hr@10", "ndcg@10", "full/recall@10", "full/recall@20", "full/ndcg@10", "users"}


class EvalSet(TypedDict):
    """The keyword arguments of ``evaluate_scorer`` that describe the evaluated users."""

    targets: np.ndarray
    users: np.ndarray
    negatives: np.ndarray
    exclude: list[np.ndarray]
    num_items: int


def make_eval(n_users: int, n_items: int, seed: int) -> EvalSet:
    """A random eval set: 20 training items per user, one held-out target, 99 negatives."""
    rng = np.random.default_rng(seed)
    seen = [rng.choice(n_items, size=21, replace=False) for _ in range(n_users)]
    return EvalSet(
        targets=np.array([s[0] for s in seen]),
        users=np.arange(n_users) + 1000,
        negatives=sample_negatives(seen, n_items, 99, rng=rng),
        exclude=[s[1:] for s in seen],
        num_items=n_items,
    )


def oracle(targets: np.ndarray) -> ScoreFn:
    def score(rows: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        return (candidates == targets[rows][:, None]).astype(float)
    return score


def test_oracle_scorer_is_perfect() -> None:
    ev = make_eval(50, 300, 0)
    out = evaluate_scorer(oracle(ev["targets"]), **ev, full_ranking=True, batch_size=7)
    assert set(out) == KEYS
    assert out == pytest.approx({**dict.fromkeys(KEYS - {"users"}, 1.0), "users": 50.0})


def test_constant_scorer_gets_zero() -> None:
    ev = make_eval(20, 300, 1)
    out = evaluate_scorer(lambda r, c: np.zeros(c.shape), **ev, full_ranking=True)
    assert out == pytest.approx({**dict.fromkeys(KEYS - {"users"}, 0.0), "users": 20.0})


def test_sampled_only_omits_full_keys() -> None:
    ev = make_eval(10, 300, 2)
    out = evaluate_scorer(oracle(ev["targets"]), **ev, full_ranking=False)
    assert set(out) == {"hr@10", "ndcg@10", "users"}


def test_known_ranks_in_both_protocols() -> None:
    # items scored by id: the target's rank is the number of higher ids left in the candidates
    targets = np.array([90, 80])
    negatives = np.array([[n for n in range(100) if n != t][:99] for t in targets])
    exclude = [np.arange(91, 100), np.arange(85, 100)]
    out = evaluate_scorer_per_user(
        lambda r, c: c.astype(float), targets=targets, users=np.arange(2), negatives=negatives,
        exclude=exclude, num_items=100, full_ranking=True, batch_size=1)
    # sampled: user 0 has 9 higher ids (91..99), user 1 has 19 (81..99) among its negatives
    np.testing.assert_allclose(out["hr@10"], [1.0, 0.0])
    np.testing.assert_allclose(out["ndcg@10"], [1 / np.log2(11), 0.0])
    # full: user 0 keeps nothing above 90; user 1 keeps 81..84 above 80
    np.testing.assert_allclose(out["full/ndcg@10"], [1.0, 1 / np.log2(6)])
    np.testing.assert_allclose(out["full/recall@10"], [1.0, 1.0])


def test_batch_size_does_not_change_results_and_rows_are_right() -> None:
    ev = make_eval(37, 200, 3)
    pref = np.random.default_rng(4).normal(size=(37, 200))

    def score(rows: np.ndarray, cands: np.ndarray) -> np.ndarray:
        return np.take_along_axis(pref[rows], cands, axis=1)

    outs = [evaluate_scorer(score, **ev, full_ranking=True, batch_size=b) for b in (1, 5, 64)]
    assert outs[0] == pytest.approx(outs[1]) and outs[0] == pytest.approx(outs[2])


def test_movielens_sized_full_ranking_is_batched() -> None:
    ev = make_eval(943, 1682, 5)
    calls: list[tuple[int, ...]] = []

    def score(rows: np.ndarray, cands: np.ndarray) -> np.ndarray:
        calls.append(cands.shape)
        return np.random.default_rng(len(calls)).random(cands.shape)

    out = evaluate_scorer(score, **ev, full_ranking=True, batch_size=256)
    assert out["users"] == 943.0
    assert max(s[0] * s[1] for s in calls) <= 256 * 1682
    assert 0.0 <= out["full/recall@10"] <= out["full/recall@20"] <= 1.0


def test_rejects_bad_scorer_and_inputs() -> None:
    ev = make_eval(5, 200, 6)
    with pytest.raises(ValueError, match="score_fn returned shape"):
        evaluate_scorer(lambda r, c: np.zeros(len(c)), **ev, full_ranking=False)
    with pytest.raises(ValueError, match="NaN"):
        evaluate_scorer(lambda r, c: np.full(c.shape, np.nan), **ev, full_ranking=False)
    bad = EvalSet(**ev)
    bad["negatives"] = np.column_stack([ev["targets"], ev["negatives"][:, 1:]])
    with pytest.raises(ValueError, match="contain its own target"):
        evaluate_scorer(lambda r, c: np.zeros(c.shape), **bad, full_ranking=False)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_scorer(lambda r, c: np.zeros(c.shape), **ev, full_ranking=False, batch_size=0)


def test_evaluate_ctr() -> None:
    out = evaluate_ctr(np.array([0.9, 0.2, 0.6, 0.4]), np.array([1, 0, 0, 1]))
    assert out["auc"] == pytest.approx(0.75)
    expected = -np.mean(np.log([0.9, 0.8, 0.4, 0.4]))
    assert out["logloss"] == pytest.approx(expected)


def test_popularity_scores_and_scorer() -> None:
    pop = popularity_scores(np.array([0, 2, 2, 3, 3, 3]), 5)
    np.testing.assert_array_equal(pop, [1, 0, 2, 3, 0])
    scorer = PopularityScorer(np.array([0, 2, 2, 3, 3, 3]), 5)
    np.testing.assert_array_equal(scorer(np.arange(2), np.array([[3, 1], [2, 4]])),
                                  [[3, 0], [2, 0]])
    with pytest.raises(ValueError, match="outside"):
        popularity_scores(np.array([5]), 5)


def test_popularity_baseline_through_the_protocol() -> None:
    # item i has i training interactions; every user's target is the most popular item
    train = np.repeat(np.arange(300), np.arange(300))
    n_users = 10
    seen = [np.array([299]) for _ in range(n_users)]
    negatives = sample_negatives(seen, 300, 99, rng=np.random.default_rng(8))
    out = evaluate_scorer(
        PopularityScorer(train, 300), targets=np.full(n_users, 299), users=np.arange(n_users),
        negatives=negatives, exclude=[np.array([], dtype=np.int64)] * n_users, num_items=300,
        full_ranking=True)
    assert out["hr@10"] == 1.0 and out["full/ndcg@10"] == 1.0
