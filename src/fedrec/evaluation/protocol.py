"""The evaluation protocol every model, baseline and fused ranker goes through.

Sampled protocol (He et al. 2017, "Neural Collaborative Filtering"): rank the held-out item among
99 items the user never touched, report HR@10 and NDCG@10. Sampled metrics can disagree with full
ranking (Krichene & Rendle 2020, "On Sampled Metrics for Item Recommendation"), so the full
protocol also ranks the whole catalogue, minus the user's training items, for Recall@10/20 and
NDCG@10.

Scorers are called in user batches; the full protocol shrinks the batch so a (batch, items) score
matrix stays below ``FULL_RANKING_MAX_CELLS`` cells.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from fedrec.evaluation.metrics import (
    auc,
    full_ranking_ranks,
    hit_rate,
    log_loss,
    metric_key,
    ndcg,
    rank_of_target,
    recall_at_k,
    summarize,
)

ScoreFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""score_fn(user_rows int (b,), candidates int (b, N)) -> float (b, N); rows index the users."""

SAMPLED_K = 10  # HR@10 / NDCG@10, the NCF protocol's cut-off
FULL_RECALL_KS = (10, 20)  # recall cut-offs of the full-ranking protocol
FULL_NDCG_K = 10
FULL_RANKING_MAX_CELLS = 1 << 22  # ~32 MB of float64 scores per full-ranking batch
FULL_PREFIX = "full/"


def evaluate_scorer(
    score_fn: ScoreFn,
    *,
    targets: np.ndarray,
    users: np.ndarray,
    negatives: np.ndarray,
    exclude: Sequence[np.ndarray],
    num_items: int,
    full_ranking: bool,
    batch_size: int = 256,
) -> dict[str, float]:
    """Mean metrics over users: "hr@10", "ndcg@10", the "full/..." ones if asked, and "users".

    ``targets[u]`` is user row ``u``'s held-out item, ``negatives[u]`` its sampled negatives
    and ``exclude[u]`` its training items (dropped from the full ranking). ``users`` holds the
    rows' user ids; ``score_fn`` receives row positions into these arrays, not ids. Full-ranking
    keys are present only when ``full_ranking`` is true.
    """
    per_user = evaluate_scorer_per_user(
        score_fn, targets=targets, users=users, negatives=negatives, exclude=exclude,
        num_items=num_items, full_ranking=full_ranking, batch_size=batch_size,
    )
    return {**summarize(per_user), "users": float(len(targets))}


def evaluate_scorer_per_user(
    score_fn: ScoreFn,
    *,
    targets: np.ndarray,
    users: np.ndarray,
    negatives: np.ndarray,
    exclude: Sequence[np.ndarray],
    num_items: int,
    full_ranking: bool,
    batch_size: int = 256,
) -> dict[str, np.ndarray]:
    """Like :func:`evaluate_scorer` but one float64 (U,) array per metric, for exact
    aggregation of sums across clients."""
    targets, users = np.asarray(targets, np.int64), np.asarray(users)
    negatives = np.asarray(negatives, np.int64)
    _check_inputs(targets, users, negatives, exclude, num_items, batch_size)
    candidates = np.concatenate([targets[:, None], negatives], axis=1).astype(np.int64)
    ranks = _sampled_ranks(score_fn, candidates, batch_size)
    out = {metric_key("hr", SAMPLED_K): hit_rate(ranks, SAMPLED_K),
           metric_key("ndcg", SAMPLED_K): ndcg(ranks, SAMPLED_K)}
    if full_ranking:
        full = _full_ranks(score_fn, targets, exclude, num_items, batch_size)
        for k in FULL_RECALL_KS:
            out[FULL_PREFIX + metric_key("recall", k)] = recall_at_k(full, k)
        out[FULL_PREFIX + metric_key("ndcg", FULL_NDCG_K)] = ndcg(full, FULL_NDCG_K)
    return out


def evaluate_ctr(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Click-through metrics of predicted probabilities: {"auc": ..., "logloss": ...}."""
    return {"auc": auc(labels, probs), "logloss": log_loss(labels, probs)}


def _check_inputs(
    targets: np.ndarray, users: np.ndarray, negatives: np.ndarray,
    exclude: Sequence[np.ndarray], num_items: int, batch_size: int,
) -> None:
    n = len(targets)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if targets.ndim != 1 or users.shape != (n,) or len(exclude) != n:
        raise ValueError(f"targets, users and exclude need one entry per user: got "
                         f"{targets.shape}, {users.shape} and {len(exclude)}")
    if negatives.ndim != 2 or negatives.shape[0] != n:
        raise ValueError(f"negatives must be (users, n_negatives), got {negatives.shape} "
                         f"for {n} users")
    for name, arr in (("targets", targets), ("negatives", negatives)):
        if arr.size and (arr.min() < 0 or arr.max() >= num_items):
            raise ValueError(f"{name} hold item ids outside [0, {num_items})")
    if n and (negatives == targets[:, None]).any():
        raise ValueError("a user's negatives contain its own target; resample the negatives")


def _call(score_fn: ScoreFn, rows: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    scores = np.asarray(score_fn(rows, candidates), dtype=np.float64)
    if scores.shape != candidates.shape:
        raise ValueError(f"score_fn returned shape {scores.shape}, expected {candidates.shape} "
                         "(one score per candidate)")
    return scores


def _sampled_ranks(score_fn: ScoreFn, candidates: np.ndarray, batch_size: int) -> np.ndarray:
    ranks = np.empty(len(candidates), dtype=np.int64)
    for start in range(0, len(candidates), batch_size):
        rows = np.arange(start, min(start + batch_size, len(candidates)))
        ranks[rows] = rank_of_target(_call(score_fn, rows, candidates[rows]), 0)
    return ranks


def _full_ranks(
    score_fn: ScoreFn, targets: np.ndarray, exclude: Sequence[np.ndarray], num_items: int,
    batch_size: int,
) -> np.ndarray:
    step = max(1, min(batch_size, FULL_RANKING_MAX_CELLS // max(num_items, 1)))
    ranks = np.empty(len(targets), dtype=np.int64)
    for start in range(0, len(targets), step):
        stop = min(start + step, len(targets))
        rows = np.arange(start, stop)
        all_items = np.tile(np.arange(num_items, dtype=np.int64), (len(rows), 1))  # (b, I)
        scores = _call(score_fn, rows, all_items)
        ranks[rows] = full_ranking_ranks(scores, targets[rows], exclude[start:stop])
    return ranks
