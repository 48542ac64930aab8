"""Record-level DP on a client: calibrate once, refuse past the budget, ledger every release.

State lives in Flower's ``context.state`` (per node, for the whole run, in simulation and on a
SuperNode): the accountant history and the noise multipliers calibrated at the first round. The
ledger entry of each task's release is appended before the reply (and so the update) leaves.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from flwr.app import ConfigRecord, Context

from fedrec.client.local import RoundResult
from fedrec.config import FedrecConfig
from fedrec.privacy import ClientPrivacyState, Ledger, LedgerEntry, calibrate_noise, validate_budget
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
                None if p.secure_rng else hash((self.seed, server_round, task)) & (2**62 - 1),
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
    ledger = Ledger(ledger_path, run_id) if ledger_path else None
    ctl = ClientPrivacy(
        cfg, context, name, plan, sigmas, state, ledger, cfg.seed * 100_003 + client
    )
    ctl._save()
    return ctl
