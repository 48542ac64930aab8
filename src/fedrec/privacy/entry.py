"""The fields of one privacy-ledger entry, their checks, and an in-memory entry builder.

A client builds its ``LedgerEntry`` from its ``ClientPrivacyState`` before the update leaves it;
whoever owns the ledger file (the server in simulation) appends it. The chain fields (``seq``,
``run_id``, ``time``, ``prev_hash``, ``hash``) are filled by the ledger alone.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from fedrec.privacy.errors import ACCOUNTANTS, PrivacyError
from fedrec.privacy.state import ClientPrivacyState

MECHANISMS: tuple[str, ...] = (
    "dp-sgd", "dp-fedavg", "dp-fedavg-adaptive", "dp-sgd-distributed", "gaussian"
)
"""``dp-fedavg-adaptive``: DP-FedAvg whose clipping norm adapts (Andrew et al. 2021); its
``noise_multiplier`` is the round's effective one, update and clipped-count noise together, and
its ``clipping_norm`` the norm that round clipped to (strategies/user_dp.py).
``dp-sgd-distributed``: one DP-SGD step whose noise is shared (privacy.noise = "distributed");
its ``noise_multiplier`` is the multiplier of the released sum, and ``noise_contributors`` (only
on these entries) the fewest clients whose noise shares, each of multiplier
``noise_multiplier / sqrt(noise_contributors)``, that sum holds (docs/distributed-dp.md)."""
DISTRIBUTED = "dp-sgd-distributed"
UNITS: tuple[str, ...] = ("user",)
RELEASE_FIELDS: tuple[str, ...] = (
    "client", "task", "round", "mechanism", "unit", "noise_multiplier", "sample_rate", "steps",
    "clipping_norm", "delta", "accountant", "epsilon", "epsilon_composed", "budget_epsilon",
)  # fmt: skip
CHAIN_FIELDS: tuple[str, ...] = ("seq", "run_id", "time", "prev_hash", "hash")
OPTIONAL_FIELDS: tuple[str, ...] = ("noise_contributors",)  # dp-sgd-distributed entries only
ALL_FIELDS: tuple[str, ...] = RELEASE_FIELDS + CHAIN_FIELDS

_HEX64 = re.compile(r"[0-9a-f]{64}")


def _text(v: Any) -> str | None:
    return None if isinstance(v, str) and v else "must be a non-empty string"


def _int(minimum: int) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        ok = isinstance(v, int) and not isinstance(v, bool) and v >= minimum
        return None if ok else f"must be an integer >= {minimum}"

    return check


def _real(
    low: float, high: float, *, low_open: bool, high_open: bool
) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            return "must be a finite number"
        if v < low or (low_open and v == low) or v > high or (high_open and v == high):
            return (
                f"must be in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            )
        return None

    return check


def _choice(options: tuple[str, ...]) -> Callable[[Any], str | None]:
    return lambda v: None if v in options else f"must be one of {options}"


_POSITIVE = _real(0.0, math.inf, low_open=True, high_open=True)
_NONNEG = _real(0.0, math.inf, low_open=False, high_open=True)
_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "client": _text,
    "task": _text,
    "round": _int(0),
    "mechanism": _choice(MECHANISMS),
    "unit": _choice(UNITS),
    "noise_multiplier": _POSITIVE,
    "sample_rate": _real(0.0, 1.0, low_open=True, high_open=False),
    "steps": _int(1),
    "clipping_norm": _POSITIVE,
    "delta": _real(0.0, 1.0, low_open=True, high_open=True),
    "accountant": _choice(ACCOUNTANTS),
    "epsilon": _NONNEG,
    "epsilon_composed": _NONNEG,
    "budget_epsilon": _POSITIVE,
    "noise_contributors": _int(2),
    "seq": _int(0),
    "run_id": _text,
    "time": _text,
    "prev_hash": lambda v: (
        None if isinstance(v, str) and _HEX64.fullmatch(v) else "must be sha256 hex"
    ),
    "hash": lambda v: None if isinstance(v, str) and _HEX64.fullmatch(v) else "must be sha256 hex",
}


def field_problems(
    fields: Mapping[str, Any], *, required: tuple[str, ...] = ALL_FIELDS
) -> list[str]:
    """Problems with an entry's fields (missing, unknown, or invalid values); empty if fine."""
    problems = []
    missing = [name for name in required if name not in fields]
    if missing:
        problems.append(f"missing field(s): {', '.join(missing)}")
    unknown = sorted(set(fields) - set(ALL_FIELDS) - set(OPTIONAL_FIELDS))
    if unknown:
        problems.append(f"unknown field(s): {', '.join(unknown)}")
    for name in (*required, *OPTIONAL_FIELDS):
        if name in fields and (msg := _CHECKS[name](fields[name])) is not None:
            problems.append(f"field {name!r} {msg}, got {fields[name]!r}")
    if "mechanism" in fields and (fields["mechanism"] == DISTRIBUTED) != (
        "noise_contributors" in fields
    ):
        problems.append(f"field 'noise_contributors' belongs to (and only to) {DISTRIBUTED} entries")
    return problems


@dataclass(frozen=True, kw_only=True)
class LedgerEntry:
    """One DP release as the client reports it; validated on construction.

    ``epsilon`` is cumulative for this client and task; ``epsilon_composed`` is cumulative over
    all of this client's tasks, as of this release (its earlier releases included, later ones
    not), which is exactly what an auditor recomputes from the ledger prefix. Both count this
    run only, also in a site ledger; ``budget_epsilon`` is the budget the client enforced, which
    in a site ledger bounds the composition of all its runs (the auditor recomputes that).
    """

    client: str
    task: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    clipping_norm: float
    delta: float
    accountant: str
    epsilon: float
    epsilon_composed: float
    budget_epsilon: float
    mechanism: str = "dp-sgd"
    unit: str = "user"
    noise_contributors: int | None = None  # dp-sgd-distributed only

    def __post_init__(self) -> None:
        problems = field_problems(self.to_fields(), required=RELEASE_FIELDS)
        if problems:
            raise PrivacyError("invalid ledger entry: " + "; ".join(problems))

    def to_fields(self) -> dict[str, Any]:
        fields = asdict(self)
        if fields["noise_contributors"] is None:
            del fields["noise_contributors"]
        return fields

    @classmethod
    def from_state(
        cls,
        state: ClientPrivacyState,
        *,
        client: str,
        task: str,
        round: int,
        clipping_norm: float,
        delta: float,
        budget_epsilon: float,
        mechanism: str = "dp-sgd",
        noise_contributors: int | None = None,
    ) -> LedgerEntry:
        """The entry for ``task``'s latest record in ``state`` (call after ``state.record``).

        Entries of one client must be appended in the order the state recorded them, so that
        each ``epsilon_composed`` equals the composition over the ledger prefix.
        """
        upto = state.last_index(task) + 1
        sigma, q, steps = state.history(task)[-1]
        return cls(
            client=client,
            task=task,
            round=round,
            noise_multiplier=sigma,
            sample_rate=q,
            steps=steps,
            clipping_norm=clipping_norm,
            delta=delta,
            accountant=state.accountant,
            epsilon=state.epsilon(task, delta=delta, upto=upto),
            epsilon_composed=state.composed_epsilon(delta=delta, upto=upto),
            budget_epsilon=budget_epsilon,
            mechanism=mechanism,
            noise_contributors=noise_contributors,
        )
