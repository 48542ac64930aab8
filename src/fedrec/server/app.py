"""fedrec's Flower ServerApp. Thin: it resolves the config and calls run_federation.

``app`` serves ``flwr run`` (config from the run_config, kebab-case keys; with RESUME_KEY set,
it continues that unfinished run directory: ``fedrec server resume``); the simulation builds its
own ServerApp around an already-resolved config with ``make_server_app``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedrec.config import FedrecConfig, from_dict, from_json
from fedrec.rundir import RunDir, create_run_dir
from fedrec.server.federation import FederationResult, OnRound, run_federation
from fedrec.server.outputs import write_outputs
from fedrec.server.resume import check_resumable, hold_run


def make_server_app(
    cfg: FedrecConfig,
    run: RunDir,
    on_round: OnRound | None = None,
    on_done: Callable[[FederationResult], None] | None = None,
    resume: bool = False,
    registered: Callable[[Grid], Mapping[int, int]] | None = None,
) -> ServerApp:
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        result = run_federation(grid, cfg, run, on_round, resume=resume, registered=registered)
        if on_done is not None:
            on_done(result)

    return server


RUN_CONFIG_KEY = "fedrec-config"  # `fedrec server run` sends the resolved config as JSON here
RESUME_KEY = "fedrec-resume"  # `fedrec server resume` sends the run directory to continue here
# `fedrec server run/resume` send the certificate directory (a path on the platform's machine,
# where this ServerApp runs) whose manifest holds partners' registered user counts: the counts
# themselves never enter the run config, which every site can read (fedrec.deploy.registry)
PARTNERS_KEY = "fedrec-partners"


def config_from_run_config(run_config: Mapping[str, Any]) -> FedrecConfig:
    """The whole config as JSON under RUN_CONFIG_KEY (Flower takes only declared run-config keys,
    so ``fedrec server run`` declares this one), else one kebab-case key per field."""
    if RUN_CONFIG_KEY in run_config:
        return from_json(str(run_config[RUN_CONFIG_KEY]))
    return from_dict(
        {
            k: v
            for k, v in run_config.items()
            if k not in ("num-server-rounds", RESUME_KEY, PARTNERS_KEY)
        }
        | {"rounds": int(run_config.get("num-server-rounds", 10))}
    )


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run``: config from [tool.flwr.app.config] and --run-config."""
    cfg = config_from_run_config(context.run_config)
    resume = str(context.run_config.get(RESUME_KEY, ""))
    registered = _registered(str(context.run_config.get(PARTNERS_KEY, "")))
    run = RunDir(Path(resume)) if resume else create_run_dir(cfg)
    with hold_run(run, context.run_id):
        if resume:
            check_resumable(run, cfg)
        result = run_federation(
            grid, cfg, run, resume=bool(resume), registered=registered, deployed=True
        )
        write_outputs(cfg, run, result, baselines=False)


def _registered(certs_dir: str) -> Callable[[Grid], Mapping[int, int]] | None:
    """The grid's nodes -> registered user counts from ``certs_dir``'s manifest (None: no
    directory given, or no partner there has a count). Read before the run starts: an
    unreadable manifest stops the run, it is not run without the cap its operator set."""
    if not certs_dir:
        return None
    from fedrec.deploy.registry import load_registry

    registry = load_registry(certs_dir)
    if not registry.users:
        return None
    return lambda grid: registry.node_users(grid.get_nodes())
