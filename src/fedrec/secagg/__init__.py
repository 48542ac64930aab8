"""Secure aggregation (SecAgg / SecAgg+) for Flower's Message API.

The server learns the sum of the surviving clients' (clipped, noised, quantised) updates and
who survived, nothing else, as long as fewer than ``threshold`` clients collude with it.
The protocol core (``params``, ``crypto``, ``quantize``, ``client``, ``server``) does no I/O;
``flower`` drives it over a ``Grid`` and answers it inside a ``ClientApp``. See
docs/secure-aggregation.md.
"""

from fedrec.secagg.client import ClientSetup, KeyAdvert, MaskedInput, SecAggClient, UnmaskRequest
from fedrec.secagg.local import run_local_round
from fedrec.secagg.params import (
    RoundPlan,
    SecAggConfig,
    SecAggError,
    ShareVerificationError,
    TooFewSurvivors,
    plan_round,
)
from fedrec.secagg.server import AggregateResult, SecAggServer

__all__ = [
    "AggregateResult",
    "ClientSetup",
    "KeyAdvert",
    "MaskedInput",
    "RoundPlan",
    "SecAggClient",
    "SecAggConfig",
    "SecAggError",
    "SecAggServer",
    "ShareVerificationError",
    "TooFewSurvivors",
    "UnmaskRequest",
    "plan_round",
    "run_local_round",
]
