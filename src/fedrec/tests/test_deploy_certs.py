"""Certificates, keys and start-up checks of ``fedrec.deploy`` (issue 5, items 1 and 2).

Keys are loaded with the functions Flower itself uses; the chain is verified with
``cryptography``'s X.509 verifier; probes run against a local TLS server on a free port.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import ipaddress
import shutil
import socket
import ssl
import stat
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from fedrec.deploy import (
    CertDir,
    DeployError,
    add_partner,
    export_partner,
    init_certs,
    read_manifest,
)
from fedrec.deploy.checks import (
    check_data,
    check_partner_files,
    check_port_free,
    check_server_files,
    load_certificate,
    probe_superlink,
)
from fedrec.deploy.partners import partner_names

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> CertDir:
    d = tmp_path_factory.mktemp("certs") / "fed"
    init_certs(d, ["acme", "globex"], days=30, server_names=["fl.example.com", "10.0.0.7"], now=NOW)
    return CertDir(d)


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _verifier(certs: CertDir, when: dt.datetime):
    return PolicyBuilder().store(Store([_load(certs.ca_cert)])).time(when)


@pytest.mark.parametrize(
    "name",
    [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.DNSName("fl.example.com"),
        x509.IPAddress(ipaddress.ip_address("10.0.0.7")),
    ],
)
def test_server_certificate_chains_to_the_ca_for_each_name(certs, name):
    verifier = _verifier(certs, NOW + dt.timedelta(days=1)).build_server_verifier(name)
    chain = verifier.verify(_load(certs.server_cert), [])
    assert chain[-1] == _load(certs.ca_cert)


def test_server_certificate_does_not_cover_other_names(certs):
    verifier = _verifier(certs, NOW).build_server_verifier(x509.DNSName("evil.example.com"))
    with pytest.raises(VerificationError):
        verifier.verify(_load(certs.server_cert), [])


def test_certificates_expire_after_the_requested_days(certs):
    for path in (certs.ca_cert, certs.server_cert):
        assert _load(path).not_valid_after_utc == NOW + dt.timedelta(days=30)
    late = NOW + dt.timedelta(days=31)
    with pytest.raises(VerificationError):
        _verifier(certs, late).build_server_verifier(x509.DNSName("localhost")).verify(
            _load(certs.server_cert), []
        )
    with pytest.raises(DeployError, match="expired on 2030-01-31"):
        load_certificate(certs.server_cert, now=late)


def test_ca_is_a_ca_and_the_server_certificate_is_not(certs):
    ca = _load(certs.ca_cert).extensions.get_extension_for_class(x509.BasicConstraints).value
    leaf = _load(certs.server_cert).extensions.get_extension_for_class(x509.BasicConstraints)
    assert ca.ca and not leaf.value.ca


def test_partner_keys_load_with_flowers_own_loaders(certs):
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, uses_nist_ec_curve
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    for name in ("acme", "globex"):
        registered = try_load_public_key(certs.partner_pub(name))  # `flwr supernode register`
        args = argparse.Namespace(
            auth_supernode_private_key=str(certs.partner_key(name)),
            auth_supernode_public_key=None,
        )
        private, public = _try_setup_client_authentication(args)  # flower-supernode
        assert isinstance(private.curve, ec.SECP384R1) and uses_nist_ec_curve(public)
        assert public_key_to_bytes(public) == registered


def test_private_keys_are_0600_and_certificates_0644(certs):
    private = [
        certs.ca_key,
        certs.server_key,
        certs.partner_key("acme"),
        certs.partner_key("globex"),
    ]
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for path in (certs.ca_cert, certs.server_cert, certs.partner_pub("acme"), certs.manifest):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_manifest_lists_partners_with_openssh_fingerprints(certs):
    import json

    manifest = json.loads(certs.manifest.read_text())
    assert sorted(manifest["partners"]) == ["acme", "globex"]
    assert manifest["server"]["names"] == ["localhost", "127.0.0.1", "fl.example.com", "10.0.0.7"]
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen not installed")
    out = subprocess.run(
        ["ssh-keygen", "-lf", str(certs.partner_pub("acme"))],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert manifest["partners"]["acme"]["fingerprint"] == out.split()[1]


def _digest(d: CertDir) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in d.path.rglob("*.*")}


def test_existing_keys_are_never_overwritten(certs):
    before = _digest(certs)
    with pytest.raises(DeployError, match="refusing to overwrite"):
        init_certs(certs.path, ["acme"])
    with pytest.raises(DeployError, match="already exists"):
        add_partner(certs.path, "acme")
    assert _digest(certs) == before


def test_partner_names_from_a_count_or_a_list():
    assert partner_names("3") == ["partner-1", "partner-2", "partner-3"]
    assert partner_names("acme, globex") == ["acme", "globex"]
    for bad in ("a,a", "../etc", "-x", "a b"):
        with pytest.raises(DeployError):
            partner_names(bad)


def test_bad_server_name_fails_before_anything_is_written(tmp_path):
    with pytest.raises(DeployError, match="not a host name"):
        init_certs(tmp_path / "c", [], server_names=["bad name"])
    assert not (tmp_path / "c").exists()


def _own_key(tmp_path: Path, key) -> Path:
    path = tmp_path / "own.pub"
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    return path


def test_add_partner_with_its_own_public_key(tmp_path):
    init_certs(tmp_path / "c", [])
    entry = add_partner(
        tmp_path / "c",
        "own",
        public_key=_own_key(tmp_path, ec.generate_private_key(ec.SECP256R1())),
    )
    assert entry["private_key"] is None and not CertDir(tmp_path / "c").partner_key("own").exists()
    with pytest.raises(DeployError, match="NIST curve"):
        add_partner(
            tmp_path / "c",
            "ed",
            public_key=_own_key(tmp_path, ed25519.Ed25519PrivateKey.generate()),
        )


def test_export_kit_holds_only_what_the_partner_needs(certs, tmp_path):
    kit = CertDir(export_partner(certs.path, "acme", tmp_path / "kit"))
    files = sorted(str(p.relative_to(kit.path)) for p in kit.path.rglob("*") if p.is_file())
    assert files == ["ca.pem", "manifest.json", "partners/acme.key", "partners/acme.pub"]
    assert stat.S_IMODE(kit.partner_key("acme").stat().st_mode) == 0o600
    check_partner_files(kit, "acme", now=NOW)
    shutil.copy(certs.partner_key("globex"), kit.partner_key("globex"))
    with pytest.raises(DeployError, match="'globex' is not in .*known: acme"):
        check_partner_files(kit, "globex", now=NOW)


def test_server_files_check_catches_a_foreign_key_or_ca(certs, tmp_path):
    check_server_files(certs, now=NOW)
    other = CertDir(tmp_path / "other")
    init_certs(other.path, [], now=NOW)
    mixed = CertDir(tmp_path / "mixed")
    mixed.path.mkdir()
    for src, dst in [
        (certs.ca_cert, mixed.ca_cert),
        (certs.server_cert, mixed.server_cert),
        (other.server_key, mixed.server_key),
    ]:
        shutil.copy(src, dst)
    with pytest.raises(DeployError, match="does not match"):
        check_server_files(mixed, now=NOW)
    shutil.copy(other.ca_cert, mixed.ca_cert)
    with pytest.raises(DeployError, match="is not signed by"):
        check_server_files(mixed, now=NOW)


def test_partner_check_catches_a_wrong_or_unreadable_key(certs, tmp_path):
    wrong = CertDir(tmp_path / "wrong")
    (wrong.path / "partners").mkdir(parents=True)
    shutil.copy(certs.ca_cert, wrong.ca_cert)
    shutil.copy(certs.manifest, wrong.manifest)
    shutil.copy(certs.partner_key("globex"), wrong.partner_key("acme"))
    with pytest.raises(DeployError, match="does not match the key registered for 'acme'"):
        check_partner_files(wrong, "acme", now=NOW)
    wrong.partner_key("acme").write_text("not a key")
    with pytest.raises(DeployError, match="not an OpenSSH private key"):
        check_partner_files(wrong, "acme", now=NOW)
    with pytest.raises(DeployError, match="no key for partner 'nobody'"):
        check_partner_files(certs, "nobody", now=NOW)


def test_data_check_names_the_problem(tmp_path):
    with pytest.raises(DeployError, match="no such file"):
        check_data(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(DeployError, match="column 'user'"):
        check_data(bad)


# --- probes against a local TLS server -------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _tls_server(certs: CertDir) -> Iterator[int]:
    """A TLS server presenting ``certs``' SuperLink certificate on a free local port."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs.server_cert, certs.server_key)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            with contextlib.suppress(ssl.SSLError, OSError), context.wrap_socket(conn, True):
                pass
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        sock.close()


@pytest.fixture
def live_certs(tmp_path) -> CertDir:
    d = CertDir(tmp_path / "live")
    init_certs(d.path, ["acme"])
    return d


@pytest.fixture
def live_server(live_certs) -> Iterator[int]:
    with _tls_server(live_certs) as port:
        yield port


def test_probe_completes_a_verified_handshake(live_certs, live_server):
    probe_superlink("127.0.0.1", live_server, ca_cert=live_certs.ca_cert)
    probe_superlink("localhost", live_server, ca_cert=live_certs.ca_cert)


def test_probe_refuses_a_server_outside_the_federations_ca(live_server, tmp_path):
    other = CertDir(tmp_path / "other")
    init_certs(other.path, [])
    with pytest.raises(DeployError, match="not trusted with .*unable to get local issuer"):
        probe_superlink("127.0.0.1", live_server, ca_cert=other.ca_cert)


def test_probe_refuses_an_expired_server_certificate(tmp_path):
    old = CertDir(tmp_path / "old")
    init_certs(old.path, [], days=1, now=dt.datetime.now(dt.UTC) - dt.timedelta(days=3))
    with _tls_server(old) as port, pytest.raises(DeployError, match="certificate has expired"):
        probe_superlink("127.0.0.1", port, ca_cert=old.ca_cert)


def test_probe_tells_an_insecure_client_the_server_uses_tls(live_server):
    with pytest.raises(DeployError, match="uses TLS; drop --insecure"):
        probe_superlink("127.0.0.1", live_server, ca_cert=None)


def test_probe_of_a_closed_port_is_refused_at_once():
    with pytest.raises(DeployError, match="connection refused"):
        probe_superlink("127.0.0.1", _free_port(), ca_cert=None)


def test_probe_of_a_silent_server_times_out(live_certs):
    with socket.socket() as silent:  # accepts TCP (backlog) but never speaks TLS
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        with pytest.raises(DeployError, match="no TLS answer within"):
            probe_superlink(
                "127.0.0.1", silent.getsockname()[1], ca_cert=live_certs.ca_cert, timeout=0.5
            )


def test_port_in_use_is_refused_before_launch():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        with pytest.raises(DeployError, match="cannot listen on"):
            check_port_free("127.0.0.1", held.getsockname()[1])


def test_a_missing_ca_file_or_a_reset_handshake_is_a_clear_error(live_server, tmp_path):
    with pytest.raises(DeployError, match="not a CA certificate this machine can load"):
        probe_superlink("127.0.0.1", live_server, ca_cert=tmp_path / "nope.pem")
    with socket.socket() as rude:  # accepts, then resets the connection during the handshake
        rude.bind(("127.0.0.1", 0))
        rude.listen(1)

        def reset() -> None:
            conn, _ = rude.accept()
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.recv(1)
            conn.close()

        thread = threading.Thread(target=reset, daemon=True)
        thread.start()
        certs = CertDir(tmp_path / "c")
        init_certs(certs.path, [])
        with pytest.raises(DeployError, match="TLS handshake failed|TLS failed"):
            probe_superlink("127.0.0.1", rude.getsockname()[1], ca_cert=certs.ca_cert,
                            timeout=5)  # fmt: skip
        thread.join()


def test_a_port_a_stopped_server_left_in_time_wait_counts_as_free():
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = server.accept()
        conn.close()  # the server side closes first: its end of the pair is in TIME_WAIT
        client.close()
    check_port_free("127.0.0.1", port)


def test_a_data_folder_named_like_a_dataset_is_checked_as_a_folder(tmp_path, monkeypatch):
    (tmp_path / "synthetic").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DeployError, match="synthetic"):
        check_data(Path("synthetic"))  # empty: no interactions, not the built-in generator


def test_one_key_one_partner_and_a_removed_partner_stays_removed(tmp_path, capsys):
    from fedrec.cli import main
    from fedrec.deploy.partners import active_partners, remove_partner
    from fedrec.deploy.registry import load_registry

    d = CertDir(tmp_path / "c")
    init_certs(d.path, ["acme"])
    with pytest.raises(DeployError, match="already partner 'acme'"):
        add_partner(d.path, "initech", public_key=d.partner_pub("acme"))
    assert "initech" not in read_manifest(d.path)["partners"]
    assert not d.partner_pub("initech").exists()
    add_partner(d.path, "globex", users=40)
    assert main(["certs", "remove-partner", "globex", "--dir", str(d.path)]) == 0
    assert "no longer register" in capsys.readouterr().err
    assert set(active_partners(read_manifest(d.path))) == {"acme"}
    assert load_registry(d.path).users == {}  # its count no longer applies
    with pytest.raises(DeployError, match="removed already"):
        remove_partner(d.path, "globex")
    with pytest.raises(DeployError, match="already exists"):
        add_partner(d.path, "globex")
    with pytest.raises(DeployError, match="already partner 'globex'"):
        add_partner(d.path, "globex2", public_key=d.partner_pub("globex"))


def test_a_site_refuses_to_start_when_the_guard_would_not_be_found_first(tmp_path):
    """A ':' in the Flower home's path split the guard's folder on PATH: the unguarded
    flwr-clientapp was found first, and the site ran without its guard, saying it had one."""
    import os

    from fedrec.deploy import launch
    from fedrec.deploy.client import check_guard_first
    from fedrec.deploy.guard import write_shims

    for name, ok in [("home", True), ("home:site", False)]:
        guard = write_shims(tmp_path / name / "guard")
        env = launch.child_env(os.environ, flwr_home=tmp_path / name, bins=launch.bin_dir(),
                               guard=guard)  # fmt: skip
        if ok:
            check_guard_first(env, guard)
        else:
            with pytest.raises(DeployError, match="the guard would not run"):
                check_guard_first(env, guard)
