"""The platform's side: start the SuperLink, register partners' keys, run fedrec on the federation.

Each step checks what it can before it launches anything (certificates, port, address) and turns
Flower's failures into one-line :class:`DeployError` messages.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from fedrec.config import FedrecConfig, with_contributors
from fedrec.deploy import launch
from fedrec.deploy.certdir import CertDir, read_manifest
from fedrec.deploy.checks import check_port_free, check_server_files, probe_superlink
from fedrec.deploy.errors import DeployError
from fedrec.deploy.partners import active_partners
from fedrec.deploy.process import Child, failure_reason, port_open
from fedrec.deploy.registry import load_registry

START_TIMEOUT_S = 60.0  # SuperLink start-up (imports, TLS set-up) on a busy machine
CLI_TIMEOUT_S = 60.0  # one flwr CLI call
POLL_S = 5.0
ALREADY_REGISTERED = "Public key already in use"


@dataclass(frozen=True)
class Site:
    """Where the platform's SuperLink listens and how local tools reach it."""

    host: str
    port: int
    certs: CertDir | None  # None: --insecure (local development only)
    flwr_home: Path

    @property
    def local(self) -> str:
        return launch.local_address(self.host, self.port)

    def env(self) -> dict[str, str]:
        return launch.child_env(os.environ, flwr_home=self.flwr_home, bins=launch.bin_dir())


def flwr_home(path: str | None) -> Path:
    """--flwr-home, else $FLWR_HOME, else Flower's default ~/.flwr."""
    return Path(path or os.environ.get("FLWR_HOME") or Path.home() / ".flwr").expanduser()


def start_superlink(site: Site, *, database: str | None = None, echo: bool = True) -> Child:
    """Check files and port, start flower-superlink and wait until it answers."""
    if site.certs is not None:
        check_server_files(site.certs)
    check_port_free(site.host, site.port)
    cmd = launch.superlink_command(
        launch.bin_dir(), host=site.host, port=site.port, certs=site.certs, database=database
    )
    child = Child(cmd, site.env(), echo=echo)
    host, port = launch.parse_address(site.local)
    try:
        child.wait_until(lambda: port_open(host, port), timeout=START_TIMEOUT_S, what="SuperLink")
    except DeployError:
        child.stop()
        raise
    write_connection(site)
    return child


def write_connection(site: Site) -> Path:
    """Add our SuperLink to the flwr CLI's config ($FLWR_HOME/config.toml), keeping the rest."""
    path = site.flwr_home / "config.toml"
    existing = tomllib.loads(path.read_text()) if path.is_file() else {}
    ca = site.certs.ca_cert.resolve() if site.certs is not None else None
    config = launch.flower_config(existing, address=site.local, ca_cert=ca)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(config))
    return path


def register_partners(site: Site, names: list[str] | None = None) -> dict[str, str]:
    """Register partners' public keys (all in the manifest by default): name -> node id."""
    if site.certs is None:
        raise DeployError(
            "--insecure SuperLinks do not authenticate SuperNodes; nothing to register"
        )
    manifest = read_manifest(site.certs.path)
    partners = active_partners(manifest)
    unknown = sorted(set(names or []) - set(manifest["partners"]))
    if unknown:
        raise DeployError(f"partner {unknown[0]!r} is not in {site.certs.manifest}")
    if removed := sorted(set(names or []) - set(partners)):
        raise DeployError(f"partner {removed[0]!r} was removed (fedrec certs remove-partner); "
                          "a partner coming back needs a new name and key pair")
    host, port = launch.parse_address(site.local)
    probe_superlink(host, port, ca_cert=site.certs.ca_cert)
    write_connection(site)
    return {n: _register(site, site.certs, n) for n in (names or sorted(partners))}


def _register(site: Site, certs: CertDir, name: str) -> str:
    cmd = launch.register_command(launch.bin_dir(), certs.partner_pub(name), name)
    out = _flwr(cmd, site)
    if out.returncode == 0:
        return str(json.loads(out.stdout[out.stdout.index("{") :]).get("node-id", "?"))
    if ALREADY_REGISTERED in out.stdout + out.stderr:
        return "already registered"
    raise DeployError(f"registering {name!r} failed: {failure_reason(out.stdout + out.stderr)}")


def submit_run(site: Site, cfg: FedrecConfig, *, resume: Path | None = None) -> int:
    """Start fedrec on the federation through ``flwr run``; return the run id. With ``resume``
    (an unfinished run directory on this machine) the ServerApp continues that run."""
    if cfg.register_users:
        raise DeployError(
            "register_users is for simulations; a deployed run takes its partners' user counts "
            "from the certificate manifest (fedrec certs set-users NAME N)"
        )
    cfg = deployed_config(cfg)
    host, port = launch.parse_address(site.local)
    probe_superlink(host, port, ca_cert=site.certs.ca_cert if site.certs else None)
    write_connection(site)
    with tempfile.TemporaryDirectory(prefix="fedrec-run-") as tmp:
        app = Path(tmp) / launch.APP_NAME
        app.mkdir()
        partners = site.certs.path.resolve() if site.certs is not None else None
        if partners is not None:
            load_registry(partners)  # a bad count stops here, not in the ServerApp
        pyproject = launch.app_pyproject(cfg, resume=resume, partners=partners)
        (app / "pyproject.toml").write_text(tomli_w.dumps(pyproject))
        out = _flwr(launch.run_command(launch.bin_dir(), app), site)
    if out.returncode != 0:
        raise DeployError(f"flwr run failed: {failure_reason(out.stdout + out.stderr)}")
    return launch.parse_run_id(out.stdout)


def deployed_config(cfg: FedrecConfig) -> FedrecConfig:
    """The config a deployed run is submitted with: under distributed noise, the default
    ``privacy.min_contributors`` (0) resolved to a majority of the clients each round samples,
    as ``fedrec simulate`` resolves it (every partner's client refuses 0, so unresolved the run
    would start and then fail each round at every site); ConfigError here, at start-up, when the
    partition cannot give that many, or as many as the config sets."""
    if not cfg.privacy.distributed:
        return cfg
    from fedrec.workload import build_workload

    return with_contributors(cfg, build_workload(cfg).partition.n_clients)


def run_status(site: Site, run_id: int) -> str | None:
    """The run's status (``running``, ``finished:stopped``, ...), None if the SuperLink does not
    know the run (e.g. it restarted without a database)."""
    out = _flwr(launch.list_command(launch.bin_dir(), run_id), site)
    if out.returncode != 0:
        return None
    try:
        return launch.parse_run_status(out.stdout)
    except DeployError:
        return None


def stop_run(site: Site, run_id: int) -> None:
    """``flwr stop``: the SuperLink ends the run and drops its undelivered messages."""
    out = _flwr(launch.stop_command(launch.bin_dir(), run_id), site)
    if out.returncode != 0:
        raise DeployError(f"flwr stop {run_id} failed: {failure_reason(out.stdout + out.stderr)}")


def wait_for_run(
    site: Site,
    run_id: int,
    *,
    timeout: float | None = None,
    on_status: Callable[[str], None] | None = None,
) -> str:
    """Poll the run's status until it finishes (or ``timeout``); return the final status."""
    deadline = None if timeout is None else time.monotonic() + timeout
    last = ""
    while deadline is None or time.monotonic() < deadline:
        out = _flwr(launch.list_command(launch.bin_dir(), run_id), site)
        status = launch.parse_run_status(out.stdout) if out.returncode == 0 else last
        if status != last and on_status is not None:
            on_status(status)
        last = status
        if status.startswith("finished"):
            return status
        time.sleep(POLL_S)
    raise DeployError(f"run {run_id} not finished after {timeout:.0f} s (status {last!r})")


def _flwr(cmd: list[str], site: Site) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            cmd,
            env=site.env(),
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        raise DeployError(
            f"'{' '.join(cmd[:3])}' gave no answer within {CLI_TIMEOUT_S:.0f} s"
        ) from err
