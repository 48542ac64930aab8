"""Check a run ledger's mechanism inputs against what the run's config says its clients did.

The audit recomputes every epsilon from the ledger's own lines, so it trusts each line's
``sample_rate``, ``steps``, ``clipping_norm`` and ``delta``: a client that took more steps than
it ledgered, or sampled at a higher rate, would spend more than the ledger shows and still
pass. Each of these inputs is fixed by the run's config and the client's number of users (the
data the auditor can rebuild for a simulation): ``expected`` maps each (client, task) to the
values its releases must carry, and ``check_claims`` lists every line that differs. What the
client's training really did is what it ledgers (``TrainStats``), so this catches a trainer or
an accounting path that strays from the plan the calibration assumed. The noise multiplier is
calibrated from the budget; where that calibration is a function of the config and the users
(a simulated run's clients), ``expected`` can hold it too, so a line claiming more noise than
the calibration gives is found. No ledger check can find a client that ledgers the calibrated
multiplier but trains with less noise: the canary audit (``--empirical``) tests the noise.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

REL_TOL = 1e-9  # floats written to JSON and read back are exact; this is only float slack
# a noise multiplier is found to a relative 1e-3 (privacy.accounting.SCALE_PRECISION), so one
# recalibrated on another install of the same libraries may differ by about that: a line is
# flagged only when it claims more noise than that, the direction that would hide spending
NOISE_TOL = 2e-3


@dataclass(frozen=True)
class Expected:
    """What every release of one (client, task) must carry."""

    mechanism: str
    sample_rate: float
    steps: int
    clipping_norm: float
    noise_multiplier: float | None = None  # None: not checked; at most this (NOISE_TOL)
    noise_contributors: int | None = None  # None: the line must not name any (local noise)
    problem: str = ""  # why no line of this (client, task) can be right (its calibration fails)


def check_claims(
    entries: Iterable[Mapping[str, Any]],
    expected: Mapping[tuple[str, str], Expected],
    *,
    delta: float,
) -> tuple[int, list[str]]:
    """(lines checked, one problem per line whose inputs differ from ``expected``)."""
    checked, problems = 0, []
    for number, entry in enumerate(entries, start=1):
        checked += 1
        key = (str(entry["client"]), str(entry["task"]))
        want = expected.get(key)
        where = f"line {number} ({key[0]}, {key[1]}, round {entry['round']})"
        if want is None:
            problems.append(f"{where}: no such client and task in this run's config and data")
            continue
        fields = {**vars(want), "delta": delta}
        noise = fields.pop("noise_multiplier")
        del fields["problem"]
        wrong = [want.problem] if want.problem else []
        wrong += [
            f"{name} {entry.get(name)!r}, expected {value!r}"
            for name, value in fields.items()
            if not _same(entry.get(name), value)
        ]
        claimed = entry.get("noise_multiplier")
        if noise is not None and not (
            isinstance(claimed, (int, float)) and claimed <= noise * (1 + NOISE_TOL)
        ):
            wrong.append(f"noise_multiplier {claimed!r}, more than the {noise!r} calibrated")
        if wrong:
            problems.append(f"{where}: " + "; ".join(wrong))
    return checked, problems


def _same(got: Any, want: Any) -> bool:
    if want is None or isinstance(want, str):
        return got == want
    if isinstance(got, bool) or not isinstance(got, (int, float)):
        return False
    if isinstance(want, int) and not isinstance(want, bool):
        return got == want
    return math.isclose(float(got), float(want), rel_tol=REL_TOL, abs_tol=0.0)
