"""The server's side of one secure-aggregation round: relay, sum, unmask. No I/O.

The server sees public keys, sealed shares it cannot open, masked vectors that are uniform in
Z_M one by one, and, at the end, the seed shares of survivors and the mask-key shares of nodes
that dropped after sharing. From those it removes the masks of the sum and learns nothing else
than the sum of the survivors' quantised inputs and who survived each stage.

Node sets follow Bonawitz et al. (2017): U1 advertised keys, U2 sent shares, U3 sent a masked
input (their inputs are the sum), U4 answered the unmask request.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from fedrec.secagg import crypto
from fedrec.secagg.client import (
    STAGES,
    ClientSetup,
    KeyAdvert,
    MaskedInput,
    UnmaskRequest,
    pairwise_mask,
)
from fedrec.secagg.params import (
    RoundPlan,
    SecAggConfig,
    SecAggError,
    ShareVerificationError,
    TooFewSurvivors,
)
from fedrec.secagg.quantize import Layout, dequantize_sum, size_of, unflatten

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AggregateResult:
    """The unmasked sum and who is in it."""

    sums: dict[str, NDArray[np.float64]]  # name -> sum over survivors, in the inputs' shapes
    survivors: tuple[int, ...]  # nodes whose inputs are in the sum (U3)
    dropped: dict[str, tuple[int, ...]]  # stage -> nodes that did not answer it
    error_bound: float  # worst-case quantisation error per coordinate of the sum


class SecAggServer:
    """Drive one round: call ``setup``, then each ``collect_*`` with the replies received."""

    def __init__(self, plan: RoundPlan, config: SecAggConfig) -> None:
        self.plan, self.config = plan, config
        self.active: list[set[int]] = [set(plan.node_ids)]  # U0, U1, ...
        self.adverts: dict[int, KeyAdvert] = {}
        self.pairs: dict[int, set[int]] = {}  # node -> nodes it masks with
        self.layout: Layout = ()
        self.total: NDArray[np.unsignedinteger] | None = None
        self.requests: dict[int, UnmaskRequest] = {}

    def setup(self) -> dict[int, ClientSetup]:
        p = self.plan
        return {
            u: ClientSetup(p.round_id, u, p.threshold, p.neighbours[u], self.config)
            for u in p.node_ids
        }

    def collect_keys(self, adverts: Mapping[int, KeyAdvert]) -> dict[int, dict[int, KeyAdvert]]:
        """U1; per node, the keys of its share holders in U1 (its own included)."""
        u1 = self._next("setup", _distinct_keys(adverts))
        self.adverts = {u: adverts[u] for u in u1}
        return {u: {v: self.adverts[v] for v in self.plan.holders(u) if v in u1} for u in u1}

    def collect_shares(
        self, sealed: Mapping[int, Mapping[int, bytes]]
    ) -> dict[int, dict[int, bytes]]:
        """U2; per node, the sealed shares addressed to it by neighbours in U2 (both ways)."""
        u2 = self._next("share_keys", sealed)
        self.pairs = {
            u: {v for v in self.plan.neighbours[u] if v in u2 and v in sealed[u] and u in sealed[v]}
            for u in u2
        }
        return {u: {v: sealed[v][u] for v in self.pairs[u]} for u in u2}

    def collect_masked(self, inputs: Mapping[int, MaskedInput]) -> dict[int, UnmaskRequest]:
        """U3 (malformed inputs count as dropped); per node, whose shares to reveal."""
        u2 = self.active[-1]
        valid = self._well_formed({u: i for u, i in inputs.items() if u in u2})
        u3 = self._next("masked_input", valid)
        _require_connected(u3, self.pairs)
        word = self.config.word()
        total = np.zeros(size_of(self.layout), dtype=word)
        for u in sorted(u3):
            total += valid[u].vector.astype(word)
        self.total = total
        self.requests = {
            u: UnmaskRequest(
                survivors=tuple(sorted((self.pairs[u] | {u}) & u3)),
                dropped=tuple(sorted(self.pairs[u] & (u2 - u3))),
            )
            for u in u3
        }
        return self.requests

    def unmask(self, shares: Mapping[int, Mapping[int, bytes]]) -> AggregateResult:
        """Rebuild the secrets, strip the masks, dequantise: the survivors' sum."""
        if self.total is None:
            raise SecAggError("unmask before the masked inputs were collected")
        u2, u3 = self.active[2], self.active[3]
        u4 = self._next("unmask", shares, minimum=False)
        seed_shares, key_shares = self._gather(shares, u4)
        total, size, m = self.total.copy(), self.total.size, self.config.modulus
        for u in sorted(u3):
            seed = self._rebuild(u, seed_shares.get(u, []), "seed")
            total -= crypto.mask(seed, size, m, purpose=f"self/{self.plan.round_id}")
        for v in sorted(u2 - u3):
            partners = self.pairs[v] & u3
            if not partners:
                continue
            secret = self._rebuild(v, key_shares.get(v, []), "mask key")
            for u in sorted(partners):  # u added +p if u > v, else -p: take it back out
                p = pairwise_mask(secret, self.adverts[u].mask_pk, self.plan.round_id, size, m)
                total = total - p if u > v else total + p
        total &= self.config.word()(m - 1)
        flat = dequantize_sum(total, len(u3), self.config)
        return AggregateResult(
            sums=unflatten(flat, self.layout),
            survivors=tuple(sorted(u3)),
            dropped=self._dropped(),
            error_bound=self.config.error_bound(len(u3)),
        )

    def _next(self, stage: str, replies: Mapping[int, object], minimum: bool = True) -> set[int]:
        if len(self.active) != STAGES.index(stage) + 1:
            raise SecAggError(f"stage '{stage}' out of order (after {len(self.active) - 1})")
        prev = self.active[-1]
        stray = set(replies) - prev
        if stray:
            log.warning("secagg %s: ignoring replies from %s", stage, sorted(stray))
        now = prev & set(replies)
        if minimum and len(now) < self.plan.threshold:
            raise TooFewSurvivors(
                f"secure aggregation, stage '{stage}': only {len(now)} of "
                f"{len(self.plan.node_ids)} clients answered; the reconstruction threshold is "
                f"{self.plan.threshold} (dropped: {sorted(prev - now)})"
            )
        self.active.append(now)
        return now

    def _well_formed(self, inputs: Mapping[int, MaskedInput]) -> dict[int, MaskedInput]:
        if not inputs:
            return {}
        layout, _ = Counter(i.layout for i in inputs.values()).most_common(1)[0]
        size, m = size_of(layout), self.config.modulus
        valid = {}
        for u, i in inputs.items():
            v = np.asarray(i.vector)
            if i.layout != layout or v.shape != (size,) or v.dtype.kind != "u":
                log.warning("secagg: node %d sent a malformed masked input; dropping it", u)
            elif m < 2**64 and v.size and int(v.max()) >= m:
                log.warning("secagg: node %d sent values outside Z_%d; dropping it", u, m)
            else:
                valid[u] = i
        self.layout = layout
        return valid

    def _gather(
        self, shares: Mapping[int, Mapping[int, bytes]], u4: set[int]
    ) -> tuple[dict[int, list[bytes]], dict[int, list[bytes]]]:
        """Per owner, the revealed shares, in holder order; only what each holder was asked."""
        seed: dict[int, list[bytes]] = {}
        key: dict[int, list[bytes]] = {}
        for holder in sorted(u4):
            req, got = self.requests[holder], shares[holder]
            if set(got) != set(req.survivors) | set(req.dropped):
                log.warning("secagg unmask: node %d answered for other nodes", holder)
            for owner in req.survivors:
                if owner in got:
                    seed.setdefault(owner, []).append(got[owner])
            for owner in req.dropped:
                if owner in got:
                    key.setdefault(owner, []).append(got[owner])
        return seed, key

    def _rebuild(self, owner: int, shares: list[bytes], what: str) -> bytes:
        t = self.plan.threshold
        if len(shares) < t:
            raise TooFewSurvivors(
                f"secure aggregation, stage 'unmask': {len(shares)} share(s) of node {owner}'s "
                f"{what} arrived, {t} needed; too many of its neighbours dropped"
            )
        try:
            secret = crypto.combine(shares[:t])
        except SecAggError:
            secret = b""  # fails the check below
        advert = self.adverts[owner]
        ok = (
            crypto.commit(secret, self.plan.round_id) == advert.seed_commitment
            if what == "seed"
            else len(secret) == crypto.SEED_BYTES and crypto.public_key(secret) == advert.mask_pk
        )
        if not ok:
            raise ShareVerificationError(
                f"secure aggregation: node {owner}'s {what} rebuilt from shares does not match "
                "its commitment; a share was altered (round aborted, no sum released)"
            )
        return secret

    def _dropped(self) -> dict[str, tuple[int, ...]]:
        return {
            stage: tuple(sorted(self.active[i] - self.active[i + 1]))
            for i, stage in enumerate(STAGES)
        }


def _distinct_keys(adverts: Mapping[int, KeyAdvert]) -> dict[int, KeyAdvert]:
    """Adverts of usable 32-byte keys that nobody else used: one bad advert must not stop its
    peers (a low-order key would make every neighbour's agreement with it fail)."""
    seen = Counter(k for a in adverts.values() for k in (a.enc_pk, a.mask_pk))
    good = {}
    for u, a in adverts.items():
        sizes = {len(a.enc_pk), len(a.mask_pk), len(a.seed_commitment)}
        if (
            sizes != {crypto.SEED_BYTES}
            or seen[a.enc_pk] + seen[a.mask_pk] != 2
            or not (crypto.usable_public_key(a.enc_pk) and crypto.usable_public_key(a.mask_pk))
        ):
            log.warning("secagg setup: node %d advertised malformed or reused keys; dropping it", u)
        else:
            good[u] = a
    return good


def _require_connected(nodes: set[int], pairs: Mapping[int, set[int]]) -> None:
    """Refuse to unmask when the survivors' masking graph falls apart (SecAgg+ only).

    The masks between two components would then be gone and each component's partial sum
    could be unmasked on its own (Bell et al. 2020 require a connected graph).
    """
    start = min(nodes)
    reached, frontier = {start}, [start]
    while frontier:
        for v in pairs[frontier.pop()] & nodes:
            if v not in reached:
                reached.add(v)
                frontier.append(v)
    if reached != nodes:
        raise SecAggError(
            f"secure aggregation: dropouts split the survivors into disconnected groups "
            f"({len(reached)} of {len(nodes)} reachable); unmasking would reveal partial sums, "
            "so the round is aborted. Use more neighbours."
        )
