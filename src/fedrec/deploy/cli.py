"""``fedrec certs``, ``fedrec server`` and ``fedrec client``: deploy fedrec across sites.

``add_parsers`` registers the three command groups on ``fedrec``'s sub-parsers and returns their
own sub-parsers (``{"certs": ..., "server": ..., "client": ...}``) so other modules can add
commands to a group. Mistakes raise :class:`DeployError` (one line); ``server resume`` refuses a
directory it cannot continue with a one-line CheckpointError.
"""

from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from fedrec.deploy import launch
from fedrec.deploy.certdir import CertDir
from fedrec.deploy.certs import DEFAULT_DAYS
from fedrec.deploy.errors import DeployError

if TYPE_CHECKING:
    from fedrec.deploy.server import Site

console = Console(stderr=True)
INSECURE_WARNING = "[yellow]--insecure: no TLS and no SuperNode authentication (development only)"
USERS_HELP = (
    "the users its data holds: the server lowers any FedAvg weight its replies state above this"
)


def add_parsers(subparsers: Any) -> dict[str, Any]:
    """Add ``certs``, ``server`` and ``client`` to ``fedrec``; return their sub-parsers."""
    return {
        "certs": _certs(subparsers),
        "server": _server(subparsers),
        "client": _client(subparsers),
    }


def _certs(subparsers: Any) -> Any:
    p = subparsers.add_parser("certs", help="the federation's CA, SuperLink certificate, keys")
    sub = p.add_subparsers(dest="certs_command", required=True)
    s = sub.add_parser("init", help="create a CA, the SuperLink certificate and partner keys")
    s.add_argument("dir", help="new directory for the files (existing keys are never replaced)")
    s.add_argument("--partners", default="0", help="a count (partner-1..N) or names: acme,globex")
    s.add_argument("--days", type=int, default=DEFAULT_DAYS, help="validity of the certificates")
    s.add_argument(
        "--server-name",
        action="append",
        default=[],
        help="the SuperLink's public DNS name or IP (repeatable); "
        "localhost and 127.0.0.1 are always included",
    )
    s.set_defaults(func=cmd_certs_init)
    s = sub.add_parser("add-partner", help="a key pair for a new partner")
    s.add_argument("name")
    s.add_argument("--dir", required=True, help="the directory made by 'certs init'")
    s.add_argument("--public-key", help="register the partner's own OpenSSH public key instead")
    s.add_argument("--users", type=int, help=USERS_HELP)
    s.set_defaults(func=cmd_certs_add_partner)
    s = sub.add_parser("remove-partner", help="stop registering a partner's key")
    s.add_argument("name")
    s.add_argument("--dir", required=True, help="the directory made by 'certs init'")
    s.set_defaults(func=cmd_certs_remove_partner)
    s = sub.add_parser("set-users", help="register how many users a partner's data holds")
    s.add_argument("name")
    s.add_argument("users", type=int, nargs="?", help=USERS_HELP + " (omit with --clear)")
    s.add_argument("--dir", required=True, help="the directory made by 'certs init'")
    s.add_argument("--clear", action="store_true", help="forget the partner's registered count")
    s.set_defaults(func=cmd_certs_set_users)
    s = sub.add_parser("export", help="write the kit to send one partner (CA cert + its key)")
    s.add_argument("name")
    s.add_argument("--dir", required=True, help="the directory made by 'certs init'")
    s.add_argument("--out", required=True, help="new directory for the partner's kit")
    s.set_defaults(func=cmd_certs_export)
    return sub


def _site_flags(p: argparse.ArgumentParser, address_help: str) -> None:
    p.add_argument("--certs", help="the directory made by 'fedrec certs init'")
    p.add_argument("--address", default=launch.DEFAULT_ADDRESS, help=address_help)
    p.add_argument("--insecure", action="store_true", help="no TLS, no node auth (development)")
    p.add_argument("--flwr-home", help="Flower CLI home (default $FLWR_HOME or ~/.flwr)")


def _server(subparsers: Any) -> Any:
    p = subparsers.add_parser("server", help="the platform's SuperLink and runs")
    sub = p.add_subparsers(dest="server_command", required=True)
    s = sub.add_parser("start", help="start the SuperLink (TLS, SuperNode auth) and register keys")
    _site_flags(s, f"listen on HOST:PORT (default {launch.DEFAULT_ADDRESS}; 0.0.0.0 for all)")
    s.add_argument("--database", help="SQLite file keeping runs and registrations (default memory)")
    s.add_argument("--no-register", action="store_true", help="do not register manifest partners")
    s.set_defaults(func=cmd_server_start)
    s = sub.add_parser("register", help="register partners' public keys with a running SuperLink")
    _site_flags(s, "the SuperLink's HOST:PORT")
    s.add_argument("names", nargs="*", help="partners to register (default: all in the manifest)")
    s.set_defaults(func=cmd_server_register)
    s = sub.add_parser("run", help="run fedrec on the connected SuperNodes (flwr run)")
    _site_flags(s, "the SuperLink's HOST:PORT")
    s.add_argument("--config", help="TOML file with any FedrecConfig fields")
    s.add_argument("--dataset", help="the server's evaluation data (same items as the partners')")
    s.add_argument("--partition", help="how partition ids map to users (e.g. site)")
    s.add_argument("--rounds", type=int, help="federated rounds")
    s.add_argument("--out", help="run directory on this machine (default runs/deploy-...)")
    s.add_argument("--detach", action="store_true", help="print the run id and return")
    s.add_argument("--timeout", type=float, help="give up waiting after this many seconds")
    s.set_defaults(func=cmd_server_run)
    s = sub.add_parser("resume", help="continue a killed run from its last checkpoint (flwr run)")
    s.add_argument(
        "run_dir", metavar="RUN_DIR", help="the unfinished run directory on this machine"
    )
    _site_flags(s, "the SuperLink's HOST:PORT")
    s.add_argument("--detach", action="store_true", help="print the run id and return")
    s.add_argument("--timeout", type=float, help="give up waiting after this many seconds")
    s.set_defaults(func=cmd_server_resume)
    return sub


def _client(subparsers: Any) -> Any:
    p = subparsers.add_parser("client", help="a partner's SuperNode")
    sub = p.add_subparsers(dest="client_command", required=True)
    s = sub.add_parser("start", help="check everything, then start this site's SuperNode")
    s.add_argument("--data", required=True, help="this site's data file or folder (stays here)")
    s.add_argument("--superlink", required=True, help="the platform's SuperLink HOST:PORT")
    s.add_argument("--certs", help="the kit from the platform (ca.pem, partners/NAME.key)")
    s.add_argument("--partner", help="this site's partner name")
    s.add_argument("--insecure", action="store_true", help="no TLS, no node auth (development)")
    s.add_argument(
        "--client-id",
        type=int,
        help="this site's number (default: from the kit's manifest, else 0)",
    )
    s.add_argument(
        "--ledger", help="this site's privacy ledger (default ./privacy_ledger-PARTNER.jsonl)"
    )
    s.add_argument(
        "--budget",
        type=float,
        help="this site's lifetime epsilon over all runs in its ledger (default: each run's)",
    )
    s.add_argument(
        "--guard",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run only the fedrec installed here, never code a run ships (fedrec.deploy.guard; "
        "the default); --no-guard runs whatever app a run ships, as plain Flower does",
    )
    s.add_argument(
        "--budget-delta",
        type=float,
        help="with --budget: its delta; a run asking for a larger privacy.delta is refused "
        "(default: each run's delta, which the server sets)",
    )
    s.add_argument(
        "--runtime-port",
        type=int,
        default=launch.DEFAULT_RUNTIME_PORT,
        help="local port of the SuperNode's own API (one per node on a host)",
    )
    s.add_argument("--flwr-home", help="where Flower keeps installed apps (default ~/.flwr)")
    s.set_defaults(func=cmd_client_start)
    return sub


def _exit_on_sigterm() -> None:
    """Let SIGTERM unwind like Ctrl-C, so the ``finally`` clauses stop Flower's processes."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def cmd_certs_init(args: argparse.Namespace) -> int:
    from fedrec.deploy.certs import init_certs
    from fedrec.deploy.partners import partner_names

    manifest = init_certs(
        args.dir, partner_names(args.partners), days=args.days, server_names=args.server_name
    )
    console.print(
        f"[green]created[/] {args.dir}: CA and SuperLink certificate for "
        f"{', '.join(manifest['server']['names'])} (until "
        f"{manifest['server']['not_after']})"
    )
    for name, entry in manifest["partners"].items():
        console.print(f"  partner {name}: {entry['fingerprint']}")
    console.print(
        "keep ca.key and server.key on the platform; send each partner 'fedrec certs export NAME'"
    )
    return 0


def cmd_certs_add_partner(args: argparse.Namespace) -> int:
    from fedrec.deploy.partners import add_partner

    entry = add_partner(args.dir, args.name, public_key=args.public_key, users=args.users)
    users = f", {args.users} users registered" if args.users is not None else ""
    console.print(f"[green]added[/] partner {args.name}: {entry['fingerprint']}{users}")
    return 0


def cmd_certs_remove_partner(args: argparse.Namespace) -> int:
    from fedrec.deploy.partners import remove_partner

    entry = remove_partner(args.dir, args.name)
    console.print(
        f"[green]removed[/] partner {args.name} ({entry['fingerprint']}): 'fedrec server start' "
        "and 'server register' no longer register its key. On a running SuperLink, also "
        "unregister its node: 'flwr supernode ls fedrec', then 'flwr supernode unregister "
        "NODE_ID fedrec'"
    )
    return 0


def cmd_certs_set_users(args: argparse.Namespace) -> int:
    from fedrec.deploy.partners import set_users

    if args.clear == (args.users is not None):
        raise DeployError("give the partner's number of users, or --clear (not both)")
    set_users(args.dir, args.name, args.users)
    what = "no registered count" if args.clear else f"{args.users} users registered"
    console.print(f"partner {args.name}: {what}; runs started or resumed from now on use it")
    return 0


def cmd_certs_export(args: argparse.Namespace) -> int:
    from fedrec.deploy.partners import export_partner

    out = export_partner(args.dir, args.name, args.out)
    key = CertDir(out).partner_key(args.name)
    console.print(
        f"[green]kit for {args.name}:[/] {out} (ca.pem, partners/{args.name}.key; send it over "
        "a channel you trust)" if key.is_file() else
        f"[green]kit for {args.name}:[/] {out} (ca.pem and its public key; it puts its own "
        f"private key at {key.relative_to(out)})"
    )
    return 0


def _site(args: argparse.Namespace) -> Site:
    from fedrec.deploy.server import Site, flwr_home

    host, port = launch.parse_address(args.address)
    return Site(host, port, _certs_dir(args), flwr_home(args.flwr_home))


def _certs_dir(args: argparse.Namespace) -> CertDir | None:
    if args.insecure:
        console.print(INSECURE_WARNING)
        return None
    if not args.certs:
        raise DeployError("--certs DIR is required (or --insecure for local development)")
    return CertDir(Path(args.certs))


def cmd_server_start(args: argparse.Namespace) -> int:
    from fedrec.deploy.server import register_partners, start_superlink

    site = _site(args)
    _exit_on_sigterm()
    child = start_superlink(site, database=args.database)
    try:
        if site.certs is not None and not args.no_register:
            for name, node in register_partners(site).items():
                console.print(f"registered {name}: {node}")
        console.print(
            f"[green]SuperLink ready[/] on {args.address} (flwr connection "
            f"'{launch.CONNECTION}' in {site.flwr_home}); Ctrl-C stops it"
        )
        return child.proc.wait()
    finally:
        child.stop()


def cmd_server_register(args: argparse.Namespace) -> int:
    from fedrec.deploy.server import register_partners

    for name, node in register_partners(_site(args), args.names or None).items():
        console.print(f"registered {name}: {node}")
    return 0


def cmd_server_run(args: argparse.Namespace) -> int:
    from fedrec.config import load_config
    from fedrec.deploy.server import submit_run
    from fedrec.rundir import default_run_path

    keys = ("dataset", "partition", "rounds", "out")
    cfg = load_config(args.config, {k: getattr(args, k) for k in keys})
    out = Path(cfg.out or default_run_path(cfg, "deploy")).resolve()
    cfg = replace(cfg, out=str(out))  # the ServerApp's working directory is the SuperLink's
    site = _site(args)
    run_id = submit_run(site, cfg)
    console.print(f"started run {run_id}: {cfg.rounds} rounds; results in {out}")
    _print_registered(site)
    print(run_id)
    return 0 if args.detach else _follow(site, run_id, args.timeout)


def _print_registered(site: Site) -> None:
    if site.certs is None:
        return
    from fedrec.deploy.registry import load_registry

    names = sorted(load_registry(site.certs.path).names.values())
    console.print(
        f"FedAvg weights capped at the registered user counts of {', '.join(names)}"
        if names else "no partner has a registered user count ('fedrec certs set-users')"
    )


def cmd_server_resume(args: argparse.Namespace) -> int:
    from fedrec.deploy.resume import check_previous_run, resumable_run
    from fedrec.deploy.server import submit_run

    run = resumable_run(args.run_dir)
    if run.notice:
        console.print(f"[yellow]note: {run.notice}")
    site = _site(args)
    previous = check_previous_run(site, run.path)
    run_id = submit_run(site, run.cfg, resume=run.path)
    console.print(
        f"started run {run_id}: resumes {run.path} after round {run.after_round} of "
        f"{run.cfg.rounds}" + (f" (was Flower run {previous})" if previous is not None else "")
    )
    _print_registered(site)
    print(run_id)
    if args.detach:
        return 0
    code = _follow(site, run_id, args.timeout)
    if code == 0 and not (run.path / "summary.json").is_file():
        console.print(f"[red]run {run_id} completed but wrote no summary.json in {run.path}")
        return 1
    return code


def _follow(site: Site, run_id: int, timeout: float | None) -> int:
    """Wait for the run, printing its status changes; 0 if it completed."""
    from fedrec.deploy.server import wait_for_run

    status = wait_for_run(
        site, run_id, timeout=timeout, on_status=lambda s: console.print(f"run {run_id}: {s}")
    )
    if status != "finished:completed":
        console.print(
            f"[red]run {run_id} {status}[/]: flwr log {run_id} {launch.CONNECTION} --show"
        )
        return 1
    return 0


def cmd_client_start(args: argparse.Namespace) -> int:
    from fedrec.deploy.client import Partner, start_supernode
    from fedrec.deploy.server import flwr_home

    partner = Partner(
        superlink=args.superlink,
        data=Path(args.data).expanduser(),
        certs=_certs_dir(args),
        name=args.partner,
        client_id=args.client_id,
        ledger=Path(args.ledger or f"privacy_ledger-{args.partner or 'site'}.jsonl").expanduser(),
        runtime_port=args.runtime_port,
        flwr_home=flwr_home(args.flwr_home) if args.flwr_home else None,
        budget=args.budget,
        budget_delta=args.budget_delta,
        guard=args.guard,
    )
    _exit_on_sigterm()
    child = start_supernode(partner)
    try:
        console.print(
            f"[green]connected[/] to {args.superlink} as {args.partner or 'insecure'}; "
            "training data stays here; "
            + ("runs only the fedrec installed here; " if partner.guard
               else "[yellow]--no-guard: runs whatever app a run ships[/]; ")
            + "Ctrl-C stops this SuperNode"
        )
        return child.proc.wait()
    finally:
        child.stop()
