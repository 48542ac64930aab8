"""``fedrec train-central``: the same models, data and split, trained on one holder."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console

from fedrec.baselines import evaluate_all, popularity_metrics, train_central
from fedrec.config import FedrecConfig
from fedrec.models.registry import save_model
from fedrec.rundir import RunDir, append_metrics, create_run_dir, default_run_path, finish
from fedrec.workload import build_workload


def run_central(cfg: FedrecConfig, console: Console) -> tuple[RunDir, dict[str, Any]]:
    work = build_workload(cfg)
    run = create_run_dir(cfg, cfg.out or default_run_path(cfg, "central"), resumable=False)

    def on_epoch(task: str, epoch: int, loss: float) -> None:
        console.print(f"{task}: epoch {epoch}/{cfg.rounds} loss {loss:.4f}")
        append_metrics(run, [{"round": epoch, "task": task, "split": "train", "train_loss": loss}])

    t0 = time.perf_counter()
    models = train_central(cfg, work, on_epoch)
    seconds = time.perf_counter() - t0
    for task, model in models.items():
        save_model(model, run.models / task)
    summary = {
        "dataset": work.dataset.name,
        "clients": 1,
        "rounds": cfg.rounds,
        "split": "test",
        "tasks": evaluate_all(models, work.test, full_ranking=cfg.eval_full_ranking),
        "baselines": {
            "popularity": popularity_metrics(work, work.test, full_ranking=cfg.eval_full_ranking)
        },
        "timing": {"train_seconds": seconds},
    }
    finish(run, summary)
    return run, summary
