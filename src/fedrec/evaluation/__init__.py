"""Evaluation: per-user ranking metrics, the sampled and full-ranking protocols, baselines.

Numpy only, no Flower: clients, the server and the centralized baseline share this code.
"""

from fedrec.evaluation.baselines import PopularityScorer, popularity_scores
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
from fedrec.evaluation.protocol import (
    ScoreFn,
    evaluate_ctr,
    evaluate_scorer,
    evaluate_scorer_per_user,
)

__all__ = [
    "PopularityScorer",
    "ScoreFn",
    "auc",
    "evaluate_ctr",
    "evaluate_scorer",
    "evaluate_scorer_per_user",
    "full_ranking_ranks",
    "hit_rate",
    "log_loss",
    "metric_key",
    "ndcg",
    "popularity_scores",
    "rank_of_target",
    "recall_at_k",
    "sample_negatives",
    "summarize",
]
