"""``fedrec server resume``: continue a killed deployed run in its own run directory.

Everything is checked on the platform before a new Flower run starts: the directory holds an
unfinished fedrec run whose checkpoint and ledger fit its own ``config.toml``
(fedrec.server.resume.check_resumable), and no earlier ServerApp still writes it. The new Flower
run gets a new Flower run id; fedrec's run id (the directory's name, which the ledger and the
clients' release caches are keyed on) stays the same, so clients rebuild their accountants from
the same ledger lines and re-send, not retrain, an update they already released.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fedrec.config import FedrecConfig
from fedrec.deploy import launch
from fedrec.deploy.errors import DeployError
from fedrec.deploy.server import Site, run_status

RELEASE_WAIT_S = 30.0  # a stopped ServerApp may take a moment to exit and free the directory


@dataclass(frozen=True)
class Resumable:
    path: Path  # absolute: the ServerApp runs in the SuperLink's working directory
    cfg: FedrecConfig
    after_round: int  # the last checkpointed round (0: restart from the initial models)
    notice: str | None = None  # what the rounds left do differently (checkpoint.py), if anything


def resumable_run(run_dir: str | os.PathLike[str]) -> Resumable:
    """The run's own config and checkpoint, checked; CheckpointError (one line) if it cannot be
    resumed: not a run directory, finished, damaged, or written under another config."""
    from fedrec.rundir import RunDir
    from fedrec.server.checkpoint import (
        CheckpointError,
        direction_reference_change,
        resume_config,
    )
    from fedrec.server.resume import resumable_checkpoint

    path = Path(run_dir).expanduser().resolve()
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such run directory")
    cfg = resume_config(path)
    ckpt = resumable_checkpoint(RunDir(path), cfg)
    if ckpt is None:
        return Resumable(path, cfg, 0)
    # for the operator: the ServerApp logs it too, but in the SuperLink's log
    return Resumable(path, cfg, ckpt.progress.round, direction_reference_change(ckpt, cfg))


def check_previous_run(site: Site, path: Path) -> int | None:
    """DeployError while the run's earlier Flower run or its ServerApp is alive (two servers
    writing one run directory would corrupt it); returns that Flower run's id, if known."""
    from fedrec.rundir import RunDir
    from fedrec.server.resume import run_holder, wait_released

    run = RunDir(path)
    holder = run_holder(run)
    if holder is None:
        return None
    previous = holder.get("flower_run_id")
    status = run_status(site, int(previous)) if previous is not None else None
    stop = f"stop it first: flwr stop {previous} {launch.CONNECTION}"
    if status is not None and not status.startswith("finished"):
        raise DeployError(f"{path}: its Flower run {previous} is still {status}; {stop}")
    if not wait_released(run, RELEASE_WAIT_S):
        raise DeployError(
            f"{path}: the ServerApp of Flower run {previous} (pid {holder.get('pid')}) still "
            f"writes it after {RELEASE_WAIT_S:.0f} s; {stop}"
        )
    return None if previous is None else int(previous)
