"""Registered user counts: the manifest, the CLI, and matching the SuperLink's nodes to them."""

import json
import logging
import secrets

import pytest
from cryptography.hazmat.primitives import serialization
from flwr.proto.node_pb2 import NodeInfo
from flwr.supercore.primitives.asymmetric import public_key_to_bytes

from fedrec.cli import main
from fedrec.deploy import CertDir, DeployError, add_partner, init_certs, launch, read_manifest
from fedrec.deploy.partners import export_partner, set_users
from fedrec.deploy.registry import load_registry, pem_fingerprint
from fedrec.server.app import PARTNERS_KEY, config_from_run_config


@pytest.fixture
def certs(tmp_path) -> CertDir:
    d = CertDir(tmp_path / "certs")
    init_certs(d.path, ["acme", "globex"])
    return d


def _node(node_id: int, certs: CertDir, name: str) -> NodeInfo:
    """A NodeInfo as the SuperLink returns it: the key as ``flwr supernode register`` stored
    it (PEM SubjectPublicKeyInfo, Flower's own serialisation)."""
    key = serialization.load_ssh_public_key(certs.partner_pub(name).read_bytes())
    return NodeInfo(node_id=node_id, public_key=public_key_to_bytes(key))


def test_nodes_are_matched_to_counts_by_the_key_they_registered(certs, caplog):
    set_users(certs.path, "acme", 45)
    registry = load_registry(certs.path)
    manifest = read_manifest(certs.path)["partners"]
    assert registry.users == {manifest["acme"]["fingerprint"]: 45}
    assert pem_fingerprint(_node(7, certs, "acme").public_key) == manifest["acme"]["fingerprint"]
    stranger = NodeInfo(node_id=9, public_key=secrets.token_bytes(32))  # a simulated node's key
    nodes = [_node(7, certs, "acme"), _node(8, certs, "globex"), stranger]
    with caplog.at_level(logging.WARNING, logger="fedrec.deploy.registry"):
        assert registry.node_users(nodes) == {7: 45}
        assert registry.node_users(nodes) == {7: 45}
    unmatched = [r.getMessage() for r in caplog.records]
    assert len(unmatched) == 2  # globex and the stranger, each once across rounds
    assert "node 8" in unmatched[0] and "unreadable" in unmatched[1]


def test_counts_are_checked_when_written_and_when_read(certs):
    with pytest.raises(DeployError, match="at least 1"):
        set_users(certs.path, "acme", 0)
    with pytest.raises(DeployError, match="not in"):
        set_users(certs.path, "mallory", 3)
    with pytest.raises(DeployError, match="at least 1"):
        add_partner(certs.path, "initech", users=-2)
    assert "initech" not in read_manifest(certs.path)["partners"]  # nothing half-added
    entry = add_partner(certs.path, "initech", users=12)
    assert entry["users"] == 12
    manifest = json.loads(certs.manifest.read_text())
    manifest["partners"]["acme"]["users"] = "lots"  # a hand-edited manifest
    certs.manifest.write_text(json.dumps(manifest))
    with pytest.raises(DeployError, match="'acme'.*at least 1"):
        load_registry(certs.path)
    set_users(certs.path, "acme", None)  # forgotten
    assert load_registry(certs.path).users == {manifest["partners"]["initech"]["fingerprint"]: 12}


def test_cli_sets_and_clears_a_count(certs, capsys):
    assert main(["certs", "set-users", "acme", "45", "--dir", str(certs.path)]) == 0
    assert read_manifest(certs.path)["partners"]["acme"]["users"] == 45
    assert main(["certs", "set-users", "acme", "--dir", str(certs.path)]) == 2
    assert "or --clear" in capsys.readouterr().err
    assert main(["certs", "set-users", "acme", "--clear", "--dir", str(certs.path)]) == 0
    assert "users" not in read_manifest(certs.path)["partners"]["acme"]
    assert main(["certs", "add-partner", "initech", "--users", "9", "--dir", str(certs.path)]) == 0
    assert read_manifest(certs.path)["partners"]["initech"]["users"] == 9


def test_a_deployed_run_refuses_the_simulations_registry(certs, tmp_path, capsys):
    """register_users is the simulation's stand-in for the manifest: `fedrec server run` says
    where a deployment's counts come from, before it touches the (here absent) SuperLink."""
    conf = tmp_path / "run.toml"
    conf.write_text("register_users = true\n")
    argv = ["server", "run", "--config", str(conf), "--certs", str(certs.path)]
    assert main([*argv, "--address", "127.0.0.1:1"]) == 2
    assert "fedrec certs set-users" in capsys.readouterr().err


def test_the_bundle_names_the_directory_never_the_counts(certs, tmp_path):
    from fedrec.config import load_config

    set_users(certs.path, "acme", 45)
    cfg = load_config(None, {"out": str(tmp_path / "run")})
    config = launch.app_pyproject(cfg, partners=certs.path)["tool"]["flwr"]["app"]["config"]
    assert config[PARTNERS_KEY] == str(certs.path)
    fingerprint = read_manifest(certs.path)["partners"]["acme"]["fingerprint"]
    assert fingerprint not in json.dumps(config)  # every site can read the run config
    assert config_from_run_config(config) == cfg
    assert launch.app_pyproject(cfg)["tool"]["flwr"]["app"]["config"][PARTNERS_KEY] == ""


def test_a_partners_kit_carries_no_registered_count(certs, tmp_path):
    set_users(certs.path, "acme", 12_000)
    kit = CertDir(export_partner(certs.path, "acme", tmp_path / "kit"))
    entry = read_manifest(kit.path)["partners"]["acme"]
    assert "users" not in entry and set(read_manifest(kit.path)["partners"]) == {"acme"}
    assert entry["fingerprint"] == read_manifest(certs.path)["partners"]["acme"]["fingerprint"]
    assert kit.partner_key("acme").is_file()
    # a partner that made its own key gets the kit without a private key, and without counts
    own = tmp_path / "own"
    own_key = certs.path.parent / "own-key"
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    own_key.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))  # fmt: skip
    add_partner(certs.path, "initech", public_key=own_key, users=77)
    kit = CertDir(export_partner(certs.path, "initech", own))
    assert not kit.partner_key("initech").exists() and kit.partner_pub("initech").is_file()
    assert "users" not in read_manifest(kit.path)["partners"]["initech"]
