"""fedrec's Flower ServerApp. Thin: it resolves the config and calls run_federation.

``app`` serves ``flwr run`` (config from the run_config, kebab-case keys); the simulation builds
its own ServerApp around an already-resolved config with ``make_server_app``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedrec.config import FedrecConfig, from_dict, from_json
from fedrec.rundir import RunDir, create_run_dir
from fedrec.server.federation import FederationResult, OnRound, run_federation
from fedrec.server.outputs import write_outputs


def make_server_app(
    cfg: FedrecConfig,
    run: RunDir,
    on_round: OnRound | None = None,
    on_done: Callable[[FederationResult], None] | None = None,
    resume: bool = False,
) -> ServerApp:
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        result = run_federation(grid, cfg, run, on_round, resume=resume)
        if on_done is not None:
            on_done(result)

    return server


RUN_CONFIG_KEY = "fedrec-config"  # `fedrec server run` sends the resolved config as JSON here


def config_from_run_config(run_config: Mapping[str, Any]) -> FedrecConfig:
    """The whole config as JSON under RUN_CONFIG_KEY (Flower takes only declared run-config keys,
    so ``fedrec server run`` declares this one), else one kebab-case key per field."""
    if RUN_CONFIG_KEY in run_config:
        return from_json(str(run_config[RUN_CONFIG_KEY]))
    return from_dict(
        {k: v for k, v in run_config.items() if k != "num-server-rounds"}
        | {"rounds": int(run_config.get("num-server-rounds", 10))}
    )


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run``: config from [tool.flwr.app.config] and --run-config."""
    cfg = config_from_run_config(context.run_config)
    run = create_run_dir(cfg)
    result = run_federation(grid, cfg, run)
    write_outputs(cfg, run, result, baselines=False)
