"""Robust aggregation under model poisoning: FedAvg against FedMedian, FedTrimmedAvg and Krum.

    .venv/bin/python benchmarks/robust_aggregation.py [--rounds N] [--strategies S ...]
        [--attacks clean scale10 signflip] [--screen [--norm-outliers reject|rescale]
        [--norm-reference size|median] [--norm-factor F] [--max-weight-factor W]
        [--register-users] [--direction-outliers reject|reflect]
        [--reflect-min-cosine C]] [--seeds N] [--seed S]
        [--dataset D] [--partition P [--clients N]] [--out DIR]

The default federation (ML-100K, one client per occupation) runs clean and with 10% of its
clients poisoning every update they send: ``scale10`` sends 10x the honest update, ``signflip``
sends -1x, ``inflate`` sends 10x and states 1000x its users as its FedAvg weight, and
``jitter``, a control, sends 1.0001x (fedrec.simulation.faults; an attack simulation for
benchmarks and tests, which no config or flag of ``fedrec`` can turn on). The update screen's norm and direction rules are
off (``reject_norm_factor = 0``, ``reject_min_cosine = -1``) unless ``--screen``: the question
is then what each aggregator withstands by itself; with ``--screen`` they are the defaults (3x
the norm predicted from the client's users, cosine 0 with the median of the other updates, and
an update over the norm rule rescaled to its predicted norm; ``--norm-outliers reject`` drops
it instead, ``--norm-reference median --norm-factor 10`` is the rule before the size fit; a
reply's weight is capped at 10x the round's median, ``--max-weight-factor 0`` leaves it as
stated; ``--register-users`` first caps it at the client's own users, as a platform's
registry does for partner sites: fedrec.simulation.registry; an update below the direction
rule is kept negated when its negation is at least ``--reflect-min-cosine`` aligned with the
others' median and with the global model's last step (so never in round 1) and the update is
below the rule against all replies too, and rejected otherwise, under the default
``--direction-outliers reflect``; ``reject`` rejects every such update). Prints test HR@10 per task, the drop
relative to the same strategy's clean run and to clean FedAvg, and writes
DIR/robust_aggregation.json.

``--seeds N`` repeats everything for seeds ``seed .. seed+N-1``: each seed sets both the run's
seed (model initialisation, client sampling, batches, the 99 sampled negatives of evaluation)
and which clients attack. A simulation is
deterministic given its seed, so an attacked run differs from the clean run of the same seed only
through the attack; but a small change early in training moves the final HR@10 by about 0.01
either way, so one seed cannot show a 2% effect: ``--attacks clean jitter`` measures by how
much on the federation at hand (a change no defence acts on, in the same clients as an
attack). The last table gives, per strategy, attack and
task, the mean relative change over seeds with the smallest and largest.

The attackers are fixed for a run and drawn by the seed among clients of very unequal size,
so they may hold much more than 10% of the users (printed per seed). Their data is lost to the
federation with their updates under any defence that drops them (a reflected flipped update
is its honest one): when every sign-flipped update is rejected (``--direction-outliers
reject``) and no honest one, that run is FedAvg over the honest clients alone, bit for bit, and
a third table measures each attack against it (empty when the sign-flip runs reflected).

A run whose directory under ``--out`` already holds a ``summary.json`` (written last, so only a
finished run has one) is read instead of run again: a stopped sweep resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import re
import time
import tomllib
from pathlib import Path

import numpy as np

from fedrec.config import DIRECTION_OUTLIERS, load_config
from fedrec.models.registry import load_model
from fedrec.scoring import evaluate_model
from fedrec.simulation import simulate
from fedrec.simulation.faults import FaultPlan, with_faults
from fedrec.strategies.screen import DIRECTION_REFERENCE, REFLECT_RULE
from fedrec.workload import build_workload

DEFAULTS = load_config(None)
# (update factor, stated-users factor)
# "jitter" is no attack but the yardstick: the attackers send 1.0001x their honest update, which
# no defence acts on, so its change against the clean run is what a difference at the fifth
# significant digit of two clients' updates alone does to the final HR@10
ATTACKS = {"clean": None, "scale10": (10.0, 1), "signflip": (-1.0, 1), "inflate": (10.0, 1000),
           "jitter": (1.0001, 1)}
STRATEGIES = ("fedavg", "fedmedian", "fedtrimmedavg", "krum")
TASKS = ("recall", "ranking", "personal")
# written beside a run made since the direction rule judges each update against the median of
# the other updates (and reflects only a clear flip): a cached run without it was judged
# against the median of all replies, and its direction findings differ
DIRECTION_MARK = "direction_rule.txt"  # holds DIRECTION_REFERENCE
# written beside a run made since reflection also asks the global model's last step (a cached
# run under "reflect" without it reflected flips that the current rule may reject); holds
# REFLECT_RULE and the run's direction_outliers (config.toml has it only when it is not the
# default, which was "reject" until the default became "reflect")
REFLECT_MARK = "reflect_rule.txt"


def run_one(strategy: str, attack: str, seed: int, args: argparse.Namespace) -> dict[str, float]:
    from fedrec.client.app import app

    over = {
        "strategy": strategy,
        "seed": seed,
        "out": str(Path(args.out) / f"seed{seed}" / f"{strategy}-{attack}"),
        "rounds": args.rounds,
        "dataset": args.dataset,
        "partition": args.partition,
        "clients": args.clients,
        "eval_full_ranking": False,
        "reject_norm_factor": args.norm_factor if args.screen else 0.0,
        "reject_min_cosine": 0.0 if args.screen else -1.0,
        "norm_outliers": args.norm_outliers,
        "norm_reference": args.norm_reference,
        "max_weight_factor": args.max_weight_factor if args.screen else 0.0,
        "register_users": args.register_users and args.screen,
        "direction_outliers": args.direction_outliers,
        "reflect_min_cosine": args.reflect_min_cosine,
    }
    done = Path(over["out"]) / "summary.json"
    if done.exists():  # a finished run (summary.json is written last): a stopped sweep resumes
        summary = json.loads(done.read_text())
        _check_cached(Path(over["out"]), over, summary, attack, args.screen)
    else:
        client_app = None
        if (attack_spec := ATTACKS[attack]) is not None:
            factor, weight_factor = attack_spec
            plan = FaultPlan(attack_share=args.attack_share, attack_factor=factor,
                             weight_factor=weight_factor, seed=seed)
            client_app = with_faults(app, plan)
        cfg = load_config(None, {k: v for k, v in over.items() if v is not None})
        _, summary = simulate(cfg, baselines=False, client_app=client_app)
        (Path(over["out"]) / DIRECTION_MARK).write_text(DIRECTION_REFERENCE + "\n")
        (Path(over["out"]) / REFLECT_MARK).write_text(f"{REFLECT_RULE}\n{cfg.direction_outliers}\n")
    return {**_hr(summary), "honest": honest_users_hr(Path(over["out"]), seed, args)}


def _check_cached(run_dir: Path, over: dict, summary: dict, attack: str, screen: bool) -> None:
    """Refuse a finished run made under other screen settings than this sweep's. A run made
    before ``norm_outliers`` existed rejected norm outliers, and one made before
    ``norm_reference`` existed compared norms with the round's median; a run in which nothing
    was over the norm rule is the same run under either action, and one in which no weight was
    lowered the same under any weight cap. A run is the same with or without registered counts
    when its clients state their users honestly (every attack but ``inflate``), or when the
    counts were on and lowered nothing. A screened run made before the direction rule compared
    each update with the other updates' median (no ``DIRECTION_MARK``) is refused."""
    mark = run_dir / DIRECTION_MARK
    if screen and (not mark.exists() or mark.read_text().strip() != DIRECTION_REFERENCE):
        raise SystemExit(f"{run_dir}: made before the direction rule compared each update with "
                         "the other updates' median; use another --out")
    stored = tomllib.loads((run_dir / "config.toml").read_text())
    reflect_mark = run_dir / REFLECT_MARK
    rule, *action = reflect_mark.read_text().split() if reflect_mark.exists() else [None]
    # absent from config.toml: the default of the fedrec that wrote it
    stored.setdefault("direction_outliers", action[0] if action else "reject")
    if stored["direction_outliers"] == "reflect" and rule != REFLECT_RULE:
        raise SystemExit(f"{run_dir}: made before reflection asked the global model's last "
                         "step; use another --out")
    stored.setdefault("norm_outliers", "reject")
    stored.setdefault("norm_reference", "median")
    stored.setdefault("max_weight_factor", 0.0)  # made before the weight cap existed
    stored.setdefault("register_users", False)  # made before simulations had a registry
    stored.setdefault("reflect_min_cosine", DEFAULTS.reflect_min_cosine)
    data = [k for k in ("dataset", "partition", "clients", "rounds")
            if over[k] is not None and stored.get(k) != over[k]]  # fmt: skip
    if data:
        raise SystemExit(f"{run_dir}: made with other {', '.join(data)}; use another --out")
    diff = [k for k in ("reject_norm_factor", "reject_min_cosine", "norm_outliers",
                        "norm_reference", "max_weight_factor", "register_users",
                        "direction_outliers", "reflect_min_cosine")
            if stored[k] != over[k]]  # fmt: skip
    adjusted = [r["reason"] for r in summary.get("rescaled_updates", [])]
    rejected = [r["reason"] for r in summary.get("rejected_updates", [])]
    # a setting whose rule never acted in the run is moot: the same run under either value. A
    # weight cap that lowered nothing would lower nothing under a looser cap or none either
    stored_cap, cap = stored["max_weight_factor"], over["max_weight_factor"]
    # each direction finding's task cosines: one the margin decided alike under both values
    findings = [[float(c) for c in re.findall(r"update has cosine (-?[\d.]+)", r)]
                for r in [*adjusted, *rejected]]
    margins = sorted((stored["reflect_min_cosine"], over["reflect_min_cosine"]))
    moot = {
        "norm_outliers": not any("update norm" in r for r in adjusted)
        and not any("update norm" in r and "median" in r for r in rejected),
        "max_weight_factor": not any("lowered to" in r for r in [*adjusted, *rejected])
        and stored_cap > 0 and (cap == 0 or cap >= stored_cap),
        "register_users": (ATTACKS[attack] or (1.0, 1))[1] == 1
        or (stored["register_users"] and not any("registered" in r for r in [*adjusted, *rejected])),
        # no finding deep enough to reflect (every task's negation at the smaller margin or
        # more): each was rejected under either action
        "direction_outliers": not any(c and -max(c) >= margins[0] - 5e-4 for c in findings),
        # no finding whose every task's negation reaches the smaller margin (reported to 3
        # places): none reflected under either. (One between the two margins is not enough:
        # the margin applies to the cosine with the global model's last step too, which a
        # finding's reason does not give when it was reflected)
        "reflect_min_cosine": stored["direction_outliers"] == over["direction_outliers"] == "reject"
        or not any(c and -max(c) >= margins[0] - 5e-4 for c in findings),
    }
    diff = [k for k in diff if not moot.get(k, False)]
    if diff:
        raise SystemExit(
            f"{run_dir}: made with {', '.join(f'{k} = {stored[k]!r}' for k in diff)}, not this "
            f"sweep's {', '.join(f'{k} = {over[k]!r}' for k in diff)}; use another --out"
        )


def honest_users_hr(run_dir: Path, seed: int, args: argparse.Namespace) -> dict[str, float]:
    """Test HR@10 of the run's final models on the users of the clients that do not attack
    (in every run of ``seed``, attacked or clean: the same users, the same negatives)."""
    work = build_workload(load_config(None, _data_over(seed, args)))
    attackers = FaultPlan(attack_share=args.attack_share, seed=seed).attackers(
        work.partition.n_clients
    )
    honest = np.flatnonzero(~np.isin(work.partition.client_of_user, sorted(attackers)))
    ev = work.test.of_users(honest)
    return {
        t: evaluate_model(load_model(run_dir / "models" / t), ev, full_ranking=False)["hr@10"]
        for t in TASKS
    }


def _data_over(seed: int, args: argparse.Namespace) -> dict:
    over = {"seed": seed, "dataset": args.dataset, "partition": args.partition,
            "clients": args.clients}
    return {k: v for k, v in over.items() if v is not None}


def _hr(summary: dict) -> dict[str, float]:
    rejected = sum(summary.get("rejected_per_round", {}).values())  # honest ones too, if any
    adjusted = [r["reason"] for r in summary.get("rescaled_updates", [])]
    hr = {t: m["hr@10"] for t, m in summary["tasks"].items()}
    # one reply may be both (rescaled, then reflected)
    return {**hr, "rejected": rejected,
            "rescaled": sum("update norm" in r or "lowered to" in r for r in adjusted),
            "reflected": sum("reflected" in r for r in adjusted)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, help="federated rounds (default: the config's)")
    parser.add_argument("--dataset", help="a reduced federation, e.g. synthetic:merchants=10")
    parser.add_argument("--partition", help="e.g. site, or dirichlet:1000 (near-equal silos: "
                        "10%% of the clients then hold about 10%% of the users)")
    parser.add_argument("--clients", type=int, help="with a dirichlet partition: how many")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--attacks", nargs="+", default=[a for a in ATTACKS if a != "jitter"],
                        choices=list(ATTACKS), help="jitter: the control (1.0001x updates)")
    parser.add_argument("--attack-share", type=float, default=0.1, help="share of attackers")
    parser.add_argument("--screen", action="store_true", help="keep the update screen on")
    parser.add_argument("--norm-outliers", choices=("rescale", "reject"), default="rescale",
                        help="with --screen: rescale an update over the norm rule to its "
                        "predicted norm (the default), or reject it")
    parser.add_argument("--norm-reference", choices=("size", "median"), default="size",
                        help="with --screen: the norm predicted for an update: fitted on its "
                        "client's users (the default) or the round's median")
    parser.add_argument("--norm-factor", type=float, default=DEFAULTS.reject_norm_factor,
                        help="with --screen: the norm rule's factor (default: the config's, "
                        "%(default)g)")
    parser.add_argument("--max-weight-factor", type=float, default=DEFAULTS.max_weight_factor,
                        help="with --screen: cap of a reply's FedAvg weight, x the round's median "
                        "(default: the config's, %(default)g; 0: weights as stated)")
    parser.add_argument("--register-users", action="store_true",
                        help="with --screen: each client's user count is registered (as `fedrec "
                        "certs set-users` does for a partner site) and caps its FedAvg weight")
    parser.add_argument("--direction-outliers", choices=DIRECTION_OUTLIERS,
                        default=DEFAULTS.direction_outliers,
                        help="with --screen: an update pointing away from the other updates' "
                        "median is kept negated when clearly a flip and rejected otherwise "
                        "(reflect, the default), or rejected (reject)")
    parser.add_argument("--reflect-min-cosine", type=float, default=DEFAULTS.reflect_min_cosine,
                        help="with --screen: reflect only a negation at least this aligned with "
                        "the other updates' median and with the global model's last step "
                        "(default: the config's, %(default)g)")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed and the attackers'")
    parser.add_argument("--seeds", type=int, default=1, help="repeat for this many seeds")
    parser.add_argument("--out", default="runs/robust_aggregation")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    attacks = ["clean", *[a for a in args.attacks if a != "clean"]]
    by_seed: dict[int, dict[str, dict[str, dict[str, float]]]] = {}
    shares: dict[int, float] = {}
    out = Path(args.out) / "robust_aggregation.json"
    for seed in range(args.seed, args.seed + args.seeds):
        results = by_seed.setdefault(seed, {})
        for attack in attacks:  # every strategy clean first: a partial sweep still compares them
            for strategy in args.strategies:
                t0 = time.perf_counter()
                hr = run_one(strategy, attack, seed, args)
                results.setdefault(strategy, {})[attack] = hr
                line = _line(strategy, attack, hr, results, time.perf_counter() - t0)
                print(f"seed {seed} {line}", flush=True)
        shares[seed] = attackers_share(seed, args)
        print(f"seed {seed}: the attackers hold {shares[seed]:.1%} of the users", flush=True)
        changes = mean_changes(by_seed)  # written after every seed: a stopped sweep keeps its part
        # a reflected flip is no longer FedAvg over the honest clients: those runs are no reference
        vs_flip = mean_changes({
            seed: {st: per for st, per in results.items()
                   if not per.get("signflip", {}).get("reflected")}
            for seed, results in by_seed.items()
        }, reference="signflip")  # fmt: skip
        honest = mean_changes(_honest_only(by_seed))
        out.write_text(json.dumps({
            "args": vars(args), "hr@10": by_seed, "attackers_user_share": shares,
            "change_vs_own_clean": changes, "change_vs_own_signflip": vs_flip,
            "honest_users_change_vs_own_clean": honest,
        }, indent=2))  # fmt: skip
    _table(f"against the same strategy's clean run, over {len(by_seed)} seed(s)", changes)
    _table("on the honest clients' test users only, against the same strategy's clean run", honest)
    _table("against the same strategy's sign-flip run (FedAvg over the honest clients alone, the\n"
           "best a defence that drops them can do, only when that run rejected every flipped "
           "update\nand reflected none)", vs_flip)  # fmt: skip
    print(f"results: {out}")


def attackers_share(seed: int, args: argparse.Namespace) -> float:
    """The share of all users that the attacking clients of ``seed`` hold."""
    work = build_workload(load_config(None, _data_over(seed, args)))
    sizes = [work.client_data(c).n_users for c in range(work.partition.n_clients)]
    plan = FaultPlan(attack_share=args.attack_share, seed=seed)
    return sum(sizes[c] for c in plan.attackers(len(sizes))) / sum(sizes)


def _honest_only(by_seed: dict) -> dict:
    """``by_seed`` with each run's HR@10 on the honest clients' users in place of all users'."""
    return {
        seed: {st: {a: hr["honest"] for a, hr in per.items()} for st, per in results.items()}
        for seed, results in by_seed.items()
    }


def _table(title: str, changes: dict) -> None:
    if not changes:
        return
    print(f"\nrelative change of test HR@10 {title}; mean +- its standard error (over seeds) "
          "[smallest, largest]:")
    for strategy, per_attack in changes.items():
        for attack, per_task in per_attack.items():
            cells = [
                f"{t} {c['mean']:+.1%} +-{c['sem']:.1%} [{c['min']:+.1%}, {c['max']:+.1%}]"
                for t, c in per_task.items()
            ]
            print(f"{strategy:13} {attack:8} " + "  ".join(cells))


def mean_changes(
    by_seed: dict[int, dict[str, dict[str, dict[str, float]]]], reference: str = "clean"
) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """{strategy: {attack: {task: {mean, sem, min, max, seeds}}}} of (attacked - ref) / ref over seeds,
    ref the same strategy's ``reference`` run of the same seed."""
    rel: dict[tuple[str, str, str], list[float]] = {}
    for results in by_seed.values():
        for strategy, per_attack in results.items():
            if reference not in per_attack:
                continue
            clean = per_attack[reference]
            for attack, hr in per_attack.items():
                if attack == reference:
                    continue
                for t in TASKS:
                    rel.setdefault((strategy, attack, t), []).append((hr[t] - clean[t]) / clean[t])
    changes: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for (strategy, attack, t), values in rel.items():
        changes.setdefault(strategy, {}).setdefault(attack, {})[t] = {
            "mean": float(np.mean(values)),
            # the standard error of the mean over seeds (0 with one seed: no spread measured)
            "sem": float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0,
            "min": min(values),
            "max": max(values),
            "seeds": len(values),
        }
    return changes


def _line(strategy: str, attack: str, hr: dict, results: dict, seconds: float) -> str:
    own = results[strategy]["clean"]
    ref = results.get("fedavg", {}).get("clean", {})
    cells = [
        f"{t} {hr[t]:.4f} ({_rel(hr[t], own[t])} own clean, {_rel(hr[t], ref.get(t))} FedAvg clean)"
        for t in TASKS
    ]
    honest = " ".join(f"{hr['honest'][t]:.4f}" for t in TASKS)
    screened = "".join(f", {hr[k]} {k}" for k in ("rejected", "rescaled", "reflected") if hr.get(k))
    return (
        f"{strategy:13} {attack:8} " + "  ".join(cells)
        + f"  honest users {honest}  [{seconds:.0f} s{screened}]"
    )


def _rel(value: float, ref: float | None) -> str:
    return "n/a" if not ref else f"{100 * (value - ref) / ref:+.1f}%"


if __name__ == "__main__":
    main()
