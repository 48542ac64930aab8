"""The partner's side: check everything locally, then start a SuperNode that trains on local data.

The data path reaches the ClientApp through the SuperNode's node config; it never enters the
app bundle or any message. So does ``--budget``, the site's lifetime epsilon over every run its
ledger records (client/privacy.py). A refused key or an untrusted server ends start-up with one
line. With ``guard`` (the default; ``--no-guard`` turns it off) the SuperNode runs fedrec's own
ClientApp as installed at the site, never code a run ships (fedrec.deploy.guard).
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedrec.deploy import launch
from fedrec.deploy.certdir import CertDir, read_manifest
from fedrec.deploy.checks import check_data, check_partner_files, probe_superlink
from fedrec.deploy.errors import DeployError
from fedrec.deploy.guard import check_importable, write_shims
from fedrec.deploy.process import Child

CONNECTED = "SuperNode ID:"  # what flower-supernode prints once the SuperLink accepted it
START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Partner:
    """One partner's SuperNode: whose key, which data, which SuperLink."""

    superlink: str
    data: Path
    certs: CertDir | None  # None: --insecure (local development only)
    name: str | None
    client_id: int | None = None  # None: the number the platform gave it (manifest), else 0
    ledger: Path | None = None
    runtime_port: int = launch.DEFAULT_RUNTIME_PORT
    flwr_home: Path | None = None
    budget: float | None = None  # lifetime epsilon over all runs; None: each run's epsilon
    budget_delta: float | None = None  # the largest delta a run may ask; None: the run's delta
    # run every task through fedrec.deploy.guard: the site runs only the fedrec installed on it
    guard: bool = True


def preflight(partner: Partner) -> Path:
    """Everything checkable before launching; returns the resolved data path."""
    host, port = launch.parse_address(partner.superlink)
    if partner.certs is not None:
        if partner.name is None:
            raise DeployError("--partner is required unless --insecure")
        check_partner_files(partner.certs, partner.name)
    if partner.client_id is not None and partner.client_id < 0:
        raise DeployError(f"--client-id {partner.client_id}: must be 0 or more")
    if partner.budget is not None and not (0 < partner.budget < math.inf):
        raise DeployError(f"--budget {partner.budget}: must be a finite epsilon > 0")
    if partner.budget_delta is not None:
        if partner.budget is None:
            raise DeployError("--budget-delta needs --budget: it is the delta of that budget")
        if not 0 < partner.budget_delta < 1:
            raise DeployError(f"--budget-delta {partner.budget_delta}: must be in (0, 1)")
    data = check_data(partner.data)
    if partner.ledger is not None and not os.access(partner.ledger.parent, os.W_OK):
        raise DeployError(f"--ledger {partner.ledger}: its folder is missing or not writable")
    probe_superlink(host, port, ca_cert=partner.certs.ca_cert if partner.certs else None)
    return data


def supernode_command(partner: Partner, data: Path) -> list[str]:
    config = launch.client_node_config(
        data,
        client_id=client_id(partner),
        ledger=partner.ledger.resolve() if partner.ledger is not None else None,
    )
    if partner.budget is not None:  # text: node config passes only text and integers
        config["budget-epsilon"] = repr(float(partner.budget))
    if partner.budget_delta is not None:
        config["budget-delta"] = repr(float(partner.budget_delta))
    return launch.supernode_command(
        launch.bin_dir(),
        superlink=partner.superlink,
        certs=partner.certs,
        partner=partner.name,
        node_config=config,
        runtime_port=partner.runtime_port,
    )


def client_id(partner: Partner) -> int:
    """This site's number: given, else assigned by the platform in the kit's manifest, else 0."""
    if partner.client_id is not None:
        return partner.client_id
    if partner.certs is None or partner.name is None or not partner.certs.manifest.is_file():
        return 0
    entry = read_manifest(partner.certs.path)["partners"].get(partner.name, {})
    return int(entry.get("id", 0))


def guard_dir(partner: Partner) -> Path:
    """The folder of scripts that put fedrec.deploy.guard in front of every task the SuperNode
    starts: in its Flower home, one per Python (two venvs' sites on one machine do not share
    it), written afresh at each start."""
    home = partner.flwr_home or Path(os.environ.get("FLWR_HOME", "~/.flwr")).expanduser()
    tag = hashlib.sha256(sys.executable.encode()).hexdigest()[:12]
    return write_shims(home / f"fedrec-guard-{tag}")


def check_guard_first(env: Mapping[str, str], guard: Path) -> None:
    """Refuse to start unless every task the SuperExec may start resolves to the guard's script
    on ``env``'s PATH (a ':' in the Flower home's path, for one, would split the guard's folder
    and let the unguarded executables be found first: failing open)."""
    from fedrec.deploy.guard import KINDS

    for name in KINDS.values():
        found = shutil.which(name, path=env.get("PATH", ""))
        if found is None or Path(found).resolve().parent != guard.resolve():
            raise DeployError(
                f"the guard would not run: '{name}' resolves to {found} on the SuperNode's PATH, "
                f"not to the guard's {guard} (a ':' in --flwr-home's path splits it); choose a "
                "Flower home without ':'"
            )


def start_supernode(partner: Partner, *, echo: bool = True) -> Child:
    """Check, launch, and wait until the SuperLink has accepted this node."""
    data = preflight(partner)
    if partner.guard and (problem := check_importable()):  # else every task would die unanswered
        raise DeployError(problem)
    guard = guard_dir(partner) if partner.guard else None
    env = launch.child_env(os.environ, flwr_home=partner.flwr_home, bins=launch.bin_dir(),
                           guard=guard)  # fmt: skip
    if guard is not None:
        check_guard_first(env, guard)
    child = Child(supernode_command(partner, data), env, echo=echo)
    try:
        child.wait_until(
            lambda: CONNECTED in child.output, timeout=START_TIMEOUT_S, what="SuperNode"
        )
    except DeployError:
        child.stop()
        raise
    return child
