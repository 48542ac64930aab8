"""Launchers of ``fedrec.deploy`` (issue 5, items 2 and 5): commands, bad input, a real federation.

The fast tests check command construction against Flower's own parsers. The slow test starts a
real SuperLink with TLS and SuperNode authentication on 127.0.0.1 and real SuperNodes, checks who
is let in, runs fedrec for two rounds on three sites while one of them is killed, and ships an
app bundle with code of its own, which every site refuses.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from fedrec.config import load_config
from fedrec.deploy import CertDir, DeployError, add_partner, export_partner, init_certs, launch
from fedrec.deploy.process import descendants, failure_reason

BINS = Path("/venv/bin")


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> CertDir:
    d = CertDir(tmp_path_factory.mktemp("deploy") / "certs")
    init_certs(d.path, ["acme", "globex", "initech"])
    return d


# --- command construction ---------------------------------------------------------------


def test_superlink_command_turns_on_tls_and_node_auth(certs):
    cmd = launch.superlink_command(BINS, host="0.0.0.0", port=9092, certs=certs)
    assert cmd[0] == "/venv/bin/flower-superlink" and "--insecure" not in cmd
    assert cmd[cmd.index("--ssl-ca-certfile") + 1] == str(certs.ca_cert)
    assert cmd[cmd.index("--ssl-certfile") + 1] == str(certs.server_cert)
    assert cmd[cmd.index("--ssl-keyfile") + 1] == str(certs.server_key)
    assert "--enable-supernode-auth" in cmd and "--disable-runtime-dependency-installation" in cmd
    assert cmd[cmd.index("--host") + 1 : cmd.index("--port") + 2] == ["0.0.0.0", "--port", "9092"]


def test_insecure_superlink_has_neither_tls_nor_node_auth():
    cmd = launch.superlink_command(BINS, host="127.0.0.1", port=9092, certs=None)
    assert "--insecure" in cmd and "--enable-supernode-auth" not in cmd
    assert not any(a.startswith("--ssl") for a in cmd)


def test_supernode_command_carries_ca_key_and_node_config(certs):
    from flwr.common.config import parse_config_args

    data = Path("/data/site a/shop.csv")
    config = launch.client_node_config(data, client_id=2, ledger=Path("/var/l.jsonl"))
    cmd = launch.supernode_command(
        BINS,
        superlink="fl.example.com:9092",
        certs=certs,
        partner="acme",
        node_config=config,
        runtime_port=9101,
    )
    assert cmd[cmd.index("--superlink") + 1] == "fl.example.com:9092"
    assert cmd[cmd.index("--root-certificates") + 1] == str(certs.ca_cert)
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(certs.partner_key("acme"))
    assert cmd[cmd.index("--port") + 1] == "9101" and "--insecure" not in cmd
    parsed = parse_config_args([cmd[cmd.index("--node-config") + 1]])  # as flower-supernode does
    assert parsed == {"data-path": str(data), "partition-id": 2, "ledger-path": "/var/l.jsonl"}


def test_node_config_refuses_values_flower_would_misparse():
    with pytest.raises(DeployError, match="quotes"):
        launch.node_config_arg({"data-path": "/it's/here"})
    with pytest.raises(DeployError, match="needs --partner"):
        launch.supernode_command(
            BINS, superlink="h:1", certs=CertDir(Path("c")), partner=None, node_config={}
        )


def test_child_env_switches_off_installs_and_telemetry_without_touching_the_parent():
    base = {"PATH": "/usr/bin", "HOME": "/root"}
    env = launch.child_env(base, flwr_home=Path("/tmp/fh"), bins=BINS)
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_HOME"] == "/tmp/fh"
    assert env["PATH"] == "/venv/bin:/usr/bin" and base == {"PATH": "/usr/bin", "HOME": "/root"}
    assert env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == "0.2"  # Flower's default: 1 s
    mine = {**base, "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "5"}  # the operator's own setting
    assert (
        launch.child_env(mine, flwr_home=None, bins=BINS)["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"]
        == "5"
    )


def test_flower_config_adds_our_connection_and_keeps_the_rest(certs):
    from flwr.cli.flower_config import parse_superlink_connection

    existing = {"superlink": {"default": "local", "local": {"address": ":local:"}}}
    config = launch.flower_config(existing, address="127.0.0.1:9092", ca_cert=certs.ca_cert)
    links = config["superlink"]
    assert links["default"] == "local" and links["local"] == {"address": ":local:"}
    conn = parse_superlink_connection(links[launch.CONNECTION], launch.CONNECTION)
    assert conn.address == "127.0.0.1:9092" and conn.root_certificates == str(certs.ca_cert)
    insecure = launch.flower_config({}, address="127.0.0.1:9092", ca_cert=None)
    assert insecure["superlink"] == {
        "fedrec": {"address": "127.0.0.1:9092", "insecure": True},
        "default": "fedrec",
    }


def test_app_bundle_carries_the_config_and_no_code_or_data(tmp_path):
    import tomli_w
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.config import flatten_dict, get_fab_config

    from fedrec.server.app import RUN_CONFIG_KEY, config_from_run_config

    assert launch.RUN_CONFIG_KEY == RUN_CONFIG_KEY
    cfg = load_config(None, {"dataset": "/srv/eval", "rounds": 3, "strategy": "fedmedian"})
    app = tmp_path / launch.APP_NAME
    app.mkdir()
    (app / "pyproject.toml").write_text(tomli_w.dumps(launch.app_pyproject(cfg)))
    fab = build_fab_from_disk(app)
    run_config = flatten_dict(get_fab_config(fab)["tool"]["flwr"]["app"]["config"])
    assert config_from_run_config(run_config) == cfg and run_config["num-server-rounds"] == 3
    assert len(fab) < 10_000


def test_client_app_reads_the_sites_data_path_from_node_config():
    from flwr.app import Context, RecordDict

    from fedrec.client.app import _site_config

    cfg = load_config(None, {"dataset": "synthetic"})
    ctx = Context(
        run_id=1,
        node_id=2,
        node_config={"data-path": "/site/shop", "partition-id": 0},
        state=RecordDict(),
        run_config={},
    )
    assert _site_config(cfg, ctx).dataset == "/site/shop"
    ctx.node_config.pop("data-path")
    assert _site_config(cfg, ctx) == cfg


@pytest.mark.parametrize(
    "text, expected",
    [
        ("127.0.0.1:9092", ("127.0.0.1", 9092)),
        ("[::1]:80", ("::1", 80)),
        ("fl.example.com:443", ("fl.example.com", 443)),
    ],
)
def test_parse_address(text, expected):
    assert launch.parse_address(text) == expected


@pytest.mark.parametrize("text", ["localhost", ":9092", "h:0", "h:99999", "h:x"])
def test_parse_address_rejects(text):
    with pytest.raises(DeployError, match="HOST:PORT"):
        launch.parse_address(text)


def test_local_address_of_a_wildcard_listener_is_loopback():
    assert launch.local_address("0.0.0.0", 9092) == "127.0.0.1:9092"
    assert launch.local_address("fl.example.com", 9092) == "fl.example.com:9092"


def test_flwr_outputs_are_parsed_or_named():
    assert launch.parse_run_id('Using SuperLink\n{"success": true, "run-id": "42"}') == 42
    status = launch.parse_run_status('{"runs": [{"run-id": "42", "status": "finished:failed"}]}')
    assert status == "finished:failed"
    with pytest.raises(DeployError, match="did not start a run: boom"):
        launch.parse_run_id("boom")


def test_failure_reason_explains_flowers_exit():
    refused = "ERROR : Exit Code: 305\nFailed\n[code: 2004] Failed to activate SuperNode."
    assert "not registered" in failure_reason(refused)
    assert "not trusted" in failure_reason("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify")
    assert failure_reason("x\nERROR : it broke\nbye") == "ERROR : it broke"


def test_each_site_gets_the_number_the_platform_gave_it(certs, tmp_path):
    from fedrec.deploy.client import Partner, client_id

    kit = CertDir(export_partner(certs.path, "globex", tmp_path / "kit"))
    partner = Partner(superlink="h:1", data=tmp_path, certs=kit, name="globex")
    assert client_id(partner) == 1  # acme 0, globex 1, initech 2, in the order they were added
    assert client_id(replace(partner, client_id=7)) == 7
    assert client_id(replace(partner, certs=None)) == 0


def test_stop_tree_reaches_children_in_their_own_session():
    import subprocess

    from fedrec.deploy.process import Child

    # like flower-superlink, which starts flower-superexec with start_new_session
    child = Child(
        ["bash", "-c", "setsid sleep 300 & echo started; sleep 300"], dict(os.environ), echo=False
    )
    child.wait_until(lambda: "started" in child.output, timeout=10, what="bash")
    time.sleep(0.2)
    tree = [child.proc.pid, *descendants(child.proc.pid)]
    try:
        assert len({os.getsid(p) for p in tree}) == 2
    finally:
        child.stop(grace=5)
    states = subprocess.run(
        ["ps", "-o", "stat=", "-p", ",".join(map(str, tree))], capture_output=True, text=True
    ).stdout.split()
    assert [s for s in states if not s.startswith("Z")] == []  # zombies only wait for init


# --- the CLI: bad input is one line and exit code 2, before anything starts ---------------


def _fedrec(capsys, *argv: str) -> tuple[int, str]:
    from fedrec.cli import main

    code = main(list(argv))
    return code, " ".join(capsys.readouterr().err.split())


def test_cli_client_start_without_certs_or_insecure(capsys, tmp_path):
    code, err = _fedrec(capsys, "client", "start", "--data", str(tmp_path), "--superlink", "h:1")
    assert code == 2 and "--certs DIR is required" in err


def test_cli_client_start_with_unreadable_data(capsys, certs, tmp_path):
    code, err = _fedrec(
        capsys,
        "client",
        "start",
        "--data",
        str(tmp_path / "none.csv"),
        "--certs",
        str(certs.path),
        "--partner",
        "acme",
        "--superlink",
        "127.0.0.1:1",
    )
    assert code == 2 and "no such file or folder" in err


def test_cli_client_start_with_no_server(capsys, certs, tmp_path):
    data = _export_synthetic(tmp_path / "shop")
    code, err = _fedrec(
        capsys,
        "client",
        "start",
        "--data",
        str(data),
        "--certs",
        str(certs.path),
        "--partner",
        "acme",
        "--superlink",
        f"127.0.0.1:{_free_port()}",
    )
    assert code == 2 and "connection refused" in err


def test_cli_certs_init_refuses_an_existing_directory(capsys, certs):
    code, err = _fedrec(capsys, "certs", "init", str(certs.path), "--partners", "2")
    assert code == 2 and "refusing to overwrite" in err


def test_cli_server_start_refuses_a_server_key_of_another_ca(capsys, certs, tmp_path):
    other = CertDir(tmp_path / "other")
    init_certs(other.path, [])
    mixed = tmp_path / "mixed"
    shutil.copytree(certs.path, mixed)
    os.chmod(mixed / "server.key", 0o600)
    shutil.copy(other.server_key, mixed / "server.key")
    code, err = _fedrec(
        capsys, "server", "start", "--certs", str(mixed), "--address", f"127.0.0.1:{_free_port()}"
    )
    assert code == 2 and "does not match" in err


# --- a real SuperLink and SuperNodes on 127.0.0.1 (slow) ----------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _site_share(full: Path, folder: Path, site: str) -> None:
    """What one merchant holds: its own interactions and users, and the shared item catalogue."""
    import pandas as pd

    folder.mkdir(parents=True)
    inter = pd.read_csv(full / "interactions.csv")
    mine = inter[inter["site"] == site]
    mine.to_csv(folder / "interactions.csv", index=False)
    users = pd.read_csv(full / "users.csv")
    users[users["user_id"].isin(mine["user"])].to_csv(folder / "users.csv", index=False)
    shutil.copy(full / "items.csv", folder / "items.csv")


def _export_synthetic(folder: Path) -> Path:
    """A small synthetic shop as CSV files (3 merchants), loadable by fedrec's folder loader."""
    from fedrec.data.synthetic import synthetic_ecommerce

    ds = synthetic_ecommerce(
        n_merchants=3, n_users=90, n_items=150, interactions_per_user=(6, 15), seed=0
    )
    folder.mkdir(parents=True)
    inter = ds.interactions.copy()
    inter["user"] = ds.users["user_id"].to_numpy()[inter["user"]]
    inter["item"] = ds.items["item_id"].to_numpy()[inter["item"]]
    inter[["user", "item", "timestamp", "rating", "site"]].to_csv(
        folder / "interactions.csv", index=False
    )
    ds.items[["item_id", "title", "category", "genres", "price"]].to_csv(
        folder / "items.csv", index=False
    )
    ds.users.to_csv(folder / "users.csv", index=False)
    return folder


class Federation:
    """A SuperLink with TLS and node auth, partners' keys registered, SuperNodes on demand."""

    def __init__(self, root: Path) -> None:
        from fedrec.deploy.server import Site

        self.root = root
        self.certs = CertDir(root / "certs")
        self.site = Site("127.0.0.1", _free_port(), self.certs, root / "home-link")
        self.children: list = []
        self.sites: dict[str, object] = {}

    def setup(self) -> None:
        from fedrec.deploy.server import register_partners, start_superlink

        init_certs(self.certs.path, ["acme", "globex", "initech"])
        self.children.append(start_superlink(self.site, echo=False))
        self.registered = register_partners(self.site)
        self.data = _export_synthetic(self.root / "server-data")

    def partner(self, name: str, merchant: int = 0):
        from fedrec.deploy.client import Partner

        site_data = self.root / f"site-{name}" / "shop"
        if not site_data.exists():
            _site_share(self.data, site_data, f"merchant-{merchant}")
        return Partner(
            superlink=self.site.local,
            data=site_data,
            certs=self.certs,
            name=name,
            runtime_port=_free_port(),
            flwr_home=self.root / f"home-{name}",
            ledger=self.root / f"site-{name}" / "privacy_ledger.jsonl",  # its own, as the CLI's
        )

    def start(self, name: str, merchant: int = 0):
        """Start (once) the SuperNode of partner ``name``, holding merchant ``merchant``'s data."""
        from fedrec.deploy.client import start_supernode

        if name not in self.sites or self.sites[name].proc.poll() is not None:
            child = start_supernode(self.partner(name, merchant), echo=False)
            self.children.append(child)
            self.sites[name] = child
        return self.sites[name]

    def close(self) -> None:
        for child in reversed(self.children):
            child.stop()


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Iterator[Federation]:
    fed = Federation(tmp_path_factory.mktemp("federation"))
    try:
        fed.setup()
        yield fed
    finally:
        fed.close()


@pytest.mark.slow
def test_registered_partner_with_the_ca_connects(federation):
    assert set(federation.registered) == {"acme", "globex", "initech"}
    child = federation.start("acme", 0)
    assert "SuperNode ID:" in child.output and child.proc.poll() is None
    node_config = child.cmd[child.cmd.index("--node-config") + 1]
    assert "partition-id=0" in node_config and "site-acme" in node_config  # its number, its data


@pytest.mark.slow
def test_unregistered_partner_is_refused(federation):
    add_partner(federation.certs.path, "mallory")  # a valid key pair the SuperLink never saw
    t0 = time.monotonic()
    with pytest.raises(DeployError, match="not registered"):
        federation.start("mallory")
    assert time.monotonic() - t0 < 45


@pytest.mark.slow
def test_node_without_the_federations_ca_cannot_connect(federation):
    from fedrec.deploy.client import start_supernode, supernode_command
    from fedrec.deploy.process import Child

    partner = federation.partner("globex", 1)
    foreign = CertDir(federation.root / "foreign-kit")  # right key, another federation's CA
    init_certs(federation.root / "foreign-ca", [])
    (foreign.path / "partners").mkdir(parents=True)
    shutil.copy(federation.root / "foreign-ca" / "ca.pem", foreign.ca_cert)
    shutil.copy(federation.certs.manifest, foreign.manifest)
    shutil.copy(federation.certs.partner_key("globex"), foreign.partner_key("globex"))
    with pytest.raises(DeployError, match="not trusted"):  # fedrec's probe, before launching
        start_supernode(replace(partner, certs=foreign), echo=False)
    cmd = supernode_command(partner, partner.data)
    i = cmd.index("--root-certificates")
    del cmd[i : i + 2]  # Flower falls back to the system's CAs
    env = launch.child_env(os.environ, flwr_home=partner.flwr_home, bins=launch.bin_dir())
    child = Child(cmd, env, echo=False)
    federation.children.append(child)
    with pytest.raises(DeployError, match="not trusted"):
        child.wait_until(lambda: "SuperNode ID:" in child.output, timeout=45, what="SuperNode")
    assert child.proc.wait(timeout=10) != 0


@pytest.mark.slow
def test_two_rounds_on_three_sites_survive_a_site_killed_mid_run(federation):
    """TLS, node authentication and secure aggregation with record-level DP: the server sees
    only sums; a site killed during round 2 drops out of the protocol and the run finishes;
    the surviving sites each release their DP fusion sums, in their own ledgers."""
    from fedrec.deploy.server import submit_run, wait_for_run
    from fedrec.privacy import audit_ledger, read_ledger, verify_chain

    sites = [federation.start(n, i) for i, n in enumerate(("acme", "globex", "initech"))]
    out = federation.root / "run"
    cfg = load_config(
        None,
        {
            "dataset": str(federation.data),
            "partition": "site",
            "rounds": 2,
            "out": str(out),
            "tasks": {t: {"dim": 16, "local_epochs": 1} for t in ("recall", "ranking", "personal")},
            "secure_aggregation": True,
            "privacy": {"mode": "record", "epsilon": 8.0, "delta": 1e-3},
        },
    )
    run_id = submit_run(federation.site, cfg)
    _wait_for_round(out, 1, timeout=300, sites=sites)  # under a minute on an idle 2-core machine
    _kill(sites[-1].proc.pid)  # site 'initech' goes down during round 2
    assert wait_for_run(federation.site, run_id, timeout=300) == "finished:completed"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {(r["round"], r["task"]) for r in rows} == {
        (r, t) for r in (1, 2) for t in ("recall", "ranking", "personal")
    }
    summary = json.loads((out / "summary.json").read_text())
    assert [f["round"] for f in summary["client_failures"]] == [2]  # the killed site, dropped
    secagg = summary["secure_aggregation"]["rounds"]  # the server got sums of 3, then of 2
    assert [secagg[r]["secagg.survivors"] for r in sorted(secagg)] == [3.0, 2.0]
    assert summary["privacy"]["mode"] == "record"
    # the sites keep the ledgers; the server's summary reports what their replies carried
    assert 0 < summary["privacy"]["max_epsilon"] <= 8.0
    assert set(summary["privacy"]["per_client"]) == {"client-0", "client-1", "client-2"}
    # each site wrote its own ledger, never the file the server's messages name
    server_ledger = out / "privacy_ledger.jsonl"
    assert not server_ledger.exists() or server_ledger.read_text() == ""
    for name in ("acme", "globex", "initech"):
        site_ledger = federation.root / f"site-{name}" / "privacy_ledger.jsonl"
        assert verify_chain(site_ledger, site=True).ok and read_ledger(site_ledger)
        audit = audit_ledger(site_ledger, site=True)
        assert audit.ok, audit.problems
        # the DP fusion fit: each live site released its own noisy sums, in its own ledger
        fusion = [e for e in read_ledger(site_ledger) if e["task"] == "fusion"]
        assert len(fusion) == (0 if name == "initech" else 1)
        assert all(e["epsilon_composed"] <= 8.0 and e["round"] == 2 for e in fusion)
    fitted = summary["fusion"]["fitted_on"]
    assert fitted.startswith("DP: each of 2 sites released"), fitted
    release = json.loads((out / "fusion_release.json").read_text())
    assert len(release["sites"]) == 2 and release["chosen"] in release["noisy_sums"]
    assert summary["privacy"]["max_epsilon"] <= 8.0
    assert not (out / "INCOMPLETE").exists()


@pytest.mark.slow
def test_a_site_runs_no_code_the_run_ships(federation, tmp_path):
    """A server ships its own ClientApp in the app bundle (Flower would unzip it, put it first on
    sys.path and import it): every site refuses the task before anything of the bundle is
    unpacked or imported (fedrec.deploy.guard), the code never runs, and the run still ends."""
    import tomli_w

    from fedrec.deploy.server import _flwr, wait_for_run, write_connection

    sites = [federation.start(n, i) for i, n in enumerate(("acme", "globex", "initech"))]
    marker = tmp_path / "the-shipped-code-ran"
    app = tmp_path / "app"
    app.mkdir()
    cfg = load_config(None, {"dataset": str(federation.data), "partition": "site", "rounds": 1,
                             "out": str(tmp_path / "run")})  # fmt: skip
    pyproject = launch.app_pyproject(cfg)
    pyproject["tool"]["flwr"]["app"]["components"]["clientapp"] = "shipped:app"
    (app / "pyproject.toml").write_text(tomli_w.dumps(pyproject))
    (app / "shipped.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from flwr.clientapp import ClientApp\napp = ClientApp()\n"
    )
    write_connection(federation.site)
    out = _flwr(launch.run_command(launch.bin_dir(), app), federation.site)
    assert out.returncode == 0, out.stdout + out.stderr
    run_id = launch.parse_run_id(out.stdout)
    assert wait_for_run(federation.site, run_id, timeout=300).startswith("finished")
    assert not marker.exists()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all("refused run" in c.output for c in sites):
        time.sleep(0.25)
    for child in sites:
        assert f"refused run {run_id}" in child.output and "files besides" in child.output


def _kill(pid: int) -> None:
    """SIGKILL a SuperNode with its SuperExec and ClientApp: no goodbye to the SuperLink."""
    for group in {os.getpgid(p) for p in [pid, *descendants(pid)]}:
        os.killpg(group, signal.SIGKILL)


def _wait_for_round(out: Path, round_: int, *, timeout: float, sites: list) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.is_file() and any(
            json.loads(line)["round"] >= round_ for line in metrics.read_text().splitlines()
        ):
            return
        time.sleep(0.25)
    tails = "\n".join(f"--- {c.cmd[-1]}\n{c.output[-1500:]}" for c in sites)
    raise AssertionError(f"round {round_} not evaluated within {timeout} s; SuperNodes:\n{tails}")
