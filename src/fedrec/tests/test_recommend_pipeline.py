"""The serving pipeline on a small trained run: recall, score, fuse, filter, cold start, errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from fedrec.fusion.evaluate import fit_on_validation
from fedrec.fusion.pipeline import FUSION_FILE, Recommender, RecommendError, save_fuser
from fedrec.recommend_cli import user_history
from fedrec.tests.test_fusion_run import TASKS, small_models_and_work, small_run

TS = 1_700_000_000  # a fixed request time, so the context (and the results) are reproducible


@pytest.fixture(scope="module")
def rec() -> Recommender:
    return Recommender.from_run_dir(small_run())


@pytest.fixture(scope="module")
def history() -> list[int]:
    _, work = small_models_and_work()
    users = np.flatnonzero(work.train.seqs.mask.sum(axis=1) >= 5)
    items, _ = user_history(work, str(work.dataset.users["user_id"][users[0]]))
    return items


def test_recommends_k_distinct_unseen_items_with_every_task_explained(rec, history):
    rows = rec.recommend(history, 10, timestamp=TS)
    ids = [r["item"] for r in rows]
    assert len(rows) == 10 and len(set(ids)) == 10
    seen = {str(rec.catalogue.item_ids[i]) for i in history}
    assert not seen & set(ids)
    assert all(set(r["explanation"]) == set(TASKS) for r in rows)
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores, reverse=True)


def test_raw_ids_and_indices_name_the_same_history(rec, history):
    raw = [str(rec.catalogue.item_ids[i]) for i in history]
    assert rec.recommend(raw, 5, timestamp=TS) == rec.recommend(history, 5, timestamp=TS)


def test_category_filter_is_honoured_and_may_return_fewer_than_k(rec, history):
    category = str(rec.catalogue.categories[0])
    size = int((rec.catalogue.categories == category).sum())
    rows = rec.recommend(history, size + 5, category=category, timestamp=TS)
    assert rows and all(r["category"] == category for r in rows)
    assert len(rows) == size - int((rec.catalogue.categories[history] == category).sum())


def test_recall_keeps_the_two_towers_nearest_items(rec, history):
    narrow = Recommender(rec.models, rec.catalogue, rec.fuser, rec.features, recall_size=5)
    rows = narrow.recommend(history, 5, exclude_seen=False, timestamp=TS)
    batch = narrow._user_batch(np.asarray(history), None, TS)
    with torch.no_grad():
        sims = (rec.item_vectors @ rec.models["recall"].user_vectors(batch)[0]).numpy()
    expected = {str(rec.catalogue.item_ids[i]) for i in np.argsort(-sims)[:5]}
    assert {r["item"] for r in rows} == expected


def test_cold_start_returns_the_most_popular_items_overall_and_per_category(rec):
    pop = rec.catalogue.popularity
    rows = rec.recommend([], 5)
    assert [r["score"] for r in rows] == sorted(pop, reverse=True)[:5]
    assert all(set(r["explanation"]) == {"popularity"} for r in rows)
    category = str(rec.catalogue.categories[0])
    in_cat = sorted(pop[rec.catalogue.categories == category], reverse=True)[:3]
    rows = rec.recommend([], 3, category=category)
    assert [r["score"] for r in rows] == in_cat and {r["category"] for r in rows} == {category}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"history": ["no-such-item", "nor-this"]}, "no-such-item.*nor-this"),
        ({"history": [10**6]}, "1000000"),
        ({"history": [1.5]}, "float"),
        ({"history": [0], "k": 0}, "k must be"),
        ({"history": [0], "k": 10**6}, "k must be"),
        ({"history": [0], "category": "no-such-category"}, "no-such-category"),
        ({"history": [0], "user_features": {"no-such-feature": "x"}}, "no-such-feature"),
    ],
)
def test_bad_requests_raise_a_value_error_naming_the_problem(rec, kwargs, match):
    with pytest.raises(RecommendError, match=match):
        rec.recommend(**kwargs)
    assert issubclass(RecommendError, ValueError)


def test_a_saved_fuser_is_loaded_with_the_run(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(small_run(), run)
    assert Recommender.from_run_dir(run).fuser.method == "average"  # no fusion.json yet
    models, work = small_models_and_work()
    fuser = fit_on_validation(models, work, method="weighted")
    save_fuser(run, fuser)
    loaded = Recommender.from_run_dir(run).fuser
    assert loaded.method == "weighted" and loaded.weights == fuser.weights
    state = json.loads((run / FUSION_FILE).read_text())
    state["weights"] = {"recall": 1.0}
    (run / FUSION_FILE).write_text(json.dumps(state))
    with pytest.raises(RecommendError, match="refit"):
        Recommender.from_run_dir(run)


def test_a_directory_that_is_not_a_run_is_a_clear_error(tmp_path):
    with pytest.raises(RecommendError, match="config.toml"):
        Recommender.from_run_dir(tmp_path)


def test_content_models_serve_and_retrieve_by_their_own_scores(tmp_path):
    """A run of content models (--text content) serves: recall is the content model's exact
    inner-product top-N, popularity logit included, and the result is explained per task."""
    from fedrec.client.local import build_task_models
    from fedrec.config import load_config
    from fedrec.models import ContentRetrieval, save_model
    from fedrec.tests.test_fusion_run import SMALL
    from fedrec.training import train_task
    from fedrec.workload import build_workload

    cfg = load_config(None, {**SMALL, "out": str(tmp_path), "text.mode": "content"})
    work = build_workload(cfg)
    models = build_task_models(cfg, work.spec, cfg.seed, item_text=work.item_text(cfg.text))
    for i, (task, model) in enumerate(models.items()):
        train_task(model, work.central_data(), cfg.tasks[task], seed=i)
        save_model(model, tmp_path / "models" / task)
    (tmp_path / "config.toml").write_text(cfg.to_toml())
    rec = Recommender.from_run_dir(tmp_path, recall_size=7)
    assert isinstance(rec.models["recall"], ContentRetrieval)
    history = [int(i) for i in work.train.seqs.items[0][work.train.seqs.mask[0]]]
    rows = rec.recommend(history, 7, exclude_seen=False, timestamp=TS)
    batch = rec._user_batch(np.asarray(history), None, TS)
    with torch.no_grad():
        sims = (rec.item_vectors @ rec.models["recall"].user_vectors(batch)[0]).numpy()
        direct = rec.models["recall"].score(batch, torch.arange(len(sims))[None])[0].numpy()
    np.testing.assert_allclose(sims, direct, rtol=1e-4, atol=1e-4)
    assert {r["item"] for r in rows} == {str(rec.catalogue.item_ids[i]) for i in np.argsort(-sims)[:7]}
    assert all(set(r["explanation"]) == set(TASKS) for r in rows)
