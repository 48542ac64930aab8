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

The noisy sums are kept in the run directory (durably) before the ledger lines are written, so
a server that dies in between and runs its outputs again reuses them: the same release, never a
second. Whenever an earlier attempt drew the noise (some ledger holds the release, or the kept
file exists, even damaged), every client's ledger is given its line first; then, if the kept
file is gone or damaged, the run is not fitted again (equal weights): a new draw would be a
second release.
A deployed run's clients keep their ledgers on their sites, where the server cannot write: there
each site makes the release on its own validation users, with its own noise, and ledgers it
(``fedrec.client.dp_fusion``; the server sums the sites' noisy sums, ``site_dp_fusion``).
``benchmarks/dp_fusion.py`` measures what the fit gains and costs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedrec.client.privacy import client_name
from fedrec.config import FedrecConfig
from fedrec.data.sequences import user_item_sets
from fedrec.fusion.evaluate import TARGET_COL, task_scores
from fedrec.fusion.fusers import WeightedFuser
from fedrec.fusion.objective import cv_objective
from fedrec.privacy import ClientPrivacyState, Ledger, LedgerEntry, read_ledger
from fedrec.privacy.claims import Expected
from fedrec.rundir import RunDir, write_json_atomic
from fedrec.workload import Workload, sampled_negatives

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


def expected_release(cfg: FedrecConfig, tasks: list[str]) -> Expected:
    """The release the fit makes, as every client's ledger line for it must carry it
    (``fedrec.privacy.claims``): the fit itself draws and ledgers from this; its clipping norm
    is the sums' L2 sensitivity, sqrt(G)."""
    return Expected(
        mechanism=MECHANISM,
        sample_rate=1.0,
        steps=1,
        clipping_norm=float(np.sqrt(len(candidates(tasks)))),
        noise_multiplier=cfg.privacy.fusion_noise,
    )


def validation_sums(models: Mapping, work: Workload, cands: Mapping[str, Mapping[str, float]]):
    """Sum over the validation users of NDCG@10 under each candidate (the exact statistic; the
    same objective the federated fit's clients sum), each user ranked among negatives of their
    own (``private_candidates``)."""
    scores = task_scores(models, work.valid, private_candidates(work))
    return {
        name: cv_objective(weights, NORMALIZATION, scores, TARGET_COL)[0]
        for name, weights in cands.items()
    }


def private_candidates(work: Workload) -> np.ndarray:
    """Int[U, 100]: each validation user's held-out item, then 99 items they never interacted
    with, drawn by an RNG seeded by the user's own id alone.

    The evaluation protocol's negatives come from one random stream in user order
    (``fedrec.workload``): adding or removing one user shifts the negatives, and so the NDCG,
    of every later user, and the release's sensitivity would not be one user's vector. Here a
    user's negatives depend on nothing but their own id and items, so each user changes only
    their own row of the sums: L2 sensitivity sqrt(G)."""
    ds, ev = work.dataset, work.valid
    ids = ds.users["user_id"].to_numpy()
    seen = user_item_sets(ds.interactions, ds.num_users)
    rows = []
    for u in ev.users:
        digest = hashlib.sha256(f"fedrec-dp-negatives/{ids[u]}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "big"))
        rows.append(sampled_negatives(seen[u], ds.num_items, rng))
    negatives = np.stack(rows) if rows else np.zeros((0, ev.negatives.shape[1]), np.int64)
    return np.concatenate([ev.targets[:, None], negatives], axis=1)


def dp_fusion_fit(cfg: FedrecConfig, run: RunDir, work: Workload, models: Mapping) -> DPFusion:
    """Choose the fusion by one Gaussian release of the candidates' validation NDCG sums and
    ledger it for every client (module doc); ``DPFusion(None, reason)`` when it cannot."""
    p = cfg.privacy
    entries = read_ledger(run.ledger) if run.ledger.exists() else []
    if not entries:
        return DPFusion(None, "no run ledger (a deployed run's sites keep theirs): no DP fit")
    clients = [client_name(i) for i in range(work.partition.n_clients)]
    cands = candidates(list(models))
    fit = expected_release(cfg, list(models))  # the one definition of the release
    released = {e["client"] for e in entries if e["task"] == FUSION_TASK}
    states, over = {}, ""
    for client in clients:
        own = [e for e in entries if e["client"] == client]
        state = ClientPrivacyState.from_entries(own, accountant=p.accountant)
        if client not in released:
            state.record(FUSION_TASK, noise_multiplier=fit.noise_multiplier,
                         sample_rate=fit.sample_rate, steps=fit.steps)  # fmt: skip
            if not over and (eps := state.composed_epsilon(delta=p.delta)) > p.epsilon:
                over = (f"{client}: its releases plus the DP fusion fit would reach epsilon "
                        f"{eps:.3f} > {p.epsilon:g}")  # fmt: skip
        states[client] = state
    kept, problem = _kept_release(run, cands)
    if not (released or kept is not None or problem):  # no earlier attempt drew the noise
        if over:
            return DPFusion(None, f"{over}; no DP fit")
        kept = _draw_release(cfg, run, models, work, cands, fit)
    # An earlier attempt's draw (or this one's) was computed from every client's users: each
    # client's ledger gets its line, whether or not the sums can still be used
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
                clipping_norm=fit.clipping_norm,
                delta=p.delta,
                budget_epsilon=p.epsilon,
                mechanism=fit.mechanism,
            )
        )
    if problem:
        return DPFusion(None, f"{problem}: no DP fit")
    if kept is None:
        # the ledger says the release was made: a fresh draw would be a second, unledgered one
        return DPFusion(None, f"the ledger holds this run's DP fusion release but "
                              f"{RELEASE_FILE} is gone; drawing its noise again would be a "
                              f"second release: no DP fit")  # fmt: skip
    noisy = kept
    best = max(noisy, key=lambda name: noisy[name])
    fuser = WeightedFuser.from_weights(cands[best], NORMALIZATION)
    return DPFusion(
        fuser,
        f"DP: one Gaussian release of {len(cands)} candidates' validation NDCG@10 sums (noise "
        f"multiplier {p.fusion_noise:g}, in every client's ledger as task 'fusion'); chose "
        f"{best}",
    )


def _kept_release(run: RunDir, cands: Mapping) -> tuple[dict[str, float] | None, str]:
    """The noisy sums an earlier attempt of this run drew and kept (None: it drew none), or a
    problem: a kept file that cannot be read or holds other candidates. Its noise was drawn and
    maybe seen, so neither a second draw nor ignoring it is safe."""
    path = run.path / RELEASE_FILE
    if not path.exists():
        return None, ""
    try:
        noisy = {str(k): float(v) for k, v in json.loads(path.read_text())["noisy_sums"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return None, f"{path} is unreadable ({exc!r})"
    if sorted(noisy) != sorted(cands):
        return None, f"{path} holds candidates {sorted(noisy)}, not this run's {sorted(cands)}"
    log.warning("DP fusion fit: reusing the release kept in %s", path)
    return noisy, ""


def _draw_release(cfg, run, models, work, cands, fit: Expected) -> dict[str, float]:
    """Draw the noisy sums and keep them in the run directory (durably) before any use."""
    exact = validation_sums(models, work, cands)
    seed = secrets.randbits(128) if cfg.privacy.secure_rng else cfg.seed * 1_000_003 + 17
    rng = np.random.default_rng(seed)
    scale = fit.noise_multiplier * fit.clipping_norm  # sigma x the L2 sensitivity
    noisy = {name: value + float(rng.normal(0.0, scale)) for name, value in exact.items()}
    kept = {
        "noise_multiplier": fit.noise_multiplier,
        "sensitivity": fit.clipping_norm,
        "noisy_sums": noisy,
    }
    write_json_atomic(run.path / RELEASE_FILE, kept)
    return noisy
