"""Empirical lower bound on epsilon from one training run (Steinke, Nasr, Jagielski 2023).

"Privacy Auditing with One (1) Training Run", NeurIPS 2023, arXiv:2305.08846. Each of ``m``
canaries is included in training independently with probability 1/2. After the single run the
auditor guesses "in" for ``k_pos`` canaries and "out" for ``k_neg`` (abstaining on the rest),
choosing the numbers before looking at the truth. If training is (epsilon, delta)-DP, the number
``W`` of correct guesses among ``r = k_pos + k_neg`` is stochastically dominated by
``Binomial(r, e^eps / (1 + e^eps))`` up to a delta term (the paper's main theorem):

    P[W >= v] <= P[B >= v] + 2 m delta * max_{i=1..v} P[v - i <= B < v] / i,  B ~ Bin(r, p_eps).

The lower bound is the largest epsilon whose p-value for the observed ``v`` is below ``beta``:
with confidence 1 - beta the run is *not* (eps, delta)-DP for any smaller eps. It catches broken
DP (noise off, wrong sampling); for a sound DP-SGD run it is usually near 0, and it can never
exceed what ``m`` canaries allow (about 5.8 for m = 1000, all guessed right, delta = 1e-5).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.special import expit
from scipy.stats import binom

from fedrec.privacy.errors import PrivacyError, check_count

_BISECTION_STEPS = 40
_MAX_EPSILON = 100.0


def p_value_one_run(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P-value of ``v`` correct guesses out of ``r`` under the null "(epsilon, delta)-DP"."""
    _check_counts(m=m, r=r, v=v)
    if epsilon < 0 or not 0 <= delta < 1:
        raise PrivacyError(f"need epsilon >= 0 and 0 <= delta < 1, got {epsilon!r}, {delta!r}.")
    p = float(expit(epsilon))  # accuracy of eps-DP randomised response
    tail = float(binom.sf(v - 1, r, p))  # P[B >= v]
    alpha = 0.0
    if v > 0:
        window = np.cumsum(binom.pmf(np.arange(v - 1, -1, -1), r, p))  # P[v-i <= B < v], i=1..v
        alpha = float(np.max(window / np.arange(1, v + 1)))
    return min(1.0, tail + 2.0 * m * delta * alpha)


def one_run_lower_bound(
    *, m: int, k_pos: int, k_neg: int, correct: int, delta: float, beta: float = 0.05
) -> float:
    """Epsilon lower bound at confidence ``1 - beta`` from ``correct`` right guesses."""
    r = check_count(k_pos, name="k_pos", minimum=0) + check_count(k_neg, name="k_neg", minimum=0)
    _check_counts(m=m, r=r, v=correct)
    if not 0 <= delta < 1:
        raise PrivacyError(f"delta must be in [0, 1), got {delta!r}; use the run's delta.")
    if not 0 < beta < 1:
        raise PrivacyError(f"beta must be in (0, 1), got {beta!r}; 0.05 is usual.")

    def p_at(eps: float) -> float:
        return p_value_one_run(m=m, r=r, v=correct, epsilon=eps, delta=delta)

    if r == 0 or p_at(0.0) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0  # keep p_at(lo) < beta <= p_at(hi)
    while p_at(hi) < beta:
        lo, hi = hi, hi + 1.0
        if hi > _MAX_EPSILON:
            return lo
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if p_at(mid) < beta else (lo, mid)
    return lo


def epsilon_lower_bound_from_scores(
    scores: Sequence[float] | np.ndarray,
    included: Sequence[bool] | np.ndarray,
    *,
    k_pos: int,
    k_neg: int,
    delta: float,
    beta: float = 0.05,
) -> float:
    """Guess the ``k_pos`` highest-scoring canaries "in" and the ``k_neg`` lowest "out".

    Higher score must mean "more likely trained on" (e.g. minus the canary's loss). ``k_pos``
    and ``k_neg`` must be fixed before the scores are seen: trying several and keeping the best
    invalidates the confidence level. Ties are broken by canary index (stable sort).
    """
    s = np.asarray(scores, dtype=float)
    inc = np.asarray(included, dtype=bool)
    if s.ndim != 1 or s.shape != inc.shape:
        raise PrivacyError("scores and included must be 1-D and of the same length.")
    if not np.all(np.isfinite(s)):
        raise PrivacyError("scores must be finite; drop or fix NaN/inf scores first.")
    m = len(s)
    if k_pos + k_neg > m:
        raise PrivacyError(f"k_pos + k_neg = {k_pos + k_neg} exceeds the {m} canaries.")
    order = np.argsort(-s, kind="stable")
    top, bottom = order[:k_pos], order[m - k_neg :]
    correct = int(inc[top].sum() + (~inc[bottom]).sum())
    return one_run_lower_bound(
        m=m, k_pos=k_pos, k_neg=k_neg, correct=correct, delta=delta, beta=beta
    )


def _check_counts(*, m: int, r: int, v: int) -> None:
    check_count(m, name="m")
    check_count(r, name="number of guesses", minimum=0)
    check_count(v, name="correct", minimum=0)
    if not v <= r <= m:
        raise PrivacyError(f"need correct <= guesses <= m, got {v}, {r}, {m}.")
