"""Resuming a killed federation from its last checkpoint; the privacy ledger is the truth.

What a resume restores: the global models, the strategy's state (server-optimizer moments, DP
accountants and the adaptive clipping norm one holds), the server's RNG states, the metrics and
round logs of the checkpointed rounds (``metrics.jsonl`` is rewritten to them), and continues at
the next round with the same config.

The ledger is never rewritten. It must extend the checkpoint's position exactly (same line count
at least, same last line, valid chain), or the resume is refused. Lines past that position are
releases made after the checkpoint, typically updates sent in the round the server died in; they
stay in the ledger and count towards epsilon (truncating them would under-report what left the
clients). Each record-level client rebuilds its accountant from its own ledger lines
(client/privacy.py) and re-sends, rather than re-trains, an update it already released for the
same round and global model, so a crash mid-round costs no second release: the resumed run ends
with the ledger (non-random fields) of an uninterrupted one. Under user-level DP the server's
own lines past the checkpoint are composed into Flower's accountant as well.

Under distributed noise an update carries only its client's share of the noise and must never
be in two sums, so it is never re-sent: a resume skips every round the server had begun past
its checkpoint (``checkpoint.mark_round_started`` records each before its first message) and
goes on with the next. The model misses those steps; their releases stay in the ledger.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

from flwr.app import ArrayRecord
from flwr.serverapp import GaussianPrivacyEvent
from flwr.serverapp.strategy import Strategy

from fedrec.config import FedrecConfig
from fedrec.privacy import Ledger
from fedrec.rundir import RunDir, write_metrics
from fedrec.server.checkpoint import (
    Checkpoint,
    CheckpointError,
    LedgerPosition,
    Progress,
    direction_reference_change,
    last_round_started,
    lines_past,
    load_checkpoint,
    restore,
    save_checkpoint,
)

log = logging.getLogger(__name__)
USER_LEVEL_CLIENT = "federation"  # the ledger's client name for server-side (user-level) DP
HOLDER = "serverapp.lock"  # in the run directory: who writes it (a deployed ServerApp)


def check_resumable(run: RunDir, cfg: FedrecConfig) -> int:
    """The round a resume continues after; CheckpointError if the run cannot be resumed."""
    ckpt = resumable_checkpoint(run, cfg)
    return ckpt.progress.round if ckpt else 0


def resumable_checkpoint(run: RunDir, cfg: FedrecConfig) -> Checkpoint | None:
    """The checkpoint a resume continues from (None: killed in round 1, restart from the
    initial models); CheckpointError if the run cannot be resumed."""
    if not run.incomplete_marker().exists() or run.summary.exists():
        raise CheckpointError(f"{run.path}: not an unfinished fedrec run; nothing to resume")
    ckpt = load_checkpoint(run, cfg)
    lines_past(run.ledger, run.path.name, ckpt.ledger if ckpt else LedgerPosition())
    return ckpt


def resume_state(
    run: RunDir, cfg: FedrecConfig, strategy: Strategy, user_ledger, initial: ArrayRecord
) -> tuple[ArrayRecord, Progress]:
    """Load the last checkpoint into ``strategy``; returns the global arrays and the progress.

    Without a checkpoint (killed during round 1) the run restarts from ``initial``, keeping and
    counting the ledger lines already written.
    """
    ckpt = load_checkpoint(run, cfg)
    past = lines_past(run.ledger, run.path.name, ckpt.ledger if ckpt else LedgerPosition())
    progress = ckpt.progress if ckpt else Progress()
    if ckpt is not None:
        restore(ckpt, strategy)
        if change := direction_reference_change(ckpt, cfg):
            log.warning("resuming %s: %s", run.path, change)
    if user_ledger is not None:
        restore_user_ledger(user_ledger)
    entry = {"after_round": progress.round, "ledger_lines_past_checkpoint": past}
    write_metrics(run, progress.rows)
    log.warning(
        "resuming %s after round %d; %d ledger line(s) past the checkpoint kept and counted",
        run.path,
        progress.round,
        past,
    )
    arrays = ckpt.arrays if ckpt else initial
    progress.resumes.append(entry)
    if skipped := rounds_to_skip(run, cfg, progress.round):
        entry["skipped_rounds"] = skipped
        progress.round = skipped[-1]  # consumed: the next round is the one after them
        log.warning(
            "skipping round(s) %s: the server had begun them, and under secure aggregation a "
            "client's update is never sent into a second sum (the two sums' difference would "
            "show it); clients that released them keep those releases in their epsilon",
            ", ".join(map(str, skipped)),
        )
        save_checkpoint(run, cfg, arrays, strategy, progress)  # a second crash keeps the skip
    return arrays, progress


def rounds_to_skip(run: RunDir, cfg: FedrecConfig, checkpointed: int) -> list[int]:
    """The rounds past the checkpoint that a resume must not ask again: under secure
    aggregation, every round the server had begun, since any client may have sent its masked
    update into it. Asked again, a client would send the same update (its kept reply under
    record-level DP, the same seeded training without DP) into a sum over another set of
    survivors, and the two sums' difference would show single updates: unnoised without DP,
    holding only a share of the noise under distributed noise (where each client would refuse
    it anyway: client/privacy.py). Without secure aggregation a client re-sends the update it
    released, which the server has seen already, so those rounds are simply repeated."""
    if not cfg.secure_aggregation:
        return []
    return list(range(checkpointed + 1, last_round_started(run) + 1))


def restore_user_ledger(user_ledger) -> None:
    """Rebuild the server's DP-FedAvg state from its ledger lines; compose into Flower's
    accountant the releases it has not counted (lines written after the checkpoint)."""
    ledger: Ledger = user_ledger.ledger
    lines = [e for e in ledger.read() if e["client"] == USER_LEVEL_CLIENT]
    for e in lines:
        user_ledger.state.record(
            e["task"],
            noise_multiplier=e["noise_multiplier"],
            sample_rate=e["sample_rate"],
            steps=e["steps"],
        )
    wrapper = user_ledger.wrapper
    accountant = wrapper.accountant
    missing = len(lines) - accountant.num_releases
    if missing < 0:
        raise CheckpointError(
            f"{ledger.path}: {len(lines)} DP-FedAvg release(s) in the ledger, but the checkpoint "
            f"counted {accountant.num_releases}: the ledger lost lines"
        )
    for e in lines[len(lines) - missing :]:
        accountant.compose(
            GaussianPrivacyEvent(
                noise_multiplier=e["noise_multiplier"],
                sample_size=wrapper.num_sampled_clients,
                population_size=accountant.config.population_size,
            )
        )
    user_ledger.released = accountant.num_releases
    user_ledger.follow_clipping_norm()  # an adaptive norm came back with the accountant's state


@contextlib.contextmanager
def hold_run(run: RunDir, flower_run_id: int) -> Iterator[None]:
    """Let one ServerApp at a time write ``run`` (a flock, freed when the process dies); the
    file names its Flower run, so ``fedrec server resume`` can tell whether it is still alive."""
    if not run.path.is_dir():
        raise CheckpointError(f"{run.path}: no such run directory")
    fd = os.open(run.path / HOLDER, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise CheckpointError(
                f"{run.path}: another ServerApp is writing this run ({run_holder(run)}); "
                "stop it first"
            ) from err
        os.ftruncate(fd, 0)
        holder = {"flower_run_id": flower_run_id, "pid": os.getpid()}
        os.write(fd, json.dumps(holder).encode())
        yield
    finally:
        os.close(fd)


def run_holder(run: RunDir) -> dict[str, Any] | None:
    """The last ServerApp that held ``run`` (``flower_run_id``, ``pid``, and ``alive``: whether
    it still holds it); None if no deployed ServerApp ever did."""
    path = run.path / HOLDER
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            alive = False
        except BlockingIOError:
            alive = True
        text = path.read_text()
    finally:
        os.close(fd)
    try:
        return {**json.loads(text), "alive": alive}
    except json.JSONDecodeError:
        return {"alive": alive}


def wait_released(run: RunDir, timeout: float) -> bool:
    """Wait (up to ``timeout`` s) until no ServerApp holds ``run``; True if none does."""
    deadline = time.monotonic() + timeout
    while True:
        holder = run_holder(run)
        if holder is None or not holder["alive"]:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)
