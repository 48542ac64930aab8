"""Final results of a run: test metrics, baselines, saved models, summary.json, report.md."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any

from fedrec.baselines import evaluate_all, popularity_metrics, train_central
from fedrec.config import FedrecConfig, fusion_fit_mode, releases_outside_ledger
from fedrec.fusion.dp import DPFusion, dp_fusion_fit
from fedrec.fusion.evaluate import fuse_and_evaluate
from fedrec.fusion.fusers import fuser_from_dict
from fedrec.fusion.pipeline import save_catalogue_digest, save_fuser
from fedrec.fusion.prior import PRIOR, content_prior
from fedrec.models.registry import save_model
from fedrec.report import write_report
from fedrec.rundir import RunDir, finish, read_metrics
from fedrec.server.federation import FederationResult
from fedrec.workload import build_workload

log = logging.getLogger(__name__)


def _fitted_on(cfg: FedrecConfig, result: FederationResult, dp: DPFusion | None) -> str:
    if dp is not None:
        return dp.reason + ("" if dp.fuser else "; equal weights over the task models instead")
    if fusion_fit_mode(cfg) == "fixed":
        why = " under DP" if cfg.fusion_fit == "auto" else ""
        return f"no data: equal weights over the task models (fusion_fit = {cfg.fusion_fit}{why})"
    if result.fusion is None:
        return "the server's validation users (99 sampled negatives each)"
    f = result.fusion
    return (f"federated: {f.users} validation users of {f.clients} clients, sums only "
            f"({f.failed} clients did not answer); validation NDCG@10 {f.validation_ndcg:.4f}")


def write_outputs(
    cfg: FedrecConfig, run: RunDir, result: FederationResult, *, baselines: bool, on_stage=None
) -> dict[str, Any]:
    """Evaluate the final global models on the test split and write the run's files."""
    work = build_workload(cfg)
    stage = on_stage or (lambda name: None)
    stage("final evaluation (test split)")
    t0 = time.perf_counter()
    tasks = evaluate_all(result.models, work.test, full_ranking=cfg.eval_full_ranking)
    eval_seconds = result.eval_seconds + time.perf_counter() - t0
    for task, model in result.models.items():
        save_model(model, run.models / task)
    save_catalogue_digest(run.path, work.dataset.items["item_id"])
    mode = fusion_fit_mode(cfg)
    stage({"fixed": "fusion (equal weights, measured on test)",
           "dp": "fusion (one DP release of validation sums, measured on test)"}.get(
        mode, "fusion (fitted on validation users, measured on test)"))  # fmt: skip
    for release in releases_outside_ledger(cfg):
        log.warning("this DP run releases %s", release)
    chosen = result.fusion.fuser if result.fusion else None
    dp = None
    if mode == "dp":  # deployed: the sites' own releases; simulated: one release here
        site = result.site_fusion
        dp = site.dp if site else dp_fusion_fit(cfg, run, work, result.models)
    if dp is not None:
        chosen = dp.fuser
        if dp.fuser is None:
            log.warning("%s; fusing with equal weights", dp.reason)
    fixed = mode == "fixed" or (dp is not None and dp.fuser is None)
    scorers = dict(result.models)
    prior = content_prior(cfg, work)
    if prior is not None:  # public text, untrained: saved beside the task models for serving
        scorers[PRIOR] = prior
        save_model(prior, run.models / PRIOR)
    fusion = fuse_and_evaluate(
        scorers,
        work,
        method="average" if fixed else "weighted",  # the fit of "average" reads no data
        seed=cfg.seed,
        chosen=chosen,
        tasks=list(result.models),
        private=cfg.privacy.mode != "none",  # no exact popularity in a DP run's fused model
    )
    save_fuser(run.path, fuser_from_dict(fusion["fusion"]["state"]))
    summary: dict[str, Any] = {
        "dataset": work.dataset.name,
        "partition": cfg.partition,
        "clients": work.partition.n_clients,
        "rounds": result.rounds_completed,
        "rounds_planned": cfg.rounds,
        "stopped_early": result.stopped_early,
        "strategy": cfg.strategy,
        "split": "test",
        "tasks": tasks,
        "fused": fusion["fused"],
        "fusion": {
            **{k: v for k, v in fusion["fusion"].items() if k != "state"},
            "fitted_on": _fitted_on(cfg, result, dp),
            "per_method": fusion["per_method"],
        },
        "timing": _timing(result, eval_seconds),
        "client_failures": [
            {"round": r, "node": node, "code": code, "reason": reason}
            for r, rlog in sorted(result.rounds.items())
            for node, code, reason in rlog.failures
        ],
        **_fault_summary(result),
    }
    if baselines:
        stage("baselines: popularity")
        summary["baselines"] = {
            "popularity": popularity_metrics(work, work.test, full_ranking=cfg.eval_full_ranking)
        }
        stage("baselines: centralized training")
        t1 = time.perf_counter()
        central = train_central(cfg, work)
        summary["baselines"]["central"] = evaluate_all(
            central, work.test, full_ranking=cfg.eval_full_ranking
        )
        summary["timing"]["central_seconds"] = time.perf_counter() - t1
        summary["relative_to_central"] = {
            task: _ratio(tasks[task]["hr@10"], summary["baselines"]["central"][task]["hr@10"])
            for task in tasks
        }
    if result.secure_rounds is not None:
        summary["secure_aggregation"] = {"rounds": result.secure_rounds}
    if cfg.privacy.mode != "none":
        received = [e for _, rlog in sorted(result.rounds.items()) for e in rlog.ledger_entries]
        received += result.site_fusion.ledger_entries if result.site_fusion else []
        summary["privacy"] = privacy_summary(cfg, run, received)
    write_report(run, summary, read_metrics(run))
    finish(run, summary)
    return summary


def _fault_summary(result: FederationResult) -> dict[str, Any]:
    """Screened-out updates (node and reason, and a count per round) and resumes, if any."""
    out: dict[str, Any] = {
        "rejected_updates": [
            {"round": r, "node": node, "reason": reason}
            for r, rlog in sorted(result.rounds.items())
            for node, reason in rlog.rejected
        ],
        "rejected_per_round": {
            str(r): len(rlog.rejected) for r, rlog in sorted(result.rounds.items())
        },
    }
    rescaled = [
        {"round": r, "node": node, "reason": reason}
        for r, rlog in sorted(result.rounds.items())
        for node, reason in rlog.rescaled
    ]
    if rescaled:
        out["rescaled_updates"] = rescaled
    if result.resumes:
        out["resumes"] = result.resumes
    if result.skipped_rounds:
        out["skipped_rounds"] = result.skipped_rounds
    if unchanged := [r for r, rlog in sorted(result.rounds.items()) if not rlog.aggregated]:
        # counted in "rounds" (the round ran) but the global model did not move
        out["rounds_without_update"] = unchanged
    if result.registered_users:  # the counts weights were capped at: docs/partner-site.md
        out["registered_users"] = {str(n): c for n, c in result.registered_users.items()}
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def _timing(result: FederationResult, eval_seconds: float) -> dict[str, float]:
    """Wall time and the share outside local training and evaluation (framework overhead).

    Local training time on the critical path is estimated as the summed client training seconds
    of each round divided by the number of clients that ran in parallel (one per core).
    """
    import os

    parallel = max(1, min(os.cpu_count() or 1, 2))
    train = sum(
        sum(v for k, v in r.metrics.items() if k.endswith("train-seconds"))
        for r in result.rounds.values()
    )
    train_critical = train / parallel
    overhead = max(0.0, result.seconds - train_critical - result.eval_seconds)
    return {
        "federation_seconds": result.seconds,
        "client_train_seconds_total": train,
        "client_train_seconds_critical_path": train_critical,
        "server_eval_seconds": eval_seconds,
        "framework_overhead_seconds": overhead,
        "framework_overhead_share": overhead / result.seconds if result.seconds else float("nan"),
    }


UNITS = {
    "record": "a user's history at one client (DP-SGD on each client; implies record-level)",
    "user": "a client = one user's device (DP-FedAvg, server-side clipping, no amplification)",
}


def _received_entries(received: Sequence[str]) -> list[dict[str, Any]]:
    """The ledger lines clients sent, parsed; a line that is not a ledger entry (a buggy or
    hostile client) is logged and skipped rather than failing the run's outputs."""
    from fedrec.privacy.entry import field_problems

    out = []
    for line in received:
        try:
            entry = json.loads(line)
            ok = isinstance(entry, dict) and not field_problems(entry)  # the ledger's own check
        except ValueError:
            ok = False
        if ok:
            out.append(entry)
        else:
            log.warning("a received ledger line is not a ledger entry; skipped: %.120s", line)
    return out


def privacy_summary(
    cfg: FedrecConfig, run: RunDir, received: Sequence[str] = ()
) -> dict[str, Any]:
    """Cumulative epsilon per client (per task and composed), from the ledger's last entries.

    Deployed, the clients keep their ledgers on their sites and the run's own file stays empty
    (record-level DP): the figures then come from the ledger lines the clients sent with their
    replies (``received``), and ``source`` says so: the sites' ledgers are what to audit."""
    from fedrec.privacy import read_ledger
    from fedrec.server.checkpoint import ledger_position

    per_client: dict[str, dict[str, float]] = {}
    entries = read_ledger(run.ledger) if run.ledger.exists() else []
    source = "run ledger"
    # the head of the finished ledger, kept apart from it: `fedrec audit` then detects lines
    # removed from its end, which the chain alone cannot (a shorter chain is still a chain)
    end = ledger_position(run.ledger) if entries else None
    if not entries and received:
        entries = _received_entries(received)
        source = (
            "ledger lines received with the clients' replies: a lower bound (a release whose "
            "reply never arrived is only in its site's ledger; audit the sites' ledgers)"
        )
    for entry in entries:  # cumulative figures: the largest is the latest (received lines may
        client = per_client.setdefault(entry["client"], {})  # come in any order or be stale)
        for key, eps in ((entry["task"], entry["epsilon"]), ("composed", entry["epsilon_composed"])):
            client[key] = max(client.get(key, 0.0), eps)
    composed = [c["composed"] for c in per_client.values()]
    return {
        "mode": cfg.privacy.mode,
        "unit": UNITS[cfg.privacy.mode],
        **({"noise": "distributed", "min_contributors": cfg.privacy.min_contributors}
           if cfg.privacy.distributed else {}),  # fmt: skip
        "delta": cfg.privacy.delta,
        "budget_epsilon": cfg.privacy.epsilon,
        "max_epsilon": max(composed) if composed else 0.0,
        "accountant": entries[-1]["accountant"] if entries else cfg.privacy.accountant,
        "per_client": per_client,
        "source": source if entries else "none (no release recorded)",
        **({"ledger_lines": end.lines, "ledger_head": end.head} if end else {}),
        "outside_ledger": releases_outside_ledger(cfg),
    }
