"""Partners' registered user counts: what bounds the FedAvg weight a deployed site may state.

Flower's FedAvg averages the replies with the ``num-examples`` each one states, and the update
screen (``fedrec.strategies.screen``) can only bound a weight relative to the round's others:
two sites claiming 1000x their users still held about 40% of the average under that cap
(docs/fault-tolerance.md). A platform usually knows how many users each merchant has. It
registers the count with ``fedrec certs add-partner NAME --users N`` (or ``fedrec certs
set-users``) in the certificate manifest, beside the partner's key fingerprint.

The mapping from a reply to a partner rests on Flower's node authentication, not on anything
the site says: the ServerApp asks the SuperLink for its nodes (``grid.get_nodes()``), each with
the public key it was registered with, and matches that key's OpenSSH fingerprint against the
manifest. A reply stating more users than its partner's registered count is lowered to the
count. The registry stays on the platform's machine: the run config (which every site can
read) carries only the path of the certificate directory, never the counts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from fedrec.deploy.certdir import read_manifest
from fedrec.deploy.errors import DeployError
from fedrec.deploy.partners import USERS, active_partners, check_users, ssh_fingerprint

log = logging.getLogger(__name__)


@dataclass
class Registry:
    """Registered user counts by key fingerprint; ``node_users`` maps the grid's nodes to them."""

    users: Mapping[str, int]  # OpenSSH SHA256 fingerprint -> users
    names: Mapping[str, str] = field(default_factory=dict)  # fingerprint -> partner name
    _unmatched: set[int] = field(default_factory=set)  # nodes already logged as unregistered

    def node_users(self, nodes: Iterable[object]) -> dict[int, int]:
        """{node id: registered users} for the nodes (Flower ``NodeInfo``s) whose key has a
        count; a node without one is logged once and left to the relative cap."""
        out: dict[int, int] = {}
        for node in nodes:
            node_id = int(node.node_id)  # type: ignore[attr-defined]
            fingerprint = pem_fingerprint(bytes(node.public_key))  # type: ignore[attr-defined]
            if fingerprint in self.users:
                out[node_id] = self.users[fingerprint]
            elif node_id not in self._unmatched:
                self._unmatched.add(node_id)
                log.warning(
                    "node %d (key %s) has no registered user count: its FedAvg weight is bounded "
                    "only relative to the round's ('fedrec certs set-users')",
                    node_id, fingerprint or "unreadable",
                )
        return out


def load_registry(certs_dir: str | Path) -> Registry:
    """The counts registered in a certificate directory's manifest (DeployError if unreadable
    or a count is not a positive integer)."""
    partners = active_partners(read_manifest(certs_dir))
    users: dict[str, int] = {}
    names: dict[str, str] = {}
    for name, entry in partners.items():
        if USERS not in entry:
            continue
        if str(entry["fingerprint"]) in names:
            raise DeployError(f"{certs_dir}: partners {names[str(entry['fingerprint'])]!r} and "
                              f"{name!r} share one public key; each needs its own")
        try:
            users[str(entry["fingerprint"])] = check_users(entry[USERS])
        except DeployError as err:
            raise DeployError(f"{certs_dir}: partner {name!r}: {err}") from err
        names[str(entry["fingerprint"])] = name
    return Registry(users, names)


def pem_fingerprint(pem: bytes) -> str | None:
    """The OpenSSH fingerprint of a public key as the SuperLink stores it (PEM
    SubjectPublicKeyInfo: ``flwr.supercore.primitives.asymmetric.public_key_to_bytes``); None
    for anything else (a simulated node's random bytes)."""
    try:
        key = serialization.load_pem_public_key(pem)
        line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    except (ValueError, TypeError):  # not PEM, or a key type OpenSSH cannot encode
        return None
    return ssh_fingerprint(line)
