"""The paired bootstrap behind 'fused minus best single model' (known answers)."""

from __future__ import annotations

import numpy as np

from fedrec.fusion.evaluate import paired_difference
from fedrec.report import fusion_lines


def _scores(hit: np.ndarray) -> np.ndarray:
    """(U, 100) scores whose target (column 0) ranks first where ``hit`` else last."""
    s = np.tile(np.linspace(1.0, 0.0, 100), (len(hit), 1))
    s[~hit, 0] = -1.0
    return s


def test_identical_scorers_differ_by_exactly_zero() -> None:
    s = _scores(np.random.default_rng(0).random(200) < 0.5)
    d = paired_difference(s, s, seed=1)
    assert d["hr@10"] == d["hr@10_ci95_low"] == d["hr@10_ci95_high"] == 0.0


def test_difference_and_interval_on_a_known_case() -> None:
    rng = np.random.default_rng(2)
    base = rng.random(400) < 0.4
    better = base | (rng.random(400) < 0.5)  # hits wherever base does, and more
    d = paired_difference(_scores(better), _scores(base), seed=3)
    expected = better.mean() - base.mean()
    assert np.isclose(d["hr@10"], expected) and np.isclose(d["ndcg@10"], expected)
    assert 0 < d["hr@10_ci95_low"] < expected < d["hr@10_ci95_high"]
    sd = np.sqrt(((better ^ base) - expected).var() / 400)  # paired standard error
    assert abs((d["hr@10_ci95_high"] - d["hr@10_ci95_low"]) / (2 * 1.96 * sd) - 1) < 0.15


def test_report_states_the_difference_with_its_interval() -> None:
    vs = {"task": "personal", "hr@10": -0.001, "hr@10_ci95_low": -0.01, "hr@10_ci95_high": 0.008,
          "ndcg@10": 0.002, "ndcg@10_ci95_low": -0.004, "ndcg@10_ci95_high": 0.009}
    lines = fusion_lines({"method": "weighted", "normalization": "zscore",
                          "weights": {"recall": 0.5, "personal": 0.5}, "vs_best_single": vs})
    assert "best single model (personal): hr@10 -0.0010 (95% CI -0.0100 to +0.0080)" in lines[-1]
