"""Fusion of a real (small, briefly trained) run's task models on validation, measured on test.

``small_run`` builds that run directory once per test process (the recommender and HTTP tests
import it): synthetic data, 3 tasks with narrow embeddings, one pass of central training.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fedrec.client.local import build_task_models
from fedrec.config import load_config
from fedrec.fusion import FUSERS, NORMALIZATIONS
from fedrec.fusion.evaluate import fit_on_validation, fuse_and_evaluate
from fedrec.models.registry import load_model, save_model
from fedrec.training import train_task
from fedrec.workload import Workload, build_workload

TASKS = ("recall", "ranking", "personal")
SMALL = {"dataset": "synthetic:merchants=4,users=160,items=300", "partition": "site",
         "seed": 1, "rounds": 1, "max_len": 20}
for _t in TASKS:  # narrow and cheap: the tests check plumbing, not accuracy
    SMALL |= {f"tasks.{_t}.dim": 16, f"tasks.{_t}.negatives": 4, f"tasks.{_t}.batch_size": 64}


@functools.lru_cache(maxsize=1)
def small_run() -> Path:
    """A run directory (config.toml, models/<task>/) of briefly trained models; built once."""
    path = Path(tempfile.mkdtemp(prefix="fedrec-small-run-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    cfg = load_config(None, {**SMALL, "out": str(path)})
    work = build_workload(cfg)
    models = build_task_models(cfg, work.spec, cfg.seed)
    for i, (task, model) in enumerate(models.items()):
        train_task(model, work.central_data(), cfg.tasks[task], seed=i)
        save_model(model, path / "models" / task)
    (path / "config.toml").write_text(cfg.to_toml())
    return path


def small_models_and_work() -> tuple[dict, Workload]:
    path = small_run()
    work = build_workload(load_config(path / "config.toml"))
    return {t: load_model(path / "models" / t) for t in TASKS}, work


@pytest.fixture(scope="module")
def result() -> dict:
    models, work = small_models_and_work()
    return fuse_and_evaluate(models, work, method="weighted", seed=0)


def _sane(metrics: dict[str, float], users: int) -> None:
    assert {"hr@10", "ndcg@10", "users"} <= set(metrics)
    assert 0.0 <= metrics["ndcg@10"] <= metrics["hr@10"] <= 1.0
    assert metrics["users"] == users


def test_fuse_and_evaluate_reports_fused_per_method_and_single_task_metrics(result):
    n_test = len(small_models_and_work()[1].test.users)
    assert set(result) == {"fused", "fusion", "per_method", "tasks"}
    assert set(result["per_method"]) == set(FUSERS)
    assert set(result["tasks"]) == set(TASKS)
    for metrics in [result["fused"], *result["per_method"].values(), *result["tasks"].values()]:
        _sane(metrics, n_test)
    assert result["fused"] == result["per_method"]["weighted"]


def test_weighted_fusion_weights_are_a_convex_combination_chosen_by_cv(result):
    fusion = result["fusion"]
    assert fusion["method"] == "weighted"
    assert fusion["normalization"] in NORMALIZATIONS
    assert set(fusion["cv_scores"]) == set(NORMALIZATIONS)
    assert fusion["normalization"] == max(fusion["cv_scores"], key=fusion["cv_scores"].get)
    weights = fusion["weights"]
    assert set(weights) == set(TASKS)
    assert sum(weights.values()) == pytest.approx(1.0)
    assert min(weights.values()) >= 0.0
    assert fusion["state"]["weights"] == weights


def test_fitting_never_reads_the_test_targets():
    models, work = small_models_and_work()
    rng = np.random.default_rng(0)
    scrambled = replace(work, test=replace(work.test, targets=rng.permutation(work.test.targets),
                                           negatives=rng.permutation(work.test.negatives)))
    for method in FUSERS:
        a = fit_on_validation(models, work, method=method, seed=0).to_dict()
        b = fit_on_validation(models, scrambled, method=method, seed=0).to_dict()
        assert a == b


def test_an_unknown_fusion_method_is_rejected_by_name():
    models, work = small_models_and_work()
    with pytest.raises(ValueError, match="nope"):
        fuse_and_evaluate(models, work, method="nope")
