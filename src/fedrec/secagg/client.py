"""The client's side of one secure-aggregation round, as a state machine with no I/O.

Stages (Bonawitz et al., CCS 2017, §4; SecAgg+ neighbourhoods, Bell et al., CCS 2020):

1. ``setup``: make two X25519 key pairs (one to encrypt shares, one for pairwise masks) and a
   self-mask seed; publish both public keys and a commitment to the seed.
2. ``share_keys``: Shamir-share the mask key and the seed among the neighbours whose keys
   arrived, each share sealed for its holder.
3. ``masked_input``: open the shares received; upload the quantised update plus the self mask
   plus, for every neighbour that shared, +/- a pairwise mask (+ if our id is larger).
4. ``unmask``: for each neighbour the server calls a survivor, its seed share; for each one it
   calls dropped, its key share. Never both for one node, and only once per round.

The state is plain data (``to_dict``/``from_dict``) so a Flower client can keep it in
``context.state`` between messages.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
from numpy.typing import NDArray

from fedrec.secagg import crypto
from fedrec.secagg.params import SecAggConfig, SecAggError
from fedrec.secagg.quantize import Layout, flatten, layout_of, quantize

log = logging.getLogger(__name__)
STAGES = ("setup", "share_keys", "masked_input", "unmask")


@dataclass(frozen=True)
class ClientSetup:
    """What the server tells one client at the start of a round."""

    round_id: str
    node_id: int
    threshold: int
    neighbours: tuple[int, ...]  # this client's share holders, itself excluded
    config: SecAggConfig


@dataclass(frozen=True)
class KeyAdvert:
    """A client's public keys and its commitment to the self-mask seed."""

    enc_pk: bytes
    mask_pk: bytes
    seed_commitment: bytes


@dataclass(frozen=True)
class MaskedInput:
    layout: Layout  # names and shapes of the inputs, in the order they were flattened
    vector: NDArray[np.unsignedinteger]  # in Z_modulus, dtype SecAggConfig.word()


@dataclass(frozen=True)
class OpenedShares:
    """What ``open_shares`` agreed for one round: per neighbour that sent shares, the key of
    the pairwise mask. Kept in memory for the one message that trains and masks."""

    round_id: str
    pairwise: dict[int, bytes] = field(repr=False)


@dataclass(frozen=True)
class UnmaskRequest:
    survivors: tuple[int, ...]  # send their seed shares (this client included)
    dropped: tuple[int, ...]  # send their mask-key shares


@dataclass
class ClientState:
    stage: str = ""
    round_id: str = ""
    node_id: int = 0
    threshold: int = 0
    neighbours: list[int] = field(default_factory=list)
    clipping_range: float = 0.0
    quantization_range: int = 0
    modulus_bits: int = 0
    enc_sk: bytes = b""
    mask_sk: bytes = b""
    seed: bytes = b""
    peer_ids: list[int] = field(default_factory=list)  # neighbours whose keys arrived
    peer_mask_pk: list[bytes] = field(default_factory=list)
    peer_enc_pk: list[bytes] = field(default_factory=list)
    share_owners: list[int] = field(default_factory=list)  # whose shares this client holds
    seed_shares: list[bytes] = field(default_factory=list)
    key_shares: list[bytes] = field(default_factory=list)


class SecAggClient:
    """One client's protocol state; call the four stage methods in order."""

    def __init__(self, state: ClientState | None = None) -> None:
        self.state = state or ClientState()

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> SecAggClient:
        """Rebuild from ``to_dict``'s output; refuses unknown fields and wrong types."""
        state = ClientState()
        for key, value in data.items():
            default = getattr(state, key, None)
            if default is None or type(value) is not type(default):
                raise SecAggError(f"corrupt secure-aggregation state: field {key!r}")
            setattr(state, key, list(value) if isinstance(value, list) else value)
        return cls(state)

    def to_dict(self) -> dict[str, object]:
        return asdict(self.state)

    @property
    def config(self) -> SecAggConfig:
        s = self.state
        return SecAggConfig(
            clipping_range=s.clipping_range,
            quantization_range=s.quantization_range,
            modulus=2**s.modulus_bits,
            threshold=s.threshold,
        )

    def _advance(self, stage: str) -> None:
        expected = (
            STAGES[STAGES.index(self.state.stage) + 1] if self.state.stage in STAGES[:-1] else None
        )
        if stage != "setup" and stage != expected:
            raise SecAggError(
                f"node {self.state.node_id}: stage '{stage}' out of order "
                f"(last completed: '{self.state.stage or 'none'}')"
            )
        self.state.stage = stage

    def setup(self, setup: ClientSetup) -> KeyAdvert:
        if self.state.stage not in ("", "unmask"):
            log.warning("node %d: a new round starts before the last one ended", setup.node_id)
        if setup.node_id in setup.neighbours or setup.threshold > len(setup.neighbours) + 1:
            raise SecAggError(f"node {setup.node_id}: inconsistent setup {setup}")
        cfg = setup.config
        self.state = ClientState(
            round_id=setup.round_id,
            node_id=setup.node_id,
            threshold=setup.threshold,
            neighbours=sorted(setup.neighbours),
            clipping_range=cfg.clipping_range,
            quantization_range=cfg.quantization_range,
            modulus_bits=cfg.modulus.bit_length() - 1,
            enc_sk=crypto.new_secret(),
            mask_sk=crypto.new_secret(),
            seed=crypto.new_secret(),
        )
        self._advance("setup")
        s = self.state
        return KeyAdvert(
            crypto.public_key(s.enc_sk),
            crypto.public_key(s.mask_sk),
            crypto.commit(s.seed, s.round_id),
        )

    def share_keys(self, adverts: Mapping[int, KeyAdvert]) -> dict[int, bytes]:
        """Sealed shares per holder; ``adverts`` are the neighbours' (and own) public keys."""
        self._advance("share_keys")
        s = self.state
        own = adverts.get(s.node_id)
        if (
            own is None
            or own.mask_pk != crypto.public_key(s.mask_sk)
            or own.enc_pk != crypto.public_key(s.enc_sk)
        ):
            raise SecAggError(f"node {s.node_id}: the server relayed wrong keys for this node")
        peers = sorted(v for v in adverts if v != s.node_id)
        if not set(peers) <= set(s.neighbours):
            raise SecAggError(
                f"node {s.node_id}: keys from non-neighbours {set(peers) - set(s.neighbours)}"
            )
        keys = [k for v in adverts.values() for k in (v.enc_pk, v.mask_pk)]
        if len(set(keys)) != len(keys):
            raise SecAggError(f"node {s.node_id}: two relayed public keys are identical")
        self._require(len(peers) + 1, "neighbours advertised keys")
        s.peer_ids = peers
        s.peer_enc_pk = [adverts[v].enc_pk for v in peers]
        s.peer_mask_pk = [adverts[v].mask_pk for v in peers]
        holders = sorted([*s.neighbours, s.node_id])  # share i + 1 belongs to holders[i]
        seed_shares = crypto.split(s.seed, s.threshold, len(holders))
        key_shares = crypto.split(s.mask_sk, s.threshold, len(holders))
        mine = holders.index(s.node_id)
        s.share_owners, s.seed_shares, s.key_shares = (
            [s.node_id],
            [seed_shares[mine]],
            [key_shares[mine]],
        )
        out = {}
        for v, enc_pk in zip(peers, s.peer_enc_pk, strict=True):
            key = crypto.agree(s.enc_sk, enc_pk, purpose="shares", round_id=s.round_id)
            i = holders.index(v)
            out[v] = crypto.seal(key, s.node_id, v, s.round_id, seed_shares[i], key_shares[i])
        return out

    def masked_input(
        self,
        sealed: Mapping[int, bytes],
        vectors: Mapping[str, NDArray],
        rng: np.random.Generator | None = None,
    ) -> MaskedInput:
        """Open the shares sent to this client, then mask the update ``vectors``
        (``open_shares`` then ``mask``; a ClientApp trains between the two)."""
        return self.mask(self.open_shares(sealed), vectors, rng)

    def open_shares(self, sealed: Mapping[int, bytes]) -> OpenedShares:
        """Check and open the shares sent to this client, and agree the pairwise mask keys.

        Everything in this stage that a peer's bad share or key can make fail happens here, so
        a client checks it before it trains: a round that cannot be masked spends no budget.
        """
        self._advance("masked_input")
        s = self.state
        unknown = set(sealed) - set(s.peer_ids)
        if unknown:
            raise SecAggError(f"node {s.node_id}: shares from nodes without keys {sorted(unknown)}")
        self._require(len(sealed) + 1, "neighbours sent shares")
        for src in sorted(sealed):
            enc_pk = s.peer_enc_pk[s.peer_ids.index(src)]
            key = crypto.agree(s.enc_sk, enc_pk, purpose="shares", round_id=s.round_id)
            seed_share, key_share = crypto.open_sealed(key, src, s.node_id, s.round_id, sealed[src])
            s.share_owners.append(src)
            s.seed_shares.append(seed_share)
            s.key_shares.append(key_share)
        pairwise = {
            v: pairwise_key(s.mask_sk, s.peer_mask_pk[s.peer_ids.index(v)], s.round_id)
            for v in sorted(sealed)
        }
        return OpenedShares(s.round_id, pairwise)

    def mask(
        self,
        opened: OpenedShares,
        vectors: Mapping[str, NDArray],
        rng: np.random.Generator | None = None,
    ) -> MaskedInput:
        """Mask the update ``vectors`` with the keys ``open_shares`` agreed.

        ``vectors`` must already be clipped and noised for DP: what leaves here is a
        post-processing of them.
        """
        s = self.state
        if s.stage != "masked_input" or opened.round_id != s.round_id or not s.seed:
            raise SecAggError(f"node {s.node_id}: mask needs this round's open_shares first")
        cfg = self.config
        flat = flatten(vectors)
        y = quantize(flat, cfg, rng or np.random.default_rng())
        y += crypto.mask(s.seed, flat.size, cfg.modulus, purpose=f"self/{s.round_id}")
        for v, key in sorted(opened.pairwise.items()):
            p = crypto.mask(key, flat.size, cfg.modulus, purpose="pairwise")
            y = y + p if s.node_id > v else y - p  # wraps mod the word, a multiple of M
        y &= cfg.word()(cfg.modulus - 1)
        return MaskedInput(layout_of(vectors), y)

    def unmask(self, request: UnmaskRequest) -> dict[int, bytes]:
        """Shares the server needs: seed shares of survivors, key shares of dropped nodes."""
        self._advance("unmask")
        s = self.state
        alive, dead = set(request.survivors), set(request.dropped)
        if alive & dead:
            raise SecAggError(
                f"node {s.node_id}: nodes {sorted(alive & dead)} both alive and dropped"
            )
        if s.node_id not in alive:
            raise SecAggError(f"node {s.node_id}: asked to unmask but not listed as a survivor")
        if not (alive | dead) <= set(s.share_owners):
            raise SecAggError(
                f"node {s.node_id}: holds no shares of {sorted((alive | dead) - set(s.share_owners))}"
            )
        self._require(len(alive), "survivors")
        out = {v: s.seed_shares[s.share_owners.index(v)] for v in sorted(alive)}
        out |= {v: s.key_shares[s.share_owners.index(v)] for v in sorted(dead)}
        s.enc_sk = s.mask_sk = s.seed = b""  # the round is over: forget secrets and shares
        s.seed_shares, s.key_shares = [], []
        return out

    def _require(self, count: int, what: str) -> None:
        if count < self.state.threshold:
            raise SecAggError(
                f"node {self.state.node_id}: only {count} {what} (itself included); "
                f"threshold is {self.state.threshold}"
            )


def pairwise_key(secret: bytes, peer_pk: bytes, round_id: str) -> bytes:
    """The key of the mask two clients share: their X25519 agreement, bound to the round."""
    return crypto.agree(secret, peer_pk, purpose="mask", round_id=round_id)


def pairwise_mask(
    secret: bytes, peer_pk: bytes, round_id: str, size: int, modulus: int
) -> NDArray[np.unsignedinteger]:
    """The mask two clients share, expanded from ``pairwise_key``."""
    return crypto.mask(pairwise_key(secret, peer_pk, round_id), size, modulus, purpose="pairwise")
