"""Record-level DP on a client: calibrate once, refuse past the budget, ledger every release.

State lives in Flower's ``context.state`` (per node, for the whole run, in simulation and on a
SuperNode): the accountant history and the noise multipliers calibrated at the first round. The
ledger entry of each task's release is appended before the reply (and so the update) leaves.
With a ledger, the accountant is rebuilt from the client's own ledger lines every round: the
ledger outlives ``context.state`` (a restarted server or SuperNode starts with an empty one), so
a resumed run neither forgets nor double-counts a release. A reply already released for the same
round and global model is sent again, not retrained (client/replay.py).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from fedrec.client.local import RoundResult
from fedrec.client.replay import DIRNAME, ReleaseCache, arrays_digest
from fedrec.config import FedrecConfig
from fedrec.privacy import (
    ClientPrivacyState,
    Ledger,
    LedgerEntry,
    LedgerError,
    calibrate_noise,
    validate_budget,
)
from fedrec.training import DPSGDParams, LocalData, sample_rate_for, steps_per_round

log = logging.getLogger(__name__)
STATE_KEY = "fedrec-privacy"
CALIBRATION_MARGIN = 0.999


class PrivacyRefusal(RuntimeError):
    """The client's next round would exceed its privacy budget: it refuses to train."""


@dataclass
class ClientPrivacy:
    cfg: FedrecConfig
    context: Context
    client: str
    plan: Mapping[str, tuple[float, int]]  # task -> (sample rate, steps per round)
    sigmas: dict[str, float]
    state: ClientPrivacyState
    ledger: Ledger | None
    seed: int
    released: frozenset[str] = frozenset()  # hashes of this client's ledger lines
    global_digest: str = ""  # of the global model this round trains from

    @property
    def cache(self) -> ReleaseCache | None:
        return ReleaseCache(self.ledger.path.parent / DIRNAME, self.client) if self.ledger else None

    def replay(self, server_round: int, arrays: ArrayRecord) -> RecordDict | None:
        """The reply this client already released for this round and global model, if any."""
        self.global_digest = arrays_digest(arrays)
        kept = self.cache.load(server_round, self.global_digest) if self.cache else None
        if kept is None:
            return None
        content, lines = kept
        if not all(json.loads(line).get("hash") in self.released for line in lines):
            log.warning(
                "%s: kept release of round %d is not in the ledger", self.client, server_round
            )
            return None
        log.warning("%s: round %d already released; sending it again", self.client, server_round)
        return content

    def remember(self, server_round: int, content: RecordDict) -> None:
        """Keep the reply about to leave, in case the server dies before aggregating it."""
        if self.cache is not None and self.global_digest:
            self.cache.save(server_round, self.global_digest, content)

    def before_round(self, server_round: int) -> dict[str, DPSGDParams]:
        """The round's DP parameters, or PrivacyRefusal if it would exceed the budget."""
        p = self.cfg.privacy
        trial = copy.deepcopy(self.state)
        for task, (q, steps) in self.plan.items():
            trial.record(task, noise_multiplier=self.sigmas[task], sample_rate=q, steps=steps)
        spent = trial.composed_epsilon(delta=p.delta)
        if spent > p.epsilon:
            raise PrivacyRefusal(
                f"client {self.client}: round {server_round} would raise epsilon to {spent:.3f} "
                f"> budget {p.epsilon:g} (delta {p.delta:g}); refusing to train"
            )
        return {
            task: DPSGDParams(
                self.sigmas[task],
                p.clipping_norm,
                None if p.secure_rng else _noise_seed(self.seed, server_round, task),
            )
            for task in self.plan
        }

    def after_round(self, server_round: int, result: RoundResult) -> list[str]:
        """Record each task's release, append its ledger entry, persist the state."""
        p = self.cfg.privacy
        entries = []
        for task, stats in result.stats.items():
            self.state.record(
                task,
                noise_multiplier=self.sigmas[task],
                sample_rate=stats.sample_rate,
                steps=stats.steps,
            )
            entry = LedgerEntry.from_state(
                self.state,
                client=self.client,
                task=task,
                round=server_round,
                clipping_norm=p.clipping_norm,
                delta=p.delta,
                budget_epsilon=p.epsilon,
            )
            written = self.ledger.append(entry) if self.ledger else entry.to_fields()
            entries.append(json.dumps(written, sort_keys=True))
        self._save()
        return entries

    def _save(self) -> None:
        self.context.state[STATE_KEY] = ConfigRecord(
            {"state": self.state.to_json(), "sigmas": json.dumps(self.sigmas)}
        )


def client_privacy(
    cfg: FedrecConfig,
    context: Context,
    client: int,
    data: LocalData,
    *,
    ledger_path: str | None,
    run_id: str,
) -> ClientPrivacy | None:
    """The client's DP controller for record-level DP; None when DP is off or server-side."""
    p = cfg.privacy
    if p.mode != "record":
        return None
    validate_budget(epsilon=p.epsilon, delta=p.delta, min_records=data.n_users)
    plan = {
        t: (sample_rate_for(c, data.n_users), steps_per_round(c, data.n_users))
        for t, c in cfg.tasks.items()
    }
    name = f"client-{client}"
    ledger = Ledger(ledger_path, run_id) if ledger_path else None
    if STATE_KEY in context.state:
        rec = context.state[STATE_KEY]
        state = ClientPrivacyState.from_json(str(rec["state"]))
        sigmas = json.loads(str(rec["sigmas"]))
    else:
        state = ClientPrivacyState(accountant=p.accountant)
        sigmas = (
            calibrate_noise(  # a hair under budget so float noise never refuses a planned round
                epsilon=p.epsilon * CALIBRATION_MARGIN,
                delta=p.delta,
                sample_rate={t: q for t, (q, _) in plan.items()},
                steps_per_round={t: s for t, (_, s) in plan.items()},
                rounds=cfg.rounds,
                task_shares=dict(zip(cfg.tasks, p.task_shares, strict=False)),
                accountant=p.accountant,
            )
        )
        log.info("%s: calibrated noise multipliers %s", name, sigmas)
    own = _own_entries(ledger, name)
    if ledger is not None:
        state = _state_from_ledger(own, state, name, p.accountant)
    ctl = ClientPrivacy(
        cfg,
        context,
        name,
        plan,
        sigmas,
        state,
        ledger,
        cfg.seed * 100_003 + client,
        released=frozenset(str(e.get("hash")) for e in own),
    )
    ctl._save()
    return ctl


def _own_entries(ledger: Ledger | None, client: str) -> list[dict]:
    if ledger is None:
        return []
    return [
        e for e in ledger.read() if e.get("client") == client and e.get("run_id") == ledger.run_id
    ]


def _state_from_ledger(
    entries: list[dict], kept: ClientPrivacyState, client: str, accountant: str
) -> ClientPrivacyState:
    """The accountant the ledger describes; LedgerError if the ledger lost releases."""
    state = ClientPrivacyState.from_entries(entries, accountant=accountant)
    if len(kept) > len(state):
        raise LedgerError(
            f"{client}: the ledger holds {len(state)} of this client's releases, its state "
            f"{len(kept)}: ledger lines were removed; refusing to train"
        )
    return state


def _noise_seed(seed: int, server_round: int, task: str) -> int:
    """Reproducible across processes (``hash()`` of a str is salted per process)."""
    digest = hashlib.sha256(f"{seed}/{server_round}/{task}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**62 - 1)
