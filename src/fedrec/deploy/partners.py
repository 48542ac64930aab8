"""Partners' SuperNode authentication keys: EC on a NIST curve, in OpenSSH format.

That is what Flower 1.42 loads: ``flwr supernode register`` takes the OpenSSH public key,
``flower-supernode --auth-supernode-private-key`` the OpenSSH private key. Each partner gets a
number in the manifest (its ``partition-id`` at run time: seeds and ledger name) and an OpenSSH
``SHA256:`` fingerprint that ``ssh-keygen -lf`` reproduces.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import re
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedrec.deploy.certdir import (
    PRIVATE,
    PUBLIC,
    CertDir,
    iso,
    read_manifest,
    save_manifest,
    write_json,
    write_new,
)
from fedrec.deploy.errors import DeployError

CURVE = ec.SECP384R1  # a NIST curve, as Flower's SuperNode authentication requires
NIST_CURVES = ("secp256r1", "secp384r1", "secp521r1")  # P-256/384/521; flwr also takes 192/224
USERS = "users"  # the manifest key of a partner's registered user count
REMOVED = "removed"  # the manifest key of when a partner was removed (fedrec certs remove-partner)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")


def partner_names(spec: str) -> list[str]:
    """``"3"`` -> partner-1..partner-3; ``"acme,globex"`` -> those names (checked)."""
    spec = spec.strip()
    if spec.isdigit():
        return [f"partner-{i}" for i in range(1, int(spec) + 1)]
    names = [n.strip() for n in spec.split(",") if n.strip()]
    for name in names:
        check_name(name)
    if len(set(names)) != len(names):
        raise DeployError(f"--partners {spec!r}: a name is repeated; give each partner once")
    return names


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise DeployError(
            f"partner name {name!r}: use 1-63 letters, digits, '-' or '_', starting with a "
            "letter or digit"
        )
    return name


def add_partner(
    directory: str | Path,
    name: str,
    *,
    public_key: str | Path | None = None,
    users: int | None = None,
    now: dt.datetime | None = None,
) -> dict[str, Any]:
    """Add a partner: a new key pair, or only ``public_key`` if the partner made its own.
    ``users``: the users its data holds, as the platform knows them (``set_users``)."""
    d = CertDir(Path(directory))
    manifest = read_manifest(d.path)
    check_name(name)
    if users is not None:
        check_users(users)
    if name in manifest["partners"] or d.partner_pub(name).exists():
        raise DeployError(f"partner {name!r} already exists in {d.path}; choose another name")
    d.partner_pub(name).parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(CURVE()) if public_key is None else None
    pub = _ssh_public(key.public_key()) if key else _read_ssh_public(Path(public_key))
    # one key, one partner: the SuperLink knows a node by its key, and the registered user
    # counts are keyed by its fingerprint (a removed partner's key stays taken)
    for other, e in manifest["partners"].items():
        if e.get("fingerprint") == ssh_fingerprint(pub):
            raise DeployError(f"this public key is already partner {other!r}'s; every "
                              "partner needs its own key pair")  # fmt: skip
    if key is not None:
        write_new(d.partner_key(name), _ssh_private(key), PRIVATE)
    write_new(d.partner_pub(name), pub, PUBLIC)
    ids = [int(p.get("id", -1)) for p in manifest["partners"].values()]
    entry = {
        "id": max(ids, default=-1) + 1,  # the site's number in the federation (seeds, ledger)
        "public_key": f"partners/{name}.pub",
        "private_key": f"partners/{name}.key" if public_key is None else None,
        "fingerprint": ssh_fingerprint(pub),
        "added": iso(now or dt.datetime.now(dt.UTC)),
    }
    if users is not None:
        entry[USERS] = users
    manifest["partners"][name] = entry
    save_manifest(d, manifest)
    return entry


def remove_partner(
    directory: str | Path, name: str, *, now: dt.datetime | None = None
) -> dict[str, Any]:
    """Mark partner ``name`` removed: ``fedrec server start`` and ``server register`` no longer
    register its key, and its registered user count no longer applies. Its entry and key files
    stay (its id and fingerprint are what its ledger lines and the SuperLink's logs name), and
    neither its name nor its key can be added again."""
    d = CertDir(Path(directory))
    manifest = read_manifest(d.path)
    entry = manifest["partners"].get(name)
    if entry is None:
        raise DeployError(f"partner {name!r} is not in {d.manifest}")
    if entry.get(REMOVED):
        raise DeployError(f"partner {name!r} was removed already ({entry[REMOVED]})")
    entry[REMOVED] = iso(now or dt.datetime.now(dt.UTC))
    save_manifest(d, manifest)
    return entry


def active_partners(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The manifest's partners that were not removed."""
    return {n: e for n, e in manifest["partners"].items() if not e.get(REMOVED)}


def set_users(directory: str | Path, name: str, users: int | None) -> dict[str, Any]:
    """Register (or, with None, forget) the number of users partner ``name``'s data holds.

    The server caps the FedAvg weight a partner's replies state at this count
    (``fedrec.deploy.registry``): a site cannot buy more say in the average than the users
    the platform knows it has. Runs started afterwards read it; a running one does not."""
    d = CertDir(Path(directory))
    manifest = read_manifest(d.path)
    if name not in manifest["partners"]:
        raise DeployError(f"partner {name!r} is not in {d.manifest}; add it with add-partner")
    entry = manifest["partners"][name]
    if users is None:
        entry.pop(USERS, None)
    else:
        entry[USERS] = check_users(users)
    save_manifest(d, manifest)
    return entry


def check_users(users: object) -> int:
    if isinstance(users, bool) or not isinstance(users, int) or users < 1:
        raise DeployError(f"users {users!r}: give the partner's number of users, at least 1")
    return users


def export_partner(directory: str | Path, name: str, out: str | Path) -> Path:
    """Write the kit the platform sends partner ``name``: CA certificate, its key pair (only the
    public key for a partner that made its own), and its manifest entry without the user count
    the platform registered (the platform's own figure: ``set_users``)."""
    src, dst = CertDir(Path(directory)), CertDir(Path(out))
    manifest = read_manifest(src.path)
    if name not in manifest["partners"]:
        raise DeployError(f"partner {name!r} is not in {src.manifest}; add it with add-partner")
    entry = {k: v for k, v in manifest["partners"][name].items() if k != USERS}
    own_key = entry.get("private_key") is None  # the partner made its key and keeps it
    if not own_key and not src.partner_key(name).is_file():
        raise DeployError(f"{src.partner_key(name)}: the partner's private key is missing")
    dst.partner_pub(name).parent.mkdir(parents=True, exist_ok=True)
    write_new(dst.ca_cert, src.ca_cert.read_bytes(), PUBLIC)
    if not own_key:
        write_new(dst.partner_key(name), src.partner_key(name).read_bytes(), PRIVATE)
    write_new(dst.partner_pub(name), src.partner_pub(name).read_bytes(), PUBLIC)
    kit = {k: manifest[k] for k in ("format", "created", "ca")}
    write_json(dst.manifest, kit | {"partners": {name: entry}}, PUBLIC)
    return dst.path


def ssh_fingerprint(public_line: bytes) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint of a public key line (as ``ssh-keygen -l`` prints)."""
    try:
        blob = base64.b64decode(public_line.split()[1], validate=True)
    except (IndexError, ValueError) as err:
        raise DeployError("not an OpenSSH public key line") from err
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _ssh_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )


def _ssh_public(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def _read_ssh_public(path: Path) -> bytes:
    """A partner's own public key, checked as flwr checks it (EC on a NIST curve, OpenSSH)."""
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except (OSError, ValueError) as err:
        raise DeployError(f"{path}: not a readable OpenSSH public key ({err})") from err
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in NIST_CURVES:
        raise DeployError(f"{path}: Flower needs an EC key on a NIST curve (e.g. P-384)")
    return _ssh_public(key)
