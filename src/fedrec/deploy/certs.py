"""The federation's certificate authority and the SuperLink's TLS certificate (``cryptography``).

``init_certs`` creates a certificate directory (layout in :mod:`fedrec.deploy.certdir`): a
self-signed CA and a server certificate it signs, with the names the SuperLink needs
(``localhost`` and ``IP:127.0.0.1``, which the SuperLink's own processes use, plus its public
names), then one key pair per partner (:mod:`fedrec.deploy.partners`). TLS (the SuperLink
proves who it is) and SuperNode authentication (each partner proves who it is) are separate:
the CA signs only the server certificate.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedrec.deploy.certdir import (
    MANIFEST_FORMAT,
    PRIVATE,
    PUBLIC,
    CertDir,
    iso,
    read_manifest,
    save_manifest,
    write_new,
)
from fedrec.deploy.errors import DeployError
from fedrec.deploy.partners import CURVE, add_partner

DEFAULT_DAYS = 365
CLOCK_SKEW = dt.timedelta(minutes=5)  # certificates start slightly in the past
LOCAL_NAMES = ("localhost", "127.0.0.1")  # the SuperLink's own processes connect through these


def init_certs(
    directory: str | Path,
    partners: Sequence[str],
    *,
    days: int = DEFAULT_DAYS,
    server_names: Sequence[str] = (),
    now: dt.datetime | None = None,
) -> dict[str, Any]:
    """Create the CA, the SuperLink certificate and each partner's key pair; return the manifest."""
    if days < 1:
        raise DeployError(f"--days {days}: certificates must be valid for at least 1 day")
    d = CertDir(Path(directory))
    for path in (d.ca_key, d.server_key, d.manifest):
        if path.exists():
            raise DeployError(f"{path} exists; refusing to overwrite keys (choose a new directory)")
    names = list(dict.fromkeys([*LOCAL_NAMES, *server_names]))
    for name in names:
        _san(name)
    now = now or dt.datetime.now(dt.UTC)
    d.path.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(CURVE())
    ca = _ca_certificate(ca_key, days, now)
    server_key = ec.generate_private_key(CURVE())
    server = _server_certificate(server_key, ca_key, ca, names, days, now)
    write_new(d.ca_key, _pem_key(ca_key), PRIVATE)
    write_new(d.ca_cert, ca.public_bytes(serialization.Encoding.PEM), PUBLIC)
    write_new(d.server_key, _pem_key(server_key), PRIVATE)
    write_new(d.server_cert, server.public_bytes(serialization.Encoding.PEM), PUBLIC)
    manifest = {
        "format": MANIFEST_FORMAT,
        "created": iso(now),
        "ca": _cert_entry(d.ca_cert, ca),
        "server": _cert_entry(d.server_cert, server) | {"names": names},
        "partners": {},
    }
    save_manifest(d, manifest)
    for partner in partners:
        add_partner(d.path, partner, now=now)
    return read_manifest(d.path)


def cert_fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex(":")


def _ca_certificate(key: ec.EllipticCurvePrivateKey, days: int, now: dt.datetime):
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedrec federation CA")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        _base(name, name, key.public_key(), days, now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), False)
    )
    return builder.sign(key, hashes.SHA384())


def _server_certificate(key, ca_key, ca: x509.Certificate, names, days, now):
    common = names[len(LOCAL_NAMES)] if len(names) > len(LOCAL_NAMES) else names[0]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        _base(subject, ca.subject, key.public_key(), days, now)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), False)
    )
    return builder.sign(ca_key, hashes.SHA384())


def _base(subject, issuer, public_key, days: int, now: dt.datetime) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _san(name: str) -> x509.GeneralName:
    """An IP address SAN for an address, a DNS SAN for a host name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    labels = name.rstrip(".").split(".")
    if not name or not all(
        re.match(r"^(\*|[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)$", lbl) for lbl in labels
    ):
        raise DeployError(f"--server-name {name!r}: not a host name or IP address")
    return x509.DNSName(name)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_entry(path: Path, cert: x509.Certificate) -> dict[str, str]:
    return {
        "certificate": path.name,
        "sha256": cert_fingerprint(cert),
        "not_after": iso(cert.not_valid_after_utc),
    }
