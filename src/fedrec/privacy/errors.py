"""Validation of privacy parameters: every check names the field and says how to fix it."""

from __future__ import annotations

import math
from typing import Any

from fedrec.errors import FedrecError

ACCOUNTANTS: tuple[str, ...] = ("prv", "rdp")
"""Opacus accountants we accept for guarantees (``gdp`` under-reports and is refused)."""


class PrivacyError(FedrecError):
    """A privacy parameter or budget is invalid or would be exceeded."""


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive(name: str, value: Any, *, fix: str) -> float:
    """Return ``value`` as float if it is a finite number > 0, else raise ``PrivacyError``."""
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise PrivacyError(f"{name} must be a finite number > 0, got {value!r}; {fix}.")
    return float(value)


def check_epsilon(value: Any, *, name: str = "epsilon") -> float:
    return check_positive(name, value, fix="set a positive privacy budget (e.g. 1 to 10)")


def check_delta(value: Any, *, name: str = "delta") -> float:
    """Delta must lie in (0, 1); whether it is small enough is `validate_budget`'s business."""
    if not _is_real(value) or not 0 < value < 1:
        raise PrivacyError(
            f"{name} must be in (0, 1), got {value!r}; use delta < 1/n for n protected users "
            "(e.g. 1e-5)."
        )
    return float(value)


def check_sample_rate(value: Any, *, name: str = "sample_rate") -> float:
    if not _is_real(value) or not 0 < value <= 1:
        raise PrivacyError(
            f"{name} must be in (0, 1], got {value!r}; use expected batch size / number of "
            "users at the client."
        )
    return float(value)


def check_noise_multiplier(value: Any, *, name: str = "noise_multiplier") -> float:
    return check_positive(
        name, value, fix="DP-SGD needs Gaussian noise; calibrate it with calibrate_noise()"
    )


def check_count(value: Any, *, name: str, minimum: int = 1) -> int:
    """An integer count (steps, rounds, records) of at least ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise PrivacyError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return value


def check_accountant(value: Any, *, allowed: tuple[str, ...] = ACCOUNTANTS) -> str:
    if value not in allowed:
        raise PrivacyError(
            f"accountant must be one of {allowed}, got {value!r}; 'prv' is the tight default, "
            "'rdp' the classic upper bound."
        )
    return str(value)
