"""The server's side of the federated fusion fits.

Federated fit (``fusion_fit = "federated"``, fedrec.fusion.federated): after the last round the
server sends the final global models and one candidate set to every client as a
``query.fusion`` message, sums the replies' NDCG sums and user counts, and keeps the best
weighting. Clients that fail or do not answer are left out and counted.

DP fit of a deployed record-level run (``fusion_fit = "dp"``, fedrec.client.dp_fusion): a
``query.dpfusion`` message to every site; each answers its own Gaussian release of its
validation sums, and the server keeps the argmax of their total.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedrec.client.fusion_query import SUMS_KEY, USERS_KEY
from fedrec.config import FedrecConfig
from fedrec.fusion.dp import NORMALIZATION, RELEASE_FILE, DPFusion, candidates
from fedrec.fusion.federated import GRID_STEP, Candidates, choose
from fedrec.fusion.fusers import WeightedFuser
from fedrec.rundir import RunDir, write_json_atomic
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
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("fusion: node %s failed: %s", node, reply.error.reason)
            continue
        try:
            sums = np.asarray(reply.content[SUMS_KEY][SUMS_KEY].numpy(), dtype=np.float64)
            n = reply.content[USERS_KEY][USERS_KEY]
        except Exception as err:  # a hostile or broken client's reply: never the server's crash
            log.warning("fusion: node %s sent a malformed reply (%r); left out", node, err)
            continue
        # each user's NDCG@10 lies in [0, 1]: sums outside [0, users] are no client's
        if isinstance(n, bool) or not isinstance(n, int) or n < 1 or sums.shape != total.shape \
                or not (np.isfinite(sums).all() and sums.min() >= 0 and sums.max() <= n):
            log.warning("fusion: node %s sent sums of shape %s for %r users (expected %s, each "
                        "in [0, users]); left out", node, sums.shape, n, total.shape)
            continue
        total += sums
        users += n
        answered += 1
    if users == 0:
        raise RuntimeError("federated fusion: no client returned validation sums")
    fuser, ndcg = choose(total, users, cand)
    return FederatedFusion(fuser, ndcg, answered, len(nodes) - answered, users)


@dataclass(frozen=True)
class SiteDPFusion:
    dp: DPFusion  # the choice (fuser None: no site answered; equal weights)
    ledger_entries: list[str]  # the sites' ledger lines of the release, as their replies hold


def site_dp_fusion(grid: Grid, cfg: FedrecConfig, models: dict, run: RunDir) -> SiteDPFusion:
    """Ask every connected site for its DP release of validation sums; choose on their total.

    The sums received are kept in the run directory (``fusion_release.json``) before the
    choice; the sites keep theirs, so asking again (outputs made again after a crash) gets the
    same draws back. A reply with other candidates or a non-finite sum is left out and logged:
    a site may still lie within finite values, which can only move the choice among the
    candidates (docs/partner-site.md)."""
    from fedrec.client.dp_fusion import LEDGER_KEY, NAMES_KEY
    from fedrec.client.dp_fusion import SUMS_KEY as DP_SUMS_KEY

    tasks = list(models)
    cands = candidates(tasks)
    config = ConfigRecord(
        {"fedrec": cfg.to_json(), "fusion-tasks": tasks, "run-id": run.path.name}
    )
    arrays = pack(models)
    nodes = sorted(grid.get_node_ids())
    messages = [
        Message(RecordDict({ARRAYS_KEY: arrays, "config": config}), dst_node_id=node,
                message_type="query.dpfusion")
        for node in nodes
    ]  # fmt: skip
    total = dict.fromkeys(cands, 0.0)
    per_site: dict[str, dict[str, float]] = {}
    entries: list[str] = []
    failed: list[str] = []
    answered: set[int] = set()
    for reply in grid.send_and_receive(messages, timeout=FUSION_TIMEOUT_S):
        node = str(reply.metadata.src_node_id)
        answered.add(reply.metadata.src_node_id)
        if reply.has_error():
            failed.append(f"node {node}: {reply.error.reason}")
            continue
        try:
            names = [str(n) for n in reply.content[NAMES_KEY][NAMES_KEY]]
            sums = [float(v) for v in reply.content[DP_SUMS_KEY][DP_SUMS_KEY].numpy().ravel()]
            lines = [str(e) for e in reply.content[LEDGER_KEY]["entries"]]
        except Exception as err:  # a hostile or broken site's reply: never the server's crash
            failed.append(f"node {node}: malformed reply ({err!r})")
            continue
        if sorted(names) != sorted(cands) or len(sums) != len(names) \
                or not np.isfinite(sums).all():
            failed.append(f"node {node}: candidates {names} with sums {sums} (expected "
                          f"{sorted(cands)}, finite)")  # fmt: skip
            continue
        per_site[node] = dict(zip(names, sums, strict=True))
        entries += lines
        for name, value in per_site[node].items():
            total[name] += value
    failed += [f"node {n}: no reply within {FUSION_TIMEOUT_S:g} s" for n in nodes
               if n not in answered]  # fmt: skip
    for problem in failed:
        log.warning("DP fusion fit: %s", problem)
    if not per_site:
        return SiteDPFusion(DPFusion(None, "DP fusion fit: no site answered"), [])
    best = max(total, key=lambda name: total[name])
    write_json_atomic(run.path / RELEASE_FILE, {
        "noise_multiplier": cfg.privacy.fusion_noise, "sites": per_site, "noisy_sums": total,
        "chosen": best, "failed": failed,
    })  # fmt: skip
    fuser = WeightedFuser.from_weights(cands[best], NORMALIZATION)
    reason = (
        f"DP: each of {len(per_site)} sites released its validation NDCG@10 sums of "
        f"{len(cands)} candidates with its own Gaussian noise (multiplier "
        f"{cfg.privacy.fusion_noise:g}, in its ledger as task 'fusion'; {len(failed)} did not); "
        f"chose {best} on their total"
    )
    return SiteDPFusion(DPFusion(fuser, reason), entries)
