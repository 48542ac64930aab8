"""Fit a score fusion on the validation users and measure it on the test users.

The fuser sees only validation scores and validation targets (each user's held-out validation
item in column 0 of its 100 sampled candidates); the test targets are used once, to measure the
fitted fuser beside each single task model under the same sampled protocol (HR@10 / NDCG@10
among 99 unseen items, He et al. 2017). One side feature, the log training popularity of each
candidate, is offered to the fusers; only stacking uses it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fedrec.evaluation.metrics import hit_rate, metric_key, ndcg, rank_of_target, summarize
from fedrec.evaluation.protocol import SAMPLED_K
from fedrec.fusion.base import Fuser
from fedrec.fusion.fusers import FUSERS, fit_fuser
from fedrec.models.base import TaskModel
from fedrec.scoring import sampled_candidates, user_batch
from fedrec.workload import EvalSet, Workload

POPULARITY_FEATURE = "log_popularity"
TARGET_COL = 0  # sampled_candidates puts the held-out item first
SCORE_BATCH = 256  # users per scoring call
BOOTSTRAP = 2000  # paired bootstrap resamples of the test users for the fused-vs-best interval


def item_popularity(work: Workload, *, private: bool = False) -> np.ndarray:
    """float64 (I,): how often each item occurs in the training split (the count the popularity
    baseline uses), for the fusers' popularity feature and cold-start serving.

    ``private``: the run was trained under DP. The exact counts of every client's training data
    are then not a released quantity (no DP mechanism covers them), so nothing derived from them
    may enter the released recommender: all zeros (no information) instead.
    """
    if private:
        return np.zeros(work.dataset.num_items)
    items = work.split.train["item"].to_numpy(np.int64)
    return np.bincount(items, minlength=work.dataset.num_items).astype(np.float64)


def popularity_features(counts: np.ndarray, candidates: np.ndarray) -> dict[str, np.ndarray]:
    """``{"log_popularity": float64 (U, N)}``: ``log(1 + count)`` of each candidate item."""
    return {POPULARITY_FEATURE: np.log1p(counts[np.asarray(candidates, np.int64)])}


def task_scores(
    models: Mapping[str, TaskModel], ev: EvalSet, candidates: np.ndarray
) -> dict[str, np.ndarray]:
    """float64 (U, N) per task: every model's scores of the same candidates, user batches."""
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for task, model in models.items():
            model.eval()
            parts = []
            for start in range(0, len(candidates), SCORE_BATCH):
                rows = np.arange(start, min(start + SCORE_BATCH, len(candidates)))
                cand = torch.as_tensor(candidates[rows], dtype=torch.long)
                parts.append(model.score(user_batch(ev, rows), cand).numpy())
            out[task] = np.concatenate(parts).astype(np.float64)
    return out


def sampled_metrics(scores: np.ndarray) -> dict[str, float]:
    """Mean HR@10 and NDCG@10 of scores (U, N) whose target is column 0, plus the user count."""
    ranks = rank_of_target(scores, TARGET_COL)
    per_user = {
        metric_key("hr", SAMPLED_K): hit_rate(ranks, SAMPLED_K),
        metric_key("ndcg", SAMPLED_K): ndcg(ranks, SAMPLED_K),
    }
    return {**summarize(per_user), "users": float(len(ranks))}


def fit_on_validation(
    models: Mapping[str, TaskModel],
    work: Workload,
    *,
    method: str = "weighted",
    seed: int = 0,
    private: bool = False,
) -> Fuser:
    """A fuser fitted on the validation users' sampled candidates (no test data involved)."""
    return _fit_all(models, work, (method,), seed, private)[method]


def fuse_and_evaluate(
    models: Mapping[str, TaskModel],
    work: Workload,
    *,
    method: str = "weighted",
    seed: int = 0,
    chosen: Fuser | None = None,
    tasks: list[str] | None = None,
    private: bool = False,
) -> dict[str, Any]:
    """Fit every fuser on validation, measure them and each task on the test users.

    ``chosen``: a fuser fitted elsewhere (the federated fit) that replaces ``method``'s.
    ``tasks``: which of ``models`` are task models (default: all); the others (the content
    prior) are fused and measured too, but the fused model is compared with the best *task*.
    ``private``: the models were trained under DP; the popularity feature is withheld
    (``item_popularity``).

    Returns ``{"fused": metrics of method, "fusion": {"method", "normalization", "weights",
    "cv_scores", "state"}, "per_method": {fuser: metrics}, "tasks": {task: metrics}}``;
    ``state`` is the fitted fuser's ``to_dict()`` (what ``save_fuser`` writes).
    """
    if method not in FUSERS:
        raise ValueError(f"unknown fusion method {method!r}; choose one of {FUSERS}")
    fusers = _fit_all(models, work, FUSERS, seed, private)
    if chosen is not None:
        fusers[method] = chosen
    cands = sampled_candidates(work.test)
    scores = task_scores(models, work.test, cands)
    feats = popularity_features(item_popularity(work, private=private), cands)
    per_method = {m: sampled_metrics(f.fuse(scores, feats)) for m, f in fusers.items()}
    singles = {name: sampled_metrics(s) for name, s in scores.items()}
    best = max(tasks or singles, key=lambda t: singles[t][metric_key("ndcg", SAMPLED_K)])
    versus = paired_difference(fusers[method].fuse(scores, feats), scores[best], seed=seed)
    return {
        "fused": per_method[method],
        "fusion": {**describe(fusers[method]), "vs_best_single": {"task": best, **versus}},
        "per_method": per_method,
        "tasks": singles,
    }


def paired_difference(
    fused: np.ndarray, single: np.ndarray, *, seed: int = 0, resamples: int = BOOTSTRAP
) -> dict[str, float]:
    """Fused minus single HR@10 and NDCG@10 on the same users, with a 95% paired-bootstrap
    interval (users resampled with replacement): an interval containing 0 is no difference."""
    rng = np.random.default_rng(seed)
    out: dict[str, float] = {}
    ranks_f, ranks_s = rank_of_target(fused, TARGET_COL), rank_of_target(single, TARGET_COL)
    idx = rng.integers(0, len(ranks_f), size=(resamples, len(ranks_f)))
    for name, fn in (("hr", hit_rate), ("ndcg", ndcg)):
        diff = fn(ranks_f, SAMPLED_K) - fn(ranks_s, SAMPLED_K)  # (U,)
        key = metric_key(name, SAMPLED_K)
        boot = diff[idx].mean(axis=1)
        out[key] = float(diff.mean())
        out[f"{key}_ci95_low"], out[f"{key}_ci95_high"] = map(
            float, np.percentile(boot, [2.5, 97.5])
        )
    return out


def describe(fuser: Fuser) -> dict[str, Any]:
    """The report view of a fitted fuser, with its full serialisable state under ``state``."""
    state = fuser.to_dict()
    return {
        "method": state["method"],
        "normalization": state["normalization"],
        "weights": fuser.weights,
        "cv_scores": dict(state.get("cv_scores", {})),
        "state": state,
    }


def _fit_all(
    models: Mapping[str, TaskModel],
    work: Workload,
    methods: tuple[str, ...],
    seed: int,
    private: bool,
) -> dict[str, Fuser]:
    if not models:
        raise ValueError("fusion needs at least one task model")
    cands = sampled_candidates(work.valid)
    scores = task_scores(models, work.valid, cands)
    feats = popularity_features(item_popularity(work, private=private), cands)
    return {m: fit_fuser(m, scores, TARGET_COL, feats, seed=seed) for m in methods}
