"""``fedrec text adapt``: the federated adapter stage on Flower's simulation engine, and its outputs.

Writes ``adapter.safetensors`` (A/B arrays only), ``privacy_ledger.jsonl`` (one entry per client
per round, task ``text-adapter``; ``fedrec audit DIR`` verifies it) and ``summary.json``: rounds,
each client's final epsilon, the weighted train loss and seconds per round, the array names that
travelled, and a utility check on the validation users: HR@10 (99 sampled negatives) of the
untrained content scorer (fedrec.models.content.ContentRetrieval, as the fusion prior uses it)
over item text from the frozen encoder versus the frozen encoder plus the adapter.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedrec.config import ConfigError, FedrecConfig, TextConfig
from fedrec.privacy import LEDGER_FILENAME, read_ledger, validate_budget
from fedrec.rundir import write_json_atomic
from fedrec.text.adapt import (
    ADAPTER_FILE,
    ADAPTER_TASK,
    AdaptConfig,
    build_local_adapter,
    save_adapter,
)
from fedrec.text.items import item_texts
from fedrec.workload import Workload, build_workload

log = logging.getLogger(__name__)
CONTENT_DIM = 64  # principal axes the untrained content scorer keeps (as fusion/prior.py)


def check_inputs(cfg: FedrecConfig, out: Path) -> Workload:
    """Data, every client, the budget and the output directory, before anything starts."""
    work = build_workload(cfg)
    sizes = [work.client_data(c).n_users for c in range(work.partition.n_clients)]
    if cfg.privacy.mode not in ("record", "none"):
        raise ConfigError(
            f"text adapt supports privacy.mode 'record' (DP-SGD, --epsilon) or 'none', "
            f"got {cfg.privacy.mode!r}"
        )
    if cfg.strategy != "fedavg" or cfg.secure_aggregation:
        raise ConfigError(
            "text adapt aggregates with FedAvg in the clear: drop --strategy and "
            "--secure-aggregation"
        )
    if cfg.privacy.mode == "record":
        validate_budget(
            epsilon=cfg.privacy.epsilon, delta=cfg.privacy.delta, min_records=min(sizes)
        )
    for name in ("summary.json", LEDGER_FILENAME, ADAPTER_FILE):
        if (out / name).exists():
            raise FileExistsError(f"{out / name} exists; pass a new --out directory")
    return work


def simulate_adapter(
    cfg: FedrecConfig,
    acfg: AdaptConfig,
    out: str | Path,
    *,
    on_round: Any = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Run ``cfg.rounds`` adapter rounds over ``cfg``'s partition; write and return the summary."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp

    from fedrec.simulation.run import run_engine, sim_workers
    from fedrec.text.federated import client_app, run_adapter_rounds

    out = Path(out)
    work = check_inputs(cfg, out)
    workers = sim_workers()  # a bad FEDREC_SIM_WORKERS fails here, before anything is written
    out.mkdir(parents=True, exist_ok=True)
    n_clients, run_id, ledger = work.partition.n_clients, out.resolve().name, out / LEDGER_FILENAME
    local = build_local_adapter(cfg.text.model, acfg, tuple(item_texts(work.dataset)), cfg.seed)
    holder: dict[str, Any] = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        holder["r"] = run_adapter_rounds(
            grid,
            cfg,
            acfg,
            local,
            n_clients=n_clients,
            run_id=run_id,
            ledger_path=str(ledger.resolve()),
            on_round=on_round,
        )

    t0 = time.perf_counter()
    run_engine(server, client_app, n_clients, workers, verbose=verbose)
    if "r" not in holder:
        raise RuntimeError("the adapter simulation ended without a result; rerun with --verbose")
    arrays, strategy = holder["r"]
    state = {k: v.numpy() for k, v in arrays.to_torch_state_dict().items()}
    path = save_adapter(
        out / ADAPTER_FILE,
        state,
        acfg,
        base_identity=local.base_identity,
        provenance={"run_id": run_id, "ledger": LEDGER_FILENAME, "dataset": cfg.dataset},
    )
    summary = {
        "kind": ADAPTER_TASK,
        "dataset": cfg.dataset,
        "partition": cfg.partition,
        "clients": n_clients,
        "rounds_planned": cfg.rounds,
        "rounds_completed": sum(1 for r in strategy.rounds.values() if r.replies > 0),
        "seconds": time.perf_counter() - t0,
        "per_round": [_row(r) for r in sorted(strategy.rounds.values(), key=lambda r: r.round)],
        "travelled": _travelled(strategy.rounds.values()),
        "adapter": {**asdict(acfg), "file": path.name, "parameters": _count(state)},
        "privacy": _privacy(cfg, ledger),
        "utility": content_utility(cfg, work, path),
        "config": cfg.to_dict(),
    }
    write_json_atomic(out / "summary.json", summary)
    return summary


def _row(rnd: Any) -> dict[str, Any]:
    """One round of the summary (array names are listed once, under 'travelled')."""
    return {k: v for k, v in asdict(rnd).items() if k not in ("started", "sent", "received")}


def _count(state: dict[str, np.ndarray]) -> int:
    return int(sum(v.size for v in state.values()))


def _travelled(rounds: Any) -> dict[str, list[str]]:
    """Every array name the server sent or received over the run."""
    rounds = list(rounds)
    return {
        "sent": sorted({k for r in rounds for k in r.sent}),
        "received": sorted({k for r in rounds for k in r.received}),
    }


def _privacy(cfg: FedrecConfig, ledger: Path) -> dict[str, Any]:
    """The run's DP settings and each client's final (cumulative) epsilon from the ledger."""
    p = cfg.privacy
    if p.mode != "record":
        return {"mode": p.mode}
    final: dict[str, dict[str, float]] = {}
    for e in read_ledger(ledger) if ledger.exists() else []:
        final[e["client"]] = {
            "epsilon": e["epsilon_composed"],
            "noise_multiplier": e["noise_multiplier"],
            "rounds": final.get(e["client"], {}).get("rounds", 0) + 1,
        }
    return {
        "mode": p.mode,
        "epsilon_budget": p.epsilon,
        "delta": p.delta,
        "accountant": p.accountant,
        "clipping_norm": p.clipping_norm,
        "ledger": LEDGER_FILENAME,
        "clients": dict(sorted(final.items())),
    }


def content_hr10(work: Workload, item_text: np.ndarray) -> float:
    """Validation HR@10 of the untrained ContentRetrieval scorer over ``item_text``."""
    from fedrec.models.registry import build_model
    from fedrec.scoring import evaluate_model

    dim = min(CONTENT_DIM, item_text.shape[1], work.spec.num_items)
    model = build_model(
        "recall", replace(work.spec, dim=dim), arch="content", item_text=torch.tensor(item_text)
    )
    return float(evaluate_model(model.eval(), work.valid, full_ranking=False)["hr@10"])


def content_utility(cfg: FedrecConfig, work: Workload, adapter: Path) -> dict[str, float]:
    """HR@10 of the content scorer: frozen encoder versus frozen encoder + ``adapter``."""
    from fedrec.text.features import item_text_features

    text = TextConfig(mode="content", model=cfg.text.model, max_tokens=cfg.text.max_tokens)
    frozen = item_text_features(text, work.dataset)
    adapted = item_text_features(replace(text, adapter=str(adapter)), work.dataset)
    if frozen is None or adapted is None:
        raise RuntimeError("internal: text features are off in mode 'content'")
    return {
        "frozen_hr@10": content_hr10(work, frozen),
        "adapted_hr@10": content_hr10(work, adapted),
        "valid_users": int(len(work.valid.users)),
    }
