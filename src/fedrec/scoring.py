"""Evaluate any task model on an EvalSet through the one scoring contract.

Plain torch + numpy: the server's central evaluation, the centralized baseline and fusion all
call these, so every number in a run directory comes from the same code.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from fedrec.evaluation.protocol import evaluate_ctr, evaluate_scorer
from fedrec.models.base import TaskModel, UserBatch
from fedrec.models.batching import make_user_batch
from fedrec.workload import EvalSet

ScoreFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def model_score_fn(model: TaskModel, ev: EvalSet) -> ScoreFn:
    """score_fn(rows, candidates) for the evaluation protocol: rows index into ``ev``."""

    def score(rows: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            users = user_batch(ev, rows)
            return model.score(users, torch.as_tensor(candidates, dtype=torch.long)).numpy()

    return score


def user_batch(ev: EvalSet, rows: np.ndarray) -> UserBatch:
    h = ev.history
    return make_user_batch(h.seqs.items[rows], h.seqs.mask[rows], h.feats[rows], ev.context[rows])


def evaluate_model(
    model: TaskModel, ev: EvalSet, *, full_ranking: bool, batch_size: int = 256
) -> dict[str, float]:
    """Sampled (HR@10, NDCG@10 among 99 negatives) and optionally full-ranking metrics.

    The ranking (CTR) model also gets AUC and log-loss on target-vs-negatives pairs.
    """
    model.eval()
    score_fn = model_score_fn(model, ev)
    metrics = evaluate_on(
        score_fn,
        ev,
        num_items=model.spec.num_items,
        full_ranking=full_ranking,
        batch_size=batch_size,
    )
    if model.task == "ranking":
        metrics.update(_ctr_metrics(score_fn, ev, batch_size))
    return metrics


def evaluate_on(
    score_fn: ScoreFn, ev: EvalSet, *, num_items: int, full_ranking: bool, batch_size: int = 256
) -> dict[str, float]:
    """Any scorer (a model, popularity, a fused model) through the same protocol on ``ev``."""
    return evaluate_scorer(
        score_fn,
        targets=ev.targets,
        users=ev.users,
        negatives=ev.negatives,
        exclude=ev.exclude,
        num_items=num_items,
        full_ranking=full_ranking,
        batch_size=batch_size,
    )


def sampled_candidates(ev: EvalSet) -> np.ndarray:
    """Int[U, 100]: the held-out item in column 0, then its 99 sampled negatives."""
    return np.concatenate([ev.targets[:, None], ev.negatives], axis=1)


def _ctr_metrics(score_fn: ScoreFn, ev: EvalSet, batch_size: int) -> dict[str, float]:
    cands = sampled_candidates(ev)
    logits = np.concatenate(
        [
            score_fn(np.arange(s, min(s + batch_size, len(cands))), cands[s : s + batch_size])
            for s in range(0, len(cands), batch_size)
        ]
    )
    probs = 1.0 / (1.0 + np.exp(-logits))
    labels = np.zeros_like(probs)
    labels[:, 0] = 1.0
    return evaluate_ctr(probs.ravel(), labels.ravel())
