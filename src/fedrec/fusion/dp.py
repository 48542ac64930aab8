"""A DP fit of the fusion weights (``fusion_fit = "dp"``): one Gaussian release, in every ledger.

Fitting fusion weights on the validation users' held-out items is a release of their data, and
the weights ship with the model. Under record-level DP the fit is therefore one Gaussian
mechanism (report noisy max over a few candidates):

* the candidates are each task model alone and their equal-weight average (z-scores), G in all;
* each validation user adds their NDCG@10 under every candidate, a vector in [0, 1]^G of L2
  norm at most sqrt(G): the L2 sensitivity of the G sums to one user (add or remove);
* the server adds N(0, (sigma sqrt(G))^2) to every sum (sigma = ``privacy.fusion_noise``) and
  keeps the argmax; everything after the noisy sums is post-processing.

Every client's users are among the validation users, so every client's ledger gets the release
(task ``fusion``, mechanism ``gaussian``, sample rate 1, one step, clipping norm sqrt(G)) with
its composed epsilon, and ``fedrec audit`` recomputes it like any other line. Each client's
calibration set this release aside before its first round (``config.fusion_reserve``), so the
planned rounds plus the fit stay within its budget; if a client's ledger plus the release would
not (it released more than planned), the fit is not made and the run fuses with equal weights.

The noisy sums are kept in the run directory before the ledger lines are written, so a server
that dies in between and runs its outputs again reuses them: the same release, never a second.
A deployed run's clients keep their ledgers on their sites, where the server cannot write: no
fit there (equal weights), and its clients set nothing aside. ``benchmarks/dp_fusion.py``
measures what the fit gains and costs.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedrec.client.privacy import client_name
from fedrec.config import FedrecConfig
from fedrec.fusion.evaluate import TARGET_COL, task_scores
from fedrec.fusion.fusers import WeightedFuser
from fedrec.fusion.objective import cv_objective
from fedrec.privacy import ClientPrivacyState, Ledger, LedgerEntry, read_ledger
from fedrec.rundir import RunDir, write_json_atomic
from fedrec.scoring import sampled_candidates
from fedrec.workload import Workload

log = logging.getLogger(__name__)

FUSION_TASK = "fusion"  # the ledger's task name for the release
MECHANISM = "gaussian"
NORMALIZATION = "zscore"
RELEASE_FILE = "fusion_release.json"  # the noisy sums, kept before the ledger lines
AVERAGE = "average"


@dataclass(frozen=True)
class DPFusion:
    fuser: WeightedFuser | None  # None: no fit (the reason says why); fuse with equal weights
    reason: str


def candidates(tasks: list[str]) -> dict[str, dict[str, float]]:
    """Each task alone, and the equal-weight average: name -> weights over ``tasks``."""
    out = {t: {u: float(u == t) for u in tasks} for t in tasks}
    out[AVERAGE] = dict.fromkeys(tasks, 1.0 / len(tasks))
    return out


def validation_sums(models: Mapping, work: Workload, cands: Mapping[str, Mapping[str, float]]):
    """Sum over the validation users of NDCG@10 under each candidate (the exact statistic; the
    same objective the federated fit's clients sum)."""
    scores = task_scores(models, work.valid, sampled_candidates(work.valid))
    return {
        name: cv_objective(weights, NORMALIZATION, scores, TARGET_COL)[0]
        for name, weights in cands.items()
    }


def dp_fusion_fit(cfg: FedrecConfig, run: RunDir, work: Workload, models: Mapping) -> DPFusion:
    """Choose the fusion by one Gaussian release of the candidates' validation NDCG sums and
    ledger it for every client (module doc); ``DPFusion(None, reason)`` when it cannot."""
    p = cfg.privacy
    entries = read_ledger(run.ledger) if run.ledger.exists() else []
    if not entries:
        return DPFusion(None, "no run ledger (a deployed run's sites keep theirs): no DP fit")
    clients = [client_name(i) for i in range(work.partition.n_clients)]
    cands = candidates(list(models))
    sensitivity = float(np.sqrt(len(cands)))
    released = {e["client"] for e in entries if e["task"] == FUSION_TASK}
    states = {}
    for client in clients:
        own = [e for e in entries if e["client"] == client]
        state = ClientPrivacyState.from_entries(own, accountant=p.accountant)
        if client not in released:
            state.record(FUSION_TASK, noise_multiplier=p.fusion_noise, sample_rate=1.0, steps=1)
            if (eps := state.composed_epsilon(delta=p.delta)) > p.epsilon:
                return DPFusion(None, f"{client}: its releases plus the DP fusion fit would "
                                      f"reach epsilon {eps:.3f} > {p.epsilon:g}; no DP fit")
        states[client] = state
    noisy = _noisy_sums(cfg, run, models, work, cands, sensitivity)
    ledger = Ledger(run.ledger, run.path.name)
    last_round = max(int(e["round"]) for e in entries)
    for client in clients:
        if client in released:
            continue
        ledger.append(
            LedgerEntry.from_state(
                states[client],
                client=client,
                task=FUSION_TASK,
                round=last_round,
                clipping_norm=sensitivity,
                delta=p.delta,
                budget_epsilon=p.epsilon,
                mechanism=MECHANISM,
            )
        )
    best = max(noisy, key=lambda name: noisy[name])
    fuser = WeightedFuser.from_weights(cands[best], NORMALIZATION)
    return DPFusion(
        fuser,
        f"DP: one Gaussian release of {len(cands)} candidates' validation NDCG@10 sums (noise "
        f"multiplier {p.fusion_noise:g}, in every client's ledger as task 'fusion'); chose "
        f"{best}",
    )


def _noisy_sums(cfg, run, models, work, cands, sensitivity: float) -> dict[str, float]:
    """The released sums: kept from an earlier attempt of this run, or made and kept now."""
    path = run.path / RELEASE_FILE
    if path.exists():
        kept = json.loads(path.read_text())
        if sorted(kept["noisy_sums"]) == sorted(cands):
            log.warning("DP fusion fit: reusing the release kept in %s", path)
            return {str(k): float(v) for k, v in kept["noisy_sums"].items()}
    exact = validation_sums(models, work, cands)
    seed = secrets.randbits(128) if cfg.privacy.secure_rng else cfg.seed * 1_000_003 + 17
    rng = np.random.default_rng(seed)
    scale = cfg.privacy.fusion_noise * sensitivity
    noisy = {name: value + float(rng.normal(0.0, scale)) for name, value in exact.items()}
    write_json_atomic(path, {"noise_multiplier": cfg.privacy.fusion_noise,
                             "sensitivity": sensitivity, "noisy_sums": noisy})  # fmt: skip
    return noisy
