"""Start-up checks: a bad certificate, key, data file or address is a one-line error, not a hang.

Files are checked with the same loaders Flower uses (``load_ssh_private_key`` for a SuperNode's
key, PEM for TLS); the SuperLink is probed with a bounded TCP connect and TLS handshake that
verifies its certificate against the federation's CA, as the SuperNode will.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedrec.deploy.certdir import CertDir, read_manifest
from fedrec.deploy.errors import DeployError
from fedrec.deploy.partners import NIST_CURVES, ssh_fingerprint

log = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 5.0
EXPIRY_WARNING = dt.timedelta(days=14)


def load_certificate(path: Path, *, now: dt.datetime | None = None) -> x509.Certificate:
    """A PEM certificate that is valid now; anything else raises :class:`DeployError`."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise DeployError(f"{path}: certificate not found; check --certs") from None
    except (OSError, ValueError) as err:
        raise DeployError(f"{path}: not a readable PEM certificate ({err})") from err
    now = now or dt.datetime.now(dt.UTC)
    if now < cert.not_valid_before_utc:
        raise DeployError(
            f"{path}: not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} "
            "UTC; check this machine's clock"
        )
    if now > cert.not_valid_after_utc:
        raise DeployError(
            f"{path}: expired on {cert.not_valid_after_utc:%Y-%m-%d} UTC; create "
            "new certificates with 'fedrec certs init' and send partners the new CA"
        )
    if cert.not_valid_after_utc - now < EXPIRY_WARNING:
        log.warning("%s expires on %s UTC", path, f"{cert.not_valid_after_utc:%Y-%m-%d}")
    return cert


def check_server_files(certs: CertDir, *, now: dt.datetime | None = None) -> None:
    """CA and SuperLink certificate valid, chained, naming 127.0.0.1; key matching the certificate."""
    ca = load_certificate(certs.ca_cert, now=now)
    cert = load_certificate(certs.server_cert, now=now)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise DeployError(
            f"{certs.server_cert} is not signed by {certs.ca_cert}; use the "
            "files of one 'fedrec certs init' directory"
        ) from None
    try:
        key = serialization.load_pem_private_key(certs.server_key.read_bytes(), None)
    except FileNotFoundError:
        raise DeployError(f"{certs.server_key}: private key not found; check --certs") from None
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise DeployError(f"{certs.server_key}: not a readable PEM private key ({err})") from err
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise DeployError(f"{certs.server_key} does not match {certs.server_cert}")
    if "127.0.0.1" not in _san_strings(cert):
        raise DeployError(
            f"{certs.server_cert}: no IP 127.0.0.1 in its names (the SuperLink's "
            "own processes connect through it); recreate it with fedrec certs init"
        )


def check_partner_files(certs: CertDir, partner: str, *, now: dt.datetime | None = None) -> None:
    """The CA certificate is valid and the partner's key loads as Flower loads it and is theirs."""
    load_certificate(certs.ca_cert, now=now)
    path = certs.partner_key(partner)
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), None)
    except FileNotFoundError:
        raise DeployError(
            f"{path}: no key for partner {partner!r}; check --partner and --certs"
        ) from None
    except (OSError, ValueError, UnsupportedAlgorithm) as err:
        raise DeployError(f"{path}: not an OpenSSH private key Flower can load ({err})") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in NIST_CURVES:
        raise DeployError(f"{path}: Flower needs an EC key on a NIST curve (e.g. P-384)")
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    expected = _expected_fingerprint(certs, partner)
    if expected is not None and ssh_fingerprint(public) != expected:
        raise DeployError(
            f"{path} does not match the key registered for {partner!r} "
            f"({expected}); use the key the platform sent you"
        )


def check_data(path: Path) -> Path:
    """The partner's data: present, readable, and a dataset fedrec can load."""
    from fedrec.data import DataError, load_dataset

    if not path.exists():
        raise DeployError(f"--data {path}: no such file or folder")
    if not os.access(path, os.R_OK) or (path.is_dir() and not os.access(path, os.X_OK)):
        raise DeployError(f"--data {path}: not readable by this user; fix its permissions")
    try:  # resolved: a folder named like a dataset ("synthetic", "ml-100k") is still a folder
        load_dataset(str(path.resolve()))
    except (DataError, OSError) as err:
        raise DeployError(f"--data {path}: {err}") from err
    return path.resolve()


def probe_superlink(
    host: str, port: int, *, ca_cert: Path | None, timeout: float = PROBE_TIMEOUT_S
) -> None:
    """Connect within ``timeout``; with ``ca_cert``, complete a verified TLS handshake too."""
    where = f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror as err:
        raise DeployError(f"SuperLink {where}: cannot resolve {host!r} ({err.strerror})") from err
    except ConnectionRefusedError:
        raise DeployError(
            f"SuperLink {where}: connection refused; is 'fedrec server start' running there?"
        ) from None
    except TimeoutError:
        raise DeployError(
            f"SuperLink {where}: no answer within {timeout:.0f} s; check the address and firewalls"
        ) from None
    except OSError as err:
        raise DeployError(f"SuperLink {where}: cannot connect ({err.strerror or err})") from err
    with sock:
        if ca_cert is not None:
            _handshake(sock, host, where, ca_cert, timeout)
        elif _speaks_tls(sock, host, timeout):
            raise DeployError(
                f"SuperLink {where} uses TLS; drop --insecure and pass --certs and --partner"
            )


def check_port_free(host: str, port: int) -> None:
    """Refuse to start a SuperLink on a port something else already holds."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        # as the SuperLink's own server binds: a port left in TIME_WAIT by a stopped one is free
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            raise DeployError(
                f"cannot listen on {host}:{port} ({err.strerror}); choose another "
                "--address or stop what holds it"
            ) from err


def _handshake(sock: socket.socket, host: str, where: str, ca_cert: Path, timeout: float) -> None:
    try:
        context = ssl.create_default_context(cafile=str(ca_cert))
    except (OSError, ssl.SSLError) as err:  # missing, unreadable or not PEM
        raise DeployError(f"{ca_cert}: not a CA certificate this machine can load ({err})") from err
    sock.settimeout(timeout)
    try:
        with context.wrap_socket(sock, server_hostname=host):
            pass
    except ssl.SSLCertVerificationError as err:
        raise DeployError(
            f"SuperLink {where}: its certificate is not trusted with {ca_cert} "
            f"({err.verify_message}); check --superlink and the CA file"
        ) from err
    except ssl.SSLError as err:
        raise DeployError(
            f"SuperLink {where}: TLS failed ({err.reason}); is it running with --insecure?"
        ) from err
    except TimeoutError:
        raise DeployError(f"SuperLink {where}: no TLS answer within {timeout:.0f} s") from None
    except OSError as err:  # e.g. the connection reset during the handshake
        raise DeployError(f"SuperLink {where}: TLS handshake failed ({err})") from err


def _speaks_tls(sock: socket.socket, host: str, timeout: float) -> bool:
    """Whether the server completes a TLS handshake (certificate not checked: only asking)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    sock.settimeout(timeout)
    try:
        with context.wrap_socket(sock, server_hostname=host):
            return True
    except (ssl.SSLError, OSError):
        return False


def _expected_fingerprint(certs: CertDir, partner: str) -> str | None:
    """The registered fingerprint: from the manifest, else from the partner's .pub file."""
    if certs.manifest.is_file():
        partners = read_manifest(certs.path)["partners"]
        if partner not in partners:
            raise DeployError(
                f"partner {partner!r} is not in {certs.manifest}; known: "
                f"{', '.join(sorted(partners)) or 'none'}"
            )
        return str(partners[partner]["fingerprint"])
    pub = certs.partner_pub(partner)
    return ssh_fingerprint(pub.read_bytes()) if pub.is_file() else None


def _spki(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _san_strings(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(v) for v in san.get_values_for_type(x509.IPAddress)} | set(
        san.get_values_for_type(x509.DNSName)
    )
