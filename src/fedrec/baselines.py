"""Baselines through the same evaluation code: item popularity and centralized training.

Centralized training runs the very same models and training function on all users at once, with
the same number of passes over the data as the federation (rounds x local epochs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fedrec.client.local import build_task_models
from fedrec.config import FedrecConfig
from fedrec.evaluation.baselines import PopularityScorer
from fedrec.models.base import TaskModel
from fedrec.scoring import evaluate_model, evaluate_on
from fedrec.training import train_task
from fedrec.workload import EvalSet, Workload

log = logging.getLogger(__name__)


def popularity_metrics(work: Workload, ev: EvalSet, *, full_ranking: bool) -> dict[str, float]:
    """Item popularity (training interaction counts) through the same protocol."""
    scorer = PopularityScorer(work.split.train["item"].to_numpy(), work.dataset.num_items)
    return evaluate_on(scorer, ev, num_items=work.dataset.num_items, full_ranking=full_ranking)


def train_central(
    cfg: FedrecConfig, work: Workload, on_epoch: Callable[[str, int, float], None] | None = None
) -> dict[str, TaskModel]:
    """Train each task model on all training users for ``rounds * local_epochs`` epochs."""
    models = build_task_models(cfg, work.spec, cfg.seed, item_text=work.item_text(cfg.text))
    data = work.central_data()
    for task, model in models.items():
        tcfg = cfg.tasks[task]
        for epoch in range(cfg.rounds):
            stats = train_task(model, data, tcfg, seed=cfg.seed * 7 + epoch)
            if on_epoch is not None:
                on_epoch(task, epoch + 1, stats.loss)
    return models


def evaluate_all(
    models: dict[str, TaskModel], ev: EvalSet, *, full_ranking: bool
) -> dict[str, dict[str, float]]:
    return {task: evaluate_model(m, ev, full_ranking=full_ranking) for task, m in models.items()}
