"""Known-answer and property tests of the per-user ranking and CTR metrics."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedrec.evaluation.metrics import (
    auc,
    full_ranking_ranks,
    hit_rate,
    log_loss,
    metric_key,
    ndcg,
    rank_of_target,
    recall_at_k,
    sample_negatives,
    summarize,
)

# --- rank_of_target, hit_rate, ndcg -------------------------------------------------------------


def test_worked_example_rank_hr_ndcg() -> None:
    ranks = rank_of_target(np.array([[0.9, 0.1, 0.5]]), 2)  # 0.9 beats the target 0.5
    np.testing.assert_array_equal(ranks, [1])
    np.testing.assert_array_equal(hit_rate(ranks, 1), [0.0])
    np.testing.assert_array_equal(hit_rate(ranks, 2), [1.0])
    np.testing.assert_allclose(ndcg(ranks, 2), [1.0 / np.log2(3.0)])
    np.testing.assert_array_equal(ndcg(ranks, 1), [0.0])


def test_per_user_target_columns() -> None:
    scores = np.array([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    np.testing.assert_array_equal(rank_of_target(scores, np.array([0, 1, 2])), [0, 1, 2])
    np.testing.assert_allclose(ndcg(np.array([0, 1, 2]), 10), [1.0, 1 / np.log2(3), 0.5])


def test_ties_are_pessimistic_and_constant_scorer_gets_worst_rank() -> None:
    np.testing.assert_array_equal(rank_of_target(np.array([[1.0, 1.0, 0.0]]), 0), [1])
    np.testing.assert_array_equal(rank_of_target(np.zeros((2, 100)), 0), [99, 99])
    np.testing.assert_array_equal(hit_rate(rank_of_target(np.ones((1, 100)), 0), 10), [0.0])


def test_rank_is_invariant_to_monotone_transforms() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.integers(0, 5, size=(8, 12)).astype(float)  # many ties
        cols = rng.integers(0, 12, size=8)
        expected = rank_of_target(scores, cols)
        np.testing.assert_array_equal(rank_of_target(np.exp(scores) * 3 - 1, cols), expected)
        brute = [sum(scores[u, j] >= scores[u, cols[u]] for j in range(12) if j != cols[u])
                 for u in range(8)]
        np.testing.assert_array_equal(expected, brute)


def test_ndcg_bounded_by_hit_rate() -> None:
    ranks = np.random.default_rng(1).integers(0, 30, size=200)
    for k in (1, 5, 10, 20):
        assert np.all(ndcg(ranks, k) <= hit_rate(ranks, k))
        assert np.all((ndcg(ranks, k) > 0) == (hit_rate(ranks, k) > 0))


@pytest.mark.parametrize(
    ("scores", "col", "match"),
    [
        (np.array([1.0, 2.0]), 0, "2-D"),
        (np.array([[1.0, np.nan]]), 0, "NaN"),
        (np.array([[1.0, 2.0]]), 2, r"\[0, 2\)"),
        (np.array([[1.0, 2.0]]), np.array([0, 1]), "shape"),
    ],
)
def test_rank_of_target_rejects_bad_input(scores: np.ndarray, col: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        rank_of_target(scores, col)  # type: ignore[arg-type]


def test_k_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive integer"):
        ndcg(np.array([0]), 0)


# --- full ranking ------------------------------------------------------------------------------


def test_full_ranking_excludes_training_items_but_never_the_target() -> None:
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]])
    np.testing.assert_array_equal(full_ranking_ranks(scores, np.array([3]), [np.array([])]), [3])
    np.testing.assert_array_equal(
        full_ranking_ranks(scores, np.array([3]), [np.array([0, 2])]), [1])
    np.testing.assert_array_equal(
        full_ranking_ranks(scores, np.array([3]), [np.array([0, 1, 2, 3])]), [0])
    np.testing.assert_array_equal(recall_at_k(np.array([1]), 1), [0.0])
    np.testing.assert_array_equal(recall_at_k(np.array([1]), 2), [1.0])


def test_full_ranking_excluded_items_never_count_even_on_ties() -> None:
    scores = np.array([[0.0, 0.0, 0.0, -np.inf]])  # the target ties excluded and -inf items
    ranks = full_ranking_ranks(scores, np.array([0]), [np.array([1, 2, 3])])
    np.testing.assert_array_equal(ranks, [0])


def test_full_ranking_does_not_modify_scores_and_checks_lengths() -> None:
    scores = np.array([[0.9, 0.8], [0.1, 0.2]])
    kept = scores.copy()
    full_ranking_ranks(scores, np.array([1, 0]), [np.array([0]), np.array([1])])
    np.testing.assert_array_equal(scores, kept)
    with pytest.raises(ValueError, match="one array per user"):
        full_ranking_ranks(scores, np.array([1, 0]), [np.array([0])])
    with pytest.raises(ValueError, match="outside"):
        full_ranking_ranks(scores, np.array([1, 0]), [np.array([5]), np.array([])])


# --- CTR metrics -------------------------------------------------------------------------------


def test_auc_known_values_with_ties() -> None:
    # pairs (pos, neg): (0.5, 0.5) ties -> 1/2, the other three are ordered: 3.5 / 4
    assert auc(np.array([1, 0, 1, 0]), np.array([0.5, 0.5, 0.9, 0.1])) == pytest.approx(0.875)
    assert auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert auc(np.array([1, 0]), np.array([0.3, 0.3])) == pytest.approx(0.5)
    assert auc(np.array([1, 1, 0]), np.array([0.1, 0.2, 0.9])) == pytest.approx(0.0)


def test_auc_equals_pairwise_count() -> None:
    rng = np.random.default_rng(2)
    for _ in range(20):
        y = rng.integers(0, 2, size=30)
        y[:2] = (0, 1)
        s = rng.integers(0, 6, size=30).astype(float)
        pairs = [(p, n) for p, n in itertools.product(s[y == 1], s[y == 0])]
        expected = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs])
        assert auc(y, s) == pytest.approx(expected)


def test_auc_needs_both_classes_and_binary_labels() -> None:
    with pytest.raises(ValueError, match="positive and one negative"):
        auc(np.array([1, 1]), np.array([0.2, 0.3]))
    with pytest.raises(ValueError, match="0 or 1"):
        auc(np.array([2, 0]), np.array([0.2, 0.3]))


def test_log_loss_known_values_and_clipping() -> None:
    y, p = np.array([1, 0]), np.array([0.8, 0.4])
    assert log_loss(y, p) == pytest.approx(-(np.log(0.8) + np.log(0.6)) / 2)
    assert np.isfinite(log_loss(np.array([1, 0]), np.array([0.0, 1.0])))
    assert log_loss(np.array([1, 0]), np.array([0.0, 1.0]), eps=1e-3) == pytest.approx(
        -np.log(1e-3))
    with pytest.raises(ValueError, match="sigmoid"):
        log_loss(np.array([1]), np.array([2.5]))


# --- negatives and summaries -------------------------------------------------------------------


def test_sample_negatives_avoids_every_seen_item_without_replacement() -> None:
    rng = np.random.default_rng(3)
    seen = [rng.choice(200, size=50, replace=False) for _ in range(30)]
    neg = sample_negatives(seen, 200, 99, rng=rng)
    assert neg.shape == (30, 99)
    for u, items in enumerate(seen):
        assert len(np.unique(neg[u])) == 99
        assert not np.isin(neg[u], items).any()
        assert neg[u].min() >= 0 and neg[u].max() < 200


def test_sample_negatives_is_seeded() -> None:
    seen = [np.array([0, 1]), np.array([5])]
    a = sample_negatives(seen, 50, 10, rng=np.random.default_rng(7))
    b = sample_negatives(seen, 50, 10, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)


def test_sample_negatives_rejects_users_with_too_few_unseen_items() -> None:
    with pytest.raises(ValueError, match="user 1 has only 2 unseen items"):
        sample_negatives([np.array([0]), np.arange(8)], 10, 3, rng=np.random.default_rng(0))


def test_summarize_means_and_keys() -> None:
    ranks = np.array([0, 1, 30])
    out = summarize({metric_key("hr", 10): hit_rate(ranks, 10),
                     metric_key("ndcg", 10): ndcg(ranks, 10)})
    assert out == pytest.approx({"hr@10": 2 / 3, "ndcg@10": (1 + 1 / np.log2(3)) / 3})
    assert np.isnan(summarize({"hr@10": np.array([])})["hr@10"])
