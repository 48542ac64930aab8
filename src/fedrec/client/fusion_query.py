"""A client's part in the federated fusion fit: score candidate weightings, return sums only.

The ClientApp routes ``query.fusion`` messages here. The message carries the final global
models and the candidate set; the reply carries one (normalisations x weightings) array of
NDCG@10 sums over this client's validation users and their count, nothing per user.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fedrec.client.local import build_task_models
from fedrec.config import FedrecConfig
from fedrec.fusion.evaluate import TARGET_COL, task_scores
from fedrec.fusion.federated import Candidates, client_sums
from fedrec.scoring import sampled_candidates
from fedrec.strategies.records import ARRAYS_KEY, unpack_into
from fedrec.workload import build_workload

SUMS_KEY = "fusion-sums"
USERS_KEY = "fusion-users"


def candidates_from(config) -> Candidates:
    """The candidate set the server described in the message's ConfigRecord."""
    return Candidates.make(
        [str(t) for t in config["fusion-tasks"]],
        float(config["fusion-step"]),
        [str(m) for m in config["fusion-normalizations"]],
    )


def fusion_reply(msg: Message, cfg: FedrecConfig, client: int | None) -> Message:
    """Score every candidate on this client's validation users (they must exist): its
    partition of the shared dataset in simulation, or (``client=None``) its whole own file."""
    work = build_workload(cfg)
    ev = work.valid if client is None else work.valid.of_users(work.partition.users_of(client))
    if len(ev.users) == 0:
        raise ValueError(f"client {client} has no validation users to score fusions on")
    models = build_task_models(cfg, work.spec, cfg.seed, item_text=work.item_text(cfg.text))
    unpack_into(msg.content[ARRAYS_KEY], models)
    cand = candidates_from(msg.content["config"])
    scores = task_scores({t: models[t] for t in cand.tasks}, ev, sampled_candidates(ev))
    sums, n_users = client_sums(scores, TARGET_COL, cand)
    content = RecordDict(
        {
            SUMS_KEY: ArrayRecord({SUMS_KEY: Array(np.ascontiguousarray(sums))}),
            USERS_KEY: MetricRecord({USERS_KEY: n_users}),
        }
    )
    return Message(content=content, reply_to=msg)
