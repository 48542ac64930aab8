"""The layout of a certificate directory and the only ways fedrec writes into it.

One directory holds everything the platform team creates (a partner's kit uses the same layout,
with only ``ca.pem``, its own key pair and its manifest entry)::

    ca.pem, ca.key            the federation's certificate authority (self-signed)
    server.pem, server.key    the SuperLink's TLS certificate, signed by the CA
    partners/NAME.key, .pub   one SuperNode authentication key pair per partner
    manifest.json             partners (number, fingerprint) and certificate fingerprints

Files are created with ``O_EXCL`` (never overwritten) and their final mode; only the manifest
is replaced, atomically.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedrec.deploy.errors import DeployError

MANIFEST_FORMAT = 1
PRIVATE = 0o600
PUBLIC = 0o644


@dataclass(frozen=True)
class CertDir:
    """Paths of the files in a certificate directory (a partner's kit uses the same layout)."""

    path: Path

    @property
    def ca_cert(self) -> Path:
        return self.path / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.path / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.path / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.path / "server.key"

    @property
    def manifest(self) -> Path:
        return self.path / "manifest.json"

    def partner_key(self, name: str) -> Path:
        return self.path / "partners" / f"{name}.key"

    def partner_pub(self, name: str) -> Path:
        return self.path / "partners" / f"{name}.pub"


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = CertDir(Path(directory)).manifest
    if not path.is_file():
        raise DeployError(f"{path}: no manifest; create the directory with 'fedrec certs init'")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DeployError(f"{path}: unreadable manifest ({err}); restore it from a backup") from err
    if manifest.get("format") != MANIFEST_FORMAT or "partners" not in manifest:
        raise DeployError(f"{path}: not a fedrec certificate manifest (format {MANIFEST_FORMAT})")
    return manifest


def save_manifest(d: CertDir, manifest: dict[str, Any]) -> None:
    """Replace the manifest atomically (it is the only file we ever rewrite)."""
    tmp = d.manifest.with_suffix(".json.tmp")
    tmp.unlink(missing_ok=True)
    write_json(tmp, manifest, PUBLIC)
    os.replace(tmp, d.manifest)


def write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode``; never overwrite (O_EXCL), so keys cannot be clobbered."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError as err:
        raise DeployError(f"{path} exists; refusing to overwrite it") from err
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, mode)  # the umask may have removed bits we want (0644)


def write_json(path: Path, data: dict[str, Any], mode: int) -> None:
    write_new(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode(), mode)


def iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
