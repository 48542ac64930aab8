"""A client's round, without Flower: build the task models, load the global weights, train.

The ClientApp (app.py) only converts Messages to these calls and back.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fedrec.config import FedrecConfig
from fedrec.models.base import ModelSpec, TaskModel
from fedrec.models.registry import build_model
from fedrec.training import DPSGDParams, LocalData, TrainStats, train_task

log = logging.getLogger(__name__)

TEXT_TASKS = ("recall", "ranking")  # the models with an item-text input


def build_task_models(
    cfg: FedrecConfig, spec: ModelSpec, seed: int, *, item_text: np.ndarray | None = None
) -> dict[str, TaskModel]:
    """The task models of a run, initialised identically wherever ``seed`` is the same.

    ``item_text`` Float[I, T] (from ``fedrec.text.item_text_features``) feeds the recall and
    ranking models' item side as ``cfg.text.mode`` says ("beside", "instead"; SASRec stays
    ID-based), or every task's model is its content variant ("content": fedrec.models.content).
    """
    if cfg.text.mode != "off" and item_text is None:
        raise ValueError("cfg.text.mode is on but no item_text was given")
    models = {}
    for i, (task, tcfg) in enumerate(cfg.tasks.items()):
        torch.manual_seed(seed * 1000 + i)
        hparams: dict = {}
        if item_text is not None and cfg.text.mode == "content":
            hparams = {"arch": "content", "text_dim": int(item_text.shape[1])}
        elif item_text is not None and cfg.text.mode != "off" and task in TEXT_TASKS:
            hparams = {"text_dim": int(item_text.shape[1]), "use_item_id": cfg.text.mode == "beside"}
        models[task] = build_model(task, _with_dim(spec, tcfg.dim), **hparams)
        if hparams:
            models[task].set_item_text(torch.tensor(item_text, dtype=torch.float32))
    return models


def _with_dim(spec: ModelSpec, dim: int) -> ModelSpec:
    from dataclasses import replace

    return replace(spec, dim=dim)


@dataclass(frozen=True)
class RoundResult:
    stats: Mapping[str, TrainStats]

    def metrics(self, *, loss: bool = True) -> dict[str, float]:
        """What the reply reports beside the update. ``loss=False`` under record-level DP: the
        mean training loss is a function of the users' data with no bound on one user's
        influence and no noise, so it would leak outside the ledger's epsilon (and, under
        distributed noise, sit in the clear beside the masked update)."""
        out: dict[str, float] = {}
        for task, s in self.stats.items():
            if loss:
                out[f"{task}.loss"] = s.loss
            out[f"{task}.steps"] = float(s.steps)
            out[f"{task}.train-seconds"] = s.seconds
        return out


def train_round(
    cfg: FedrecConfig,
    models: Mapping[str, TaskModel],
    data: LocalData,
    *,
    server_round: int,
    client_seed: int,
    dp: Mapping[str, DPSGDParams] | None = None,
    proximal_mu: float = 0.0,
) -> RoundResult:
    """Train every task model once on this client's users (in place)."""
    stats = {}
    for i, (task, model) in enumerate(models.items()):
        seed = (client_seed * 7919 + server_round) * 31 + i
        stats[task] = train_task(
            model,
            data,
            cfg.tasks[task],
            seed=seed,
            dp=dp[task] if dp else None,
            proximal_mu=proximal_mu,
        )
        log.debug("round %d task %s loss %.4f", server_round, task, stats[task].loss)
    return RoundResult(stats)
