"""The content prior in fusion: built from public text alone, weighed like a task model, never
counted as the best single task model, saved for serving, and off when asked."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fedrec.config import TextConfig, load_config
from fedrec.fusion.evaluate import fuse_and_evaluate
from fedrec.fusion.prior import PRIOR, content_prior
from fedrec.models import ContentRetrieval
from fedrec.scoring import sampled_candidates, user_batch
from fedrec.tests.test_fusion_run import SMALL, small_models_and_work


def test_prior_is_the_untrained_history_text_cosine():
    models, work = small_models_and_work()
    cfg = load_config(None, SMALL)
    prior = content_prior(cfg, work)
    assert isinstance(prior, ContentRetrieval)
    assert all(float(p.abs().sum()) == 0 for p in prior.pop.parameters())  # nothing learned
    text = torch.tensor(work.item_text(TextConfig(mode="instead")))
    table = F.normalize(text - text.mean(0), dim=-1)
    proj = table @ prior.proj.weight.T  # the principal axes of the public table
    ev, cand = work.test, sampled_candidates(work.test)[:16]
    h = ev.history.seqs
    users = torch.stack([proj[torch.as_tensor(h.items[r][h.mask[r]])].mean(0) for r in range(16)])
    expected = torch.einsum(
        "ud,und->un", F.normalize(users, dim=-1), F.normalize(proj[torch.as_tensor(cand)], dim=-1)
    ) / prior.temperature
    with torch.no_grad():
        got = prior.score(user_batch(ev, np.arange(16)), torch.as_tensor(cand))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_prior_is_fused_but_compared_as_a_side_scorer():
    """Named as a non-task, the prior joins the fusion (it gets a weight) but the fused model is
    compared with the best *task* model, even when the prior scores higher alone."""
    models, work = small_models_and_work()
    scorers = {"ranking": models["ranking"], PRIOR: models["personal"]}  # a strong "prior"
    out = fuse_and_evaluate(scorers, work, method="weighted", seed=0, tasks=["ranking"])
    assert set(out["fusion"]["weights"]) == {"ranking", PRIOR}
    assert set(out["tasks"]) == {"ranking", PRIOR}
    assert out["fusion"]["vs_best_single"]["task"] == "ranking"


def test_prior_is_off_when_asked_or_when_the_fusion_is_federated():
    _, work = small_models_and_work()
    assert content_prior(load_config(None, {**SMALL, "fusion_prior": "none"}), work) is None
    assert content_prior(load_config(None, {**SMALL, "fusion_fit": "federated"}), work) is None


def test_a_dp_run_releases_no_exact_popularity(tmp_path):
    """Exact training counts of every client are not covered by any DP mechanism: a DP run's
    fusion gets no popularity feature, and its server refuses cold-start users instead of
    ranking by them; users with a history are served as usual."""
    import shutil

    import pytest

    from fedrec.fusion.evaluate import item_popularity
    from fedrec.fusion.pipeline import Recommender, RecommendError
    from fedrec.tests.test_fusion_run import small_run

    _, work = small_models_and_work()
    assert item_popularity(work).sum() == len(work.split.train)
    assert not item_popularity(work, private=True).any()
    run = tmp_path / "dp-run"
    shutil.copytree(small_run(), run)
    cfg = load_config(None, {**SMALL, "out": str(run), "privacy.mode": "record"})
    (run / "config.toml").write_text(cfg.to_toml())
    rec = Recommender.from_run_dir(run)
    with pytest.raises(RecommendError, match="differential privacy"):
        rec.recommend([], 5)
    history = [int(i) for i in work.train.seqs.items[0][work.train.seqs.mask[0]]]
    assert len(rec.recommend(history, 5, timestamp=1_700_000_000)) == 5
