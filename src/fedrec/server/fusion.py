"""The server's side of the federated fusion fit (see fedrec.fusion.federated).

After the last round the server sends the final global models and one candidate set to every
client as a ``query.fusion`` message, sums the replies' NDCG sums and user counts, and keeps
the best weighting. Clients that fail or do not answer are left out and counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedrec.client.fusion_query import SUMS_KEY, USERS_KEY
from fedrec.config import FedrecConfig
from fedrec.fusion.federated import GRID_STEP, Candidates, choose
from fedrec.fusion.fusers import WeightedFuser
from fedrec.strategies.records import ARRAYS_KEY, pack

log = logging.getLogger(__name__)
FUSION_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class FederatedFusion:
    fuser: WeightedFuser
    validation_ndcg: float  # mean NDCG@10 of the choice over all answering clients' users
    clients: int  # clients whose sums were used
    failed: int  # clients that failed or did not answer
    users: int


def federated_fusion(grid: Grid, cfg: FedrecConfig, models: dict) -> FederatedFusion:
    """Ask every connected client to score the candidate weightings; choose on the sums."""
    cand = Candidates.make(list(models), GRID_STEP)
    config = ConfigRecord(
        {
            "fedrec": cfg.to_json(),
            "fusion-tasks": list(cand.tasks),
            "fusion-step": GRID_STEP,
            "fusion-normalizations": list(cand.normalizations),
        }
    )
    arrays = pack(models)
    nodes = sorted(grid.get_node_ids())
    messages = [
        Message(RecordDict({ARRAYS_KEY: arrays, "config": config}), dst_node_id=node,
                message_type="query.fusion")
        for node in nodes
    ]
    total = np.zeros((len(cand.normalizations), len(cand.grid)))
    users = answered = 0
    for reply in grid.send_and_receive(messages, timeout=FUSION_TIMEOUT_S):
        if reply.has_error():
            log.warning("fusion: node %s failed: %s", reply.metadata.src_node_id,
                        reply.error.reason)
            continue
        total += reply.content[SUMS_KEY][SUMS_KEY].numpy()
        users += int(reply.content[USERS_KEY][USERS_KEY])
        answered += 1
    if users == 0:
        raise RuntimeError("federated fusion: no client returned validation sums")
    fuser, ndcg = choose(total, users, cand)
    return FederatedFusion(fuser, ndcg, answered, len(nodes) - answered, users)
