"""Secure-aggregation settings, the per-round plan (who shares with whom) and the errors.

The plan follows SecAgg+ (Bell et al., CCS 2020): each client secret-shares its keys only with
``neighbours`` others on a random ring (a Harary graph over a shuffled order), so the cost grows
with the degree instead of the number of clients; ``neighbours=None`` is the complete graph of
the original SecAgg (Bonawitz et al., CCS 2017).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


class SecAggError(RuntimeError):
    """The protocol cannot go on: a bad message, a failed check, or a wrong stage."""


class TooFewSurvivors(SecAggError):
    """Fewer clients than the reconstruction threshold are left: the sum cannot be unmasked."""


class ShareVerificationError(SecAggError):
    """A reconstructed secret does not match its commitment: a share was altered."""


@dataclass(frozen=True, kw_only=True)
class SecAggConfig:
    """What the clients quantise and how many of them must survive.

    ``clipping_range`` c: every coordinate is clipped to [-c, c] before quantisation; pick it
    above the (clipped, noised) update's largest coordinate, since larger c means coarser steps.
    ``quantization_range`` L: integer levels over [-c, c], one step is 2c / (L - 1).
    ``modulus`` M: masks and sums live in Z_M (a power of two, at most 2**64); n clients fit
    while n (L - 1) < M.
    ``threshold`` t: shares needed to rebuild a client's secret; None = a strict majority of its
    share holders, which also stops a server that lies about dropouts from getting both secrets.
    ``neighbours`` k: others each client shares with (SecAgg+); None = everyone (SecAgg).
    ``min_threshold``: the threshold is at least this (clients whose DP noise is a share of
    the sum's refuse to unmask below it: fedrec.client.secure).
    """

    clipping_range: float = 8.0  # Flower's SecAgg+ default: room for noised model deltas
    quantization_range: int = 2**22  # step 2c/(L-1) = 3.8e-6 at c = 8
    modulus: int = 2**32  # 1024 clients fit with L = 2**22; 4-byte wire format
    threshold: int | None = None  # None: majority of the k + 1 share holders
    min_threshold: int = 0  # a floor under the threshold (distributed DP's min contributors)
    neighbours: int | None = None  # None: complete graph

    def __post_init__(self) -> None:
        if not self.clipping_range > 0:
            raise ValueError(f"clipping_range must be > 0, got {self.clipping_range!r}.")
        if not isinstance(self.quantization_range, int) or self.quantization_range < 2:
            raise ValueError(
                f"quantization_range must be an integer >= 2, got {self.quantization_range!r}."
            )
        m = self.modulus
        if not isinstance(m, int) or m < 4 or m > 2**64 or m & (m - 1):
            raise ValueError(f"modulus must be a power of two in [4, 2**64], got {m!r}.")
        if self.quantization_range > m // 2:
            raise ValueError("quantization_range must be at most modulus / 2 (two clients).")
        if self.quantization_range > 2**53:  # rounding runs in float64: levels - 1 must be exact
            raise ValueError("quantization_range must be at most 2**53 (float64's exact integers).")
        if self.threshold is not None and self.threshold < 2:
            raise ValueError(
                f"threshold must be >= 2 (one share alone would reveal the secret), "
                f"got {self.threshold!r}."
            )
        if self.neighbours is not None and self.neighbours < 2:
            raise ValueError(f"neighbours must be >= 2 or None, got {self.neighbours!r}.")

    def word(self) -> type[np.unsignedinteger]:
        """The machine word for Z_M: its wrap-around (mod 2**32 or 2**64) is a multiple of M."""
        return np.uint32 if self.modulus <= 2**32 else np.uint64

    def max_clients(self) -> int:
        """Largest number of clients whose quantised sum cannot wrap around the modulus."""
        return (self.modulus - 1) // (self.quantization_range - 1)

    def step(self) -> float:
        """One quantisation step: each client's rounding error is below this, per coordinate."""
        return 2 * self.clipping_range / (self.quantization_range - 1)

    def error_bound(self, n_clients: int) -> float:
        """Worst-case error of a coordinate of the sum of ``n_clients`` in-range inputs.

        Stochastic rounding is unbiased, so the typical error is about sqrt(n) step / 2;
        inputs outside [-c, c] add their clipping error on top.
        """
        return n_clients * self.step()


@dataclass(frozen=True)
class RoundPlan:
    """Who takes part in one round and with whom each client shares (symmetric graph)."""

    round_id: str
    node_ids: tuple[int, ...]
    threshold: int
    neighbours: dict[int, tuple[int, ...]]  # node -> its share holders, itself excluded

    def holders(self, node_id: int) -> tuple[int, ...]:
        """The nodes holding a share of ``node_id``'s secrets, itself included, sorted."""
        return tuple(sorted((*self.neighbours[node_id], node_id)))


def plan_round(
    config: SecAggConfig,
    node_ids: Iterable[int],
    round_id: str,
    rng: random.Random | None = None,
) -> RoundPlan:
    """Neighbourhoods and threshold for the sampled ``node_ids`` (at least 3 distinct ids)."""
    ids = sorted(set(node_ids))
    n = len(ids)
    if n < 3:
        raise ValueError(f"secure aggregation needs at least 3 clients, got {n}.")
    if n > config.max_clients():
        raise ValueError(
            f"{n} clients overflow modulus {config.modulus} at quantization_range "
            f"{config.quantization_range}; raise the modulus or lower the range "
            f"(at most {config.max_clients()} clients)."
        )
    k = n - 1 if config.neighbours is None else min(config.neighbours, n - 1)
    if k < n - 1 and k % 2:
        raise ValueError(f"neighbours must be even on a ring (k/2 each side), got {k}.")
    t = (k + 1) // 2 + 1 if config.threshold is None else config.threshold
    t = max(t, config.min_threshold)
    if t > k + 1:
        raise ValueError(
            f"threshold {t} exceeds the {k + 1} share holders of each client "
            f"({n} clients, neighbours={config.neighbours}); lower the threshold."
        )
    return RoundPlan(round_id, tuple(ids), t, _ring(ids, k, rng or random.SystemRandom()))


def _ring(ids: list[int], k: int, rng: random.Random) -> dict[int, tuple[int, ...]]:
    n = len(ids)
    if k == n - 1:
        return {u: tuple(v for v in ids if v != u) for u in ids}
    order = list(ids)
    rng.shuffle(order)
    half = k // 2
    return {
        u: tuple(sorted(order[(i + d) % n] for d in range(-half, half + 1) if d))
        for i, u in enumerate(order)
    }
