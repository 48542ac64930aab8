"""``fedrec simulate``: the real ServerApp and ClientApp on Flower's simulation engine (Ray).

Inputs are checked before anything starts (data, partition, every client non-empty), so a
user's mistake costs one clear line, not a half-written run directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedrec.client.replay import DIRNAME as RELEASES_DIRNAME
from fedrec.config import ConfigError, FedrecConfig, with_contributors
from fedrec.rundir import RunDir, create_run_dir
from fedrec.server.federation import FederationResult, OnRound
from fedrec.simulation.registry import Registrar, simulated_registry
from fedrec.workload import build_workload

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

log = logging.getLogger(__name__)


def check_inputs(cfg: FedrecConfig) -> int:
    """Build the workload and every client's data once; returns the number of clients."""
    work = build_workload(cfg)
    sizes = [
        work.client_data(c).n_users for c in range(work.partition.n_clients)
    ]  # DataError if empty
    if cfg.privacy.mode == "record":
        from fedrec.privacy import validate_budget

        validate_budget(
            epsilon=cfg.privacy.epsilon, delta=cfg.privacy.delta, min_records=min(sizes)
        )
        if cfg.text.mode != "content":
            log.warning(
                "record-level DP with item-ID models: on small silos they fall below popularity "
                "(README, Privacy-utility); --text content trains small models over public "
                "item text instead"
            )
    work.item_text(cfg.text)  # TextError (bad model folder) before any client starts; cached
    return work.partition.n_clients


def simulate(
    cfg: FedrecConfig,
    *,
    baselines: bool = True,
    on_round: OnRound | None = None,
    on_stage: Callable[[str], None] | None = None,
    verbose: bool = False,
    resume_from: str | Path | None = None,
    client_app: ClientApp | None = None,
) -> tuple[RunDir, dict[str, Any]]:
    """Run the federation described by ``cfg``; returns the run directory and its summary.

    ``resume_from``: an unfinished run directory (made with this ``cfg``, see
    ``fedrec.server.checkpoint.resume_config``) to continue from its last checkpoint.
    ``client_app``: another ClientApp, for tests and benchmarks only (fedrec.simulation.faults).
    """
    from fedrec.client.app import app as fedrec_client
    from fedrec.server.app import make_server_app
    from fedrec.server.outputs import write_outputs

    n_clients = check_inputs(cfg)
    workers = sim_workers()  # a bad FEDREC_SIM_WORKERS fails here, before any run directory
    cfg = with_contributors(cfg, n_clients)
    run = _resumable(cfg, resume_from) if resume_from is not None else create_run_dir(cfg)
    holder: dict[str, FederationResult] = {}
    client_app = client_app or fedrec_client
    with contextlib.ExitStack() as stack:
        registered = None
        if cfg.register_users:  # fedrec.simulation.registry
            nodes = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fedrec-nodes-")))
            work = build_workload(cfg)
            users = [work.client_data(c).n_users for c in range(n_clients)]
            registered = simulated_registry(nodes, users)
            client_app = Registrar(client_app, nodes)
        server_app = make_server_app(
            cfg, run, on_round, on_done=lambda r: holder.update(r=r),
            resume=resume_from is not None, registered=registered,
        )  # fmt: skip
        t0 = time.perf_counter()
        run_engine(server_app, client_app, n_clients, workers, verbose=verbose)
    if "r" not in holder:
        raise RuntimeError(f"the simulation ended without a result; see the log ({run.path})")
    log.info("simulation finished in %.1f s", time.perf_counter() - t0)
    summary = write_outputs(cfg, run, holder["r"], baselines=baselines, on_stage=on_stage)
    shutil.rmtree(run.path / RELEASES_DIRNAME, ignore_errors=True)  # only a crash needs them
    return run, summary


SIM_WORKERS_ENV = "FEDREC_SIM_WORKERS"


def sim_workers() -> int:
    """How many simulated clients train at once: one per CPU core, or ``FEDREC_SIM_WORKERS``.

    Each is a Ray actor, a process that imports torch, Opacus and fedrec (4.3 s alone:
    benchmarks/clientapp_start.py) before its first client trains. Where something else
    already fills the cores (several simulations side by side, as the test suite runs them)
    one worker does the same work for less. Results do not depend on it (the server sums each round's updates in a canonical
    order, whatever order the clients finish in) as long as every round ends within
    ``round_timeout``: with fewer workers the clients train more one after another."""
    raw = os.environ.get(SIM_WORKERS_ENV)
    if raw is None:
        return os.cpu_count() or 1
    try:
        workers = int(raw)
    except ValueError:
        workers = 0
    if workers < 1:
        raise ConfigError(f"{SIM_WORKERS_ENV}={raw!r}: give a whole number of workers, 1 or more")
    return workers


def run_engine(
    server_app: ServerApp,
    client_app: ClientApp,
    n_clients: int,
    workers: int,
    *,
    verbose: bool = False,
) -> None:
    """Run a ServerApp and ClientApp on Flower's simulation engine (Ray), one CPU per client
    and ``workers`` clients at a time (``sim_workers()``), Flower and Ray quiet unless
    ``verbose``."""
    from flwr.simulation import run_simulation

    _quiet_flower(verbose)
    backend = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": workers,
            "include_dashboard": False,
            "logging_level": "INFO" if verbose else "ERROR",
            "log_to_driver": verbose,
        },
    }
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=n_clients,
        backend_config=backend,
        verbose_logging=verbose,
    )


def _resumable(cfg: FedrecConfig, path: str | Path) -> RunDir:
    """The run directory to resume; CheckpointError before anything starts if it cannot be."""
    from fedrec.server.resume import check_resumable

    run = RunDir(Path(path))
    done = check_resumable(run, cfg)
    log.warning("resuming %s after round %d of %d", run.path, done, cfg.rounds)
    return run


def _quiet_flower(verbose: bool) -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)
