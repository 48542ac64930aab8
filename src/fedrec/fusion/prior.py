"""A content prior for fusion: an untrained content model over public item text, free of budget.

The fused recommender may add one more scorer to the task models: the cosine between the mean of
a user's (centred, normalised) history text vectors and each candidate's, computed by an untrained
``ContentRetrieval`` (fedrec.models.content) from the frozen public encoder. Nothing is trained
and no client data is touched (the text is the public catalogue), so it costs no privacy budget
and never travels; the fusion weights decide how much it counts. On ML-100K it adds what the
ID-based task models miss (README, "Fusion").

``fusion_prior = "none"`` turns it off; without the text extra (``fedrec[text]``) it is skipped
with a warning. The federated fusion fit does not use it yet (its clients score task models only),
nor does the fixed one (equal weights: the default under DP, where the fit would weigh it by
users' data; fedrec.config.fusion_fit_mode).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from fedrec.config import FedrecConfig, TextConfig, fusion_fit_mode
from fedrec.models.content import ContentRetrieval
from fedrec.models.registry import build_model
from fedrec.workload import Workload

log = logging.getLogger(__name__)

PRIOR = "content"  # its name beside the task names (fusion weights, models/<name>/, explanations)
PRIOR_DIM = 64  # principal axes of the text kept by the projection


def content_prior(cfg: FedrecConfig, work: Workload) -> ContentRetrieval | None:
    """The untrained content scorer for ``cfg``'s catalogue, or None when off or unavailable."""
    if cfg.fusion_prior == "none" or fusion_fit_mode(cfg) != "server":
        return None
    from fedrec.text.items import TextError

    text_cfg = TextConfig(
        mode="instead",
        model=cfg.text.model,
        max_tokens=cfg.text.max_tokens,
        adapter=cfg.text.adapter,  # the run's encoder, adapted if `fedrec text adapt` made one
    )
    try:
        text = work.item_text(text_cfg)
    except (TextError, ImportError) as err:
        log.warning("fusion without the content prior: item text unavailable (%s)", err)
        return None
    assert text is not None
    dim = min(PRIOR_DIM, text.shape[1], work.spec.num_items)
    model = build_model(
        "recall", replace(work.spec, dim=dim), arch="content", item_text=torch.tensor(text)
    )
    assert isinstance(model, ContentRetrieval)
    return model.eval()
