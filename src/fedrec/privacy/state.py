"""A client's privacy state for a whole run: what it released, per task, in order.

The state is the Opacus accountant state (a history of ``(noise_multiplier, sample_rate,
steps)``) kept per task, plus the order of the records, so that the composed epsilon "as of" any
record can be recomputed, exactly as an auditor reading the ledger does. All epsilons are
cumulative over the run; the state never reports a per-round epsilon.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from fedrec.privacy.accounting import HistoryItem, epsilon_opacus
from fedrec.privacy.errors import (
    PrivacyError,
    check_accountant,
    check_count,
    check_delta,
    check_epsilon,
    check_noise_multiplier,
    check_sample_rate,
)

STATE_VERSION = 1


@dataclass
class ClientPrivacyState:
    """Per-task accountant histories of one client; serialisable to JSON for ``context.state``.

    Composition: all tasks train on the same users, so ``composed_epsilon`` runs every task's
    history through one accountant (adaptive composition of the subsampled Gaussian mechanisms,
    Dwork & Roth 2014, Sec. 3.5; tight numerical composition per Gopi et al. 2021 for PRV).
    """

    accountant: Literal["prv", "rdp"] = "prv"
    histories: dict[str, list[HistoryItem]] = field(default_factory=dict, init=False)
    order: list[str] = field(default_factory=list, init=False)  # task of each record, in order

    def __post_init__(self) -> None:
        check_accountant(self.accountant)

    @property
    def tasks(self) -> list[str]:
        return sorted(self.histories)

    def __len__(self) -> int:
        return len(self.order)

    def record(self, task: str, *, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Record a release: ``steps`` DP-SGD steps of ``task`` at this noise and sample rate."""
        if not isinstance(task, str) or not task:
            raise PrivacyError(f"task must be a non-empty string, got {task!r}.")
        item = (
            check_noise_multiplier(noise_multiplier),
            check_sample_rate(sample_rate),
            check_count(steps, name="steps"),
        )
        self.histories.setdefault(task, []).append(item)
        self.order.append(task)

    def history(self, task: str, *, upto: int | None = None) -> list[HistoryItem]:
        """The task's records among the first ``upto`` records (all if None)."""
        return [item for t, item in self._records(upto) if t == task]

    def composed_history(self, *, upto: int | None = None) -> list[HistoryItem]:
        """All tasks' records among the first ``upto`` records (all if None)."""
        return [item for _, item in self._records(upto)]

    def epsilon(self, task: str, *, delta: float, upto: int | None = None) -> float:
        """Cumulative epsilon of one task (0 for a task never trained)."""
        hist = self.history(task, upto=upto)
        return epsilon_opacus(hist, delta=delta, accountant=self.accountant)

    def composed_epsilon(self, *, delta: float, upto: int | None = None) -> float:
        """Cumulative epsilon of all tasks together: the number the client's budget bounds."""
        hist = self.composed_history(upto=upto)
        return epsilon_opacus(hist, delta=delta, accountant=self.accountant)

    def would_exceed(
        self,
        task: str,
        *,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        delta: float,
        budget: float,
    ) -> bool:
        """Whether the composed epsilon would exceed ``budget`` after the planned release."""
        check_epsilon(budget, name="budget")
        planned = (
            check_noise_multiplier(noise_multiplier),
            check_sample_rate(sample_rate),
            check_count(steps, name="steps"),
        )
        hist = [*self.composed_history(), planned]
        eps = epsilon_opacus(hist, delta=check_delta(delta), accountant=self.accountant)
        return eps > budget

    def last_index(self, task: str) -> int:
        """Index (0-based, in record order) of the task's latest record."""
        for i in range(len(self.order) - 1, -1, -1):
            if self.order[i] == task:
                return i
        raise PrivacyError(f"task {task!r} has no record yet; call record() first.")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict; ``from_dict`` restores an equal state."""
        return {
            "version": STATE_VERSION,
            "accountant": self.accountant,
            "records": [[t, *item] for t, item in self._records(None)],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClientPrivacyState:
        if data.get("version") != STATE_VERSION:
            raise PrivacyError(
                f"privacy state version {data.get('version')!r} is not {STATE_VERSION}; it was "
                "written by another fedrec version: migrate it or start a new run."
            )
        state = cls(accountant=data["accountant"])
        for rec in data["records"]:
            task, sigma, q, steps = rec
            state.record(task, noise_multiplier=sigma, sample_rate=q, steps=steps)
        return state

    @classmethod
    def from_entries(
        cls, entries: Sequence[Mapping[str, Any]], *, accountant: str
    ) -> ClientPrivacyState:
        """The state a sequence of one client's ledger entries describes (in ledger order).

        The ledger is the source of truth after a restart: it outlives any in-memory state.
        """
        state = cls(accountant=accountant)  # type: ignore[arg-type]
        for e in entries:
            if e.get("accountant") != accountant:
                raise PrivacyError(
                    f"ledger entry seq {e.get('seq')} was accounted with {e.get('accountant')!r}, "
                    f"this run uses {accountant!r}: resume with the run's own config"
                )
            state.record(
                e["task"],
                noise_multiplier=e["noise_multiplier"],
                sample_rate=e["sample_rate"],
                steps=e["steps"],
            )
        return state

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> ClientPrivacyState:
        return cls.from_dict(json.loads(text))

    def _records(self, upto: int | None) -> list[tuple[str, HistoryItem]]:
        n = len(self.order) if upto is None else check_count(upto, name="upto", minimum=0)
        cursor: dict[str, int] = {}
        out = []
        for task in self.order[:n]:
            i = cursor.get(task, 0)
            out.append((task, self.histories[task][i]))
            cursor[task] = i + 1
        return out
