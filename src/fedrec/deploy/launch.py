"""The commands ``fedrec server`` and ``fedrec client`` run, built as plain lists (pure functions).

Flower 1.42 serves its Fleet, Control and Runtime APIs on one SuperLink port over HTTPS;
SuperNodes authenticate with a registered EC key; the ``flwr`` CLI reaches the SuperLink through
a named connection in ``$FLWR_HOME/config.toml``. Every child gets runtime dependency installation
and telemetry turned off, and the venv's ``bin`` first on ``PATH`` (the SuperLink starts
``flower-superexec`` by name).
"""

from __future__ import annotations

import ipaddress
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedrec.config import FedrecConfig
from fedrec.deploy.certdir import CertDir
from fedrec.deploy.errors import DeployError

CONNECTION = "fedrec"  # the flwr CLI's name for our SuperLink
DEFAULT_ADDRESS = "127.0.0.1:9092"
DEFAULT_RUNTIME_PORT = 9094  # a SuperNode's own local API; one per node on a host
APP_NAME = "fedrecapp"
RUN_CONFIG_KEY = "fedrec-config"  # read by fedrec.server.app.config_from_run_config
RESUME_KEY = "fedrec-resume"  # fedrec.server.app: the run directory to continue ("" = a new run)
PARTNERS_KEY = "fedrec-partners"  # fedrec.server.app: the certs directory with registered counts
CHILD_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # else `uv sync` installs packages
    "FLWR_TELEMETRY_ENABLED": "0",
    "PYTHONUNBUFFERED": "1",  # the launchers read Flower's output as it comes
}
CHILD_ENV_DEFAULTS = {  # unless the operator set them
    # the SuperExec of a SuperNode (and of the SuperLink) looks for a task to run every second
    # by default, and every stage of secure aggregation waited for it: a local call to the
    # node's own runtime API
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
}
_WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")


def bin_dir() -> Path:
    """The directory of this interpreter's scripts (flower-superlink, flwr, ...)."""
    return Path(sys.executable).parent


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) -> (host, port), with a one-line error."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DeployError(f"address {text!r}: use HOST:PORT, e.g. {DEFAULT_ADDRESS}")
    return host.strip("[]"), int(port)


def local_address(host: str, port: int) -> str:
    """Where processes on the SuperLink's own machine reach it (its certificate names 127.0.0.1)."""
    if host in _WILDCARD_HOSTS:
        return f"127.0.0.1:{port}"
    return f"[{host}]:{port}" if _is_v6(host) else f"{host}:{port}"


def child_env(
    base: Mapping[str, str], *, flwr_home: Path | None, bins: Path, guard: Path | None = None
) -> dict[str, str]:
    """``base`` plus Flower's switches, ``FLWR_HOME`` and ``bins`` first on ``PATH``; with
    ``guard`` (a folder of fedrec.deploy.guard's scripts), that folder before ``bins``."""
    env = CHILD_ENV_DEFAULTS | dict(base) | CHILD_ENV
    first = f"{guard}:{bins}" if guard is not None else str(bins)
    env["PATH"] = f"{first}:{base['PATH']}" if base.get("PATH") else first
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def superlink_command(
    bins: Path, *, host: str, port: int, certs: CertDir | None, database: str | None = None
) -> list[str]:
    """flower-superlink with TLS and SuperNode authentication, or ``--insecure`` (certs None)."""
    cmd = [str(bins / "flower-superlink"), "--host", host, "--port", str(port)]
    if certs is None:
        cmd.append("--insecure")
    else:
        cmd += [
            "--ssl-ca-certfile",
            str(certs.ca_cert),
            "--ssl-certfile",
            str(certs.server_cert),
            "--ssl-keyfile",
            str(certs.server_key),
            "--enable-supernode-auth",
        ]
    if database is not None:
        cmd += ["--database", database]
    return [*cmd, "--disable-runtime-dependency-installation"]


def supernode_command(
    bins: Path,
    *,
    superlink: str,
    certs: CertDir | None,
    partner: str | None,
    node_config: Mapping[str, str | int],
    runtime_port: int = DEFAULT_RUNTIME_PORT,
) -> list[str]:
    """flower-supernode trusting the CA and signing with the partner's key, or ``--insecure``."""
    cmd = [str(bins / "flower-supernode"), "--superlink", superlink]
    if certs is None:
        cmd.append("--insecure")
    else:
        if partner is None:
            raise DeployError("a SuperNode with TLS needs --partner (whose key to sign with)")
        cmd += [
            "--root-certificates",
            str(certs.ca_cert),
            "--auth-supernode-private-key",
            str(certs.partner_key(partner)),
        ]
    return [
        *cmd,
        "--port",
        str(runtime_port),
        "--node-config",
        node_config_arg(node_config),
    ]


def node_config_arg(values: Mapping[str, str | int]) -> str:
    """``key='text' key=3``: Flower parses each value as TOML; strings are literal (no escapes)."""
    parts = []
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise DeployError(f"node config {key!r}: only text and integers are passed")
        if isinstance(value, str) and any(c in value for c in "'\"\n"):
            raise DeployError(f"node config {key}={value!r}: quotes and newlines are not allowed")
        parts.append(f"{key}='{value}'" if isinstance(value, str) else f"{key}={value}")
    return " ".join(parts)


def client_node_config(data: Path, *, client_id: int, ledger: Path | None) -> dict[str, str | int]:
    """What the ClientApp reads from ``context.node_config`` on a partner's machine: its data
    (all of it is this site's), its number (Flower's 'partition-id' key; seeds and ledger name)."""
    config: dict[str, str | int] = {"data-path": str(data), "partition-id": client_id}
    if ledger is not None:
        config["ledger-path"] = str(ledger)
    return config


def flower_config(
    existing: Mapping[str, Any], *, address: str, ca_cert: Path | None
) -> dict[str, Any]:
    """``existing`` Flower CLI config with our connection set (and default if none is)."""
    config = {k: dict(v) if isinstance(v, Mapping) else v for k, v in existing.items()}
    links = dict(config.get("superlink", {}))
    conn: dict[str, Any] = {"address": address}
    if ca_cert is None:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str(ca_cert)
    links[CONNECTION] = conn
    links.setdefault("default", CONNECTION)
    config["superlink"] = links
    return config


def register_command(bins: Path, public_key: Path, name: str) -> list[str]:
    return [
        str(bins / "flwr"),
        "supernode",
        "register",
        str(public_key),
        CONNECTION,
        "--name",
        name,
        "--format",
        "json",
    ]


def run_command(bins: Path, app_dir: Path) -> list[str]:
    return [str(bins / "flwr"), "run", str(app_dir), CONNECTION, "--format", "json"]


def list_command(bins: Path, run_id: int) -> list[str]:
    return [str(bins / "flwr"), "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"]


def stop_command(bins: Path, run_id: int) -> list[str]:
    return [str(bins / "flwr"), "stop", str(run_id), CONNECTION, "--format", "json"]


def app_pyproject(
    cfg: FedrecConfig, *, resume: Path | None = None, partners: Path | None = None
) -> dict[str, Any]:
    """The pyproject of the app ``flwr run`` ships: fedrec's apps by reference, the config inline.

    The bundle carries no code and no data: fedrec is installed at every site, and each client
    reads its data from its node config. Flower accepts only run-config keys the app declares,
    so the whole resolved config travels as one JSON string; ``resume`` (a run directory on the
    SuperLink's machine) makes the ServerApp continue that run from its last checkpoint;
    ``partners`` (the certificate directory there) gives it the partners' registered user
    counts, read on that machine: the counts are not in the bundle, which every site receives.
    """
    config = {
        "num-server-rounds": cfg.rounds,
        RUN_CONFIG_KEY: cfg.to_json(),
        RESUME_KEY: str(resume) if resume is not None else "",
        PARTNERS_KEY: str(partners) if partners is not None else "",
    }
    return {
        "project": {"name": APP_NAME, "version": "1.0.0", "dependencies": []},
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "fedrec",
                    "components": {
                        "serverapp": "fedrec.server.app:app",
                        "clientapp": "fedrec.client.app:app",
                    },
                    "config": config,
                }
            }
        },
    }


def parse_run_id(stdout: str) -> int:
    """The run id from ``flwr run --format json``."""
    try:
        data = json.loads(stdout[stdout.index("{") :])
        return int(data["run-id"])
    except (ValueError, KeyError, TypeError) as err:
        raise DeployError(f"flwr run did not start a run: {_one_line(stdout)}") from err


def parse_run_status(stdout: str) -> str:
    """The status (``running``, ``finished:completed``, ...) from ``flwr ls --format json``."""
    try:
        data = json.loads(stdout[stdout.index("{") :])
        return str(data["runs"][0]["status"])
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise DeployError(f"flwr ls gave no run status: {_one_line(stdout)}") from err


def _one_line(text: str, limit: int = 300) -> str:
    return " ".join(text.split())[:limit] or "(no output)"


def _is_v6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False
