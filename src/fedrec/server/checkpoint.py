"""Per-round checkpoints of a federation, and what resuming from one must check.

``<run>/checkpoint/`` after every round:

- ``models-rNNNN.safetensors``: the global ArrayRecord, every task's model (keys ``task/param``);
- ``server-rNNNN.safetensors``: the strategy's arrays (server-optimizer moments; the model the
  round was sent, where the update screen may reflect updates: its last step) and the
  server's numpy and torch RNG states;
- ``checkpoint.json``: the manifest: round, config hash, file hashes, Python's RNG state (Flower
  samples clients with it), DP accountant states, the metrics and round logs so far, the
  privacy ledger's position (its line count and the SHA-256 of its last line), and the update
  screen's direction reference (a checkpoint of an earlier fedrec has none: its run resumes
  under the current reference, with a warning, since the rule is no config setting).

Atomic: the array files get new names every round and are fsynced before the manifest replaces
the old one (``os.replace``); files the manifest does not name are deleted afterwards. A crash at
any moment leaves the previous checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import Strategy
from safetensors.numpy import load_file, save_file

from fedrec.config import ConfigError, FedrecConfig, load_config
from fedrec.privacy.ledger import line_hash, read_locked, verify_chain
from fedrec.rundir import RunDir, write_bytes_atomic
from fedrec.strategies import RoundLog
from fedrec.strategies.screen import DIRECTION_REFERENCE, REFLECT_RULE, direction_rule_on
from fedrec.strategies.state import load_strategy_state, strategy_state

DIRNAME = "checkpoint"
MANIFEST = "checkpoint.json"
STARTED = "started.json"  # the last round the server began, written before its first message
VERSION = 1


class CheckpointError(ConfigError):
    """A run cannot be resumed as asked; the message says why and what to do."""


@dataclass(frozen=True)
class LedgerPosition:
    lines: int = 0
    head: str = ""  # SHA-256 of the last line ("" for an empty or missing ledger)


@dataclass
class Progress:
    """What a run has done so far; saved with every checkpoint and restored on resume."""

    round: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)  # the metrics.jsonl rows
    rounds: dict[int, RoundLog] = field(default_factory=dict)
    seconds: float = 0.0  # federation wall time of earlier processes (before a resume)
    eval_seconds: float = 0.0
    resumes: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Checkpoint:
    progress: Progress
    arrays: ArrayRecord
    ledger: LedgerPosition
    strategy_arrays: dict[str, np.ndarray]
    strategy_meta: dict[str, Any]
    rng: dict[str, Any]
    direction_reference: str | None = None  # None: written by a fedrec that did not record it
    reflect_rule: str | None = None  # None: written before reflection asked the last step


def checkpoint_dir(run: RunDir) -> Path:
    return run.path / DIRNAME


def save_checkpoint(
    run: RunDir, cfg: FedrecConfig, arrays: ArrayRecord, strategy: Strategy, progress: Progress
) -> Path:
    """Write the checkpoint after round ``progress.round``; returns the manifest's path."""
    folder = checkpoint_dir(run)
    folder.mkdir(exist_ok=True)
    tag = f"r{progress.round:04d}"
    s_arrays, s_meta = strategy_state(strategy)
    server = {f"strategy|{k}": v for k, v in s_arrays.items()} | _rng_arrays()
    files = {
        "models": _write_arrays(folder / f"models-{tag}.safetensors", _numpy(arrays)),
        "server": _write_arrays(folder / f"server-{tag}.safetensors", server),
    }
    manifest = {
        "version": VERSION,
        "round": progress.round,
        "rounds_planned": cfg.rounds,
        "config_sha256": config_hash(cfg),
        "direction_reference": DIRECTION_REFERENCE,
        "reflect_rule": REFLECT_RULE,
        "files": files,
        "model_keys": list(arrays.keys()),
        "strategy": s_meta,
        "python_random": _python_random_state(),
        "ledger": dataclasses.asdict(ledger_position(run.ledger)),
        "progress": _progress_to_json(progress),
    }
    write_bytes_atomic(folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
    keep = {MANIFEST, STARTED, *(f["name"] for f in files.values())}
    for stale in folder.iterdir():
        if stale.name not in keep:
            stale.unlink()
    return folder / MANIFEST


def load_checkpoint(run: RunDir, cfg: FedrecConfig) -> Checkpoint | None:
    """The run's last checkpoint (None if it has none); CheckpointError if it does not fit."""
    path = checkpoint_dir(run) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable ({err}); the checkpoint is damaged") from err
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {manifest.get('version')!r} unknown")
    # a checkpoint written while direction_outliers defaulted to "reject" (it records no
    # reflect_rule) was hashed as that fedrec wrote the config; a newer one only as this one does
    hashes = {config_hash(cfg)} | (set() if "reflect_rule" in manifest
                                   else {_legacy_config_hash(cfg)})
    if manifest["config_sha256"] not in hashes:
        raise CheckpointError(
            f"{path}: written under another config; resume with the run's own config.toml "
            "(a run started by an older fedrec, whose config had fewer settings, must be "
            "resumed by that version)"
        )
    models = _read_arrays(path.parent, manifest["files"]["models"])
    server = _read_arrays(path.parent, manifest["files"]["server"])
    arrays = ArrayRecord({k: Array(models[k]) for k in manifest["model_keys"]})
    return Checkpoint(
        progress=_progress_from_json(manifest["progress"]),
        arrays=arrays,
        ledger=LedgerPosition(**manifest["ledger"]),
        strategy_arrays={k[9:]: v for k, v in server.items() if k.startswith("strategy|")},
        strategy_meta=manifest["strategy"],
        rng={
            "python": manifest["python_random"],
            **{k: v for k, v in server.items() if k.startswith("rng|")},
        },
        direction_reference=manifest.get("direction_reference"),
        reflect_rule=manifest.get("reflect_rule"),
    )


def direction_reference_change(ckpt: Checkpoint, cfg: FedrecConfig) -> str | None:
    """What to tell whoever resumes a run checkpointed under another direction rule of the
    update screen than this fedrec's: another reference, or another rule for reflecting (None:
    the same, or the rule is off for the run: under DP, under secure aggregation, or switched
    off)."""
    if not direction_rule_on(cfg):
        return None
    changes = []
    if ckpt.direction_reference != DIRECTION_REFERENCE:
        was = (repr(ckpt.direction_reference) if ckpt.direction_reference is not None else
               "unrecorded (a fedrec before 0394144; before b6170df it was the median of all "
               "replies, the judged one's included)")  # fmt: skip
        changes.append(
            f"the checkpoint's update-screen direction reference is {was}; the rounds left are "
            f"judged against {DIRECTION_REFERENCE!r} (strategies/screen.py), so they may reject "
            "other updates than the fedrec that began the run would have"
        )
    if cfg.direction_outliers == "reflect" and ckpt.reflect_rule != REFLECT_RULE:
        changes.append(
            "the checkpoint records no reflect rule: it was written by a fedrec before "
            "reflection asked the global model's last step, whose default was "
            "direction_outliers = 'reject' (a run that did not set it rejected every update "
            "below the direction rule); the rounds left keep a clear flip negated "
            "(strategies/screen.py). To keep rejecting, set direction_outliers = \"reject\" in "
            "the run's config.toml"
        )
    return "; ".join(changes) or None


def restore(ckpt: Checkpoint, strategy: Strategy) -> None:
    """Put the strategy's state and the server's RNG states back as they were after the round."""
    load_strategy_state(strategy, ckpt.strategy_arrays, ckpt.strategy_meta)
    version, internal, gauss = ckpt.rng["python"]
    random.setstate((version, tuple(internal), gauss))
    key = ckpt.rng["rng|numpy"]
    # the Gaussian numpy caches from the pair it drew last (absent from older checkpoints)
    has_gauss, cached = ckpt.rng.get("rng|numpy-gauss", np.zeros(2))
    np.random.set_state(
        ("MT19937", key[:-1].astype(np.uint32), int(key[-1]), int(has_gauss), float(cached))
    )
    torch.set_rng_state(torch.from_numpy(ckpt.rng["rng|torch"].copy()))


def resume_config(run_dir: str | os.PathLike[str]) -> FedrecConfig:
    """The config of an unfinished run, read from its ``config.toml``."""
    run = RunDir(Path(run_dir))
    if not run.config.is_file():
        raise CheckpointError(f"{run.path}: no config.toml; not a fedrec run directory")
    if run.summary.exists():
        raise CheckpointError(f"{run.path}: the run has finished (summary.json); nothing to resume")
    try:
        return load_config(run.config)
    except ConfigError as err:
        raise CheckpointError(f"{run.config}: {err}") from err


def ledger_position(path: Path) -> LedgerPosition:
    lines = _ledger_lines(path)
    return LedgerPosition(len(lines), line_hash(lines[-1]) if lines else "")


def lines_past(path: Path, run_id: str, saved: LedgerPosition) -> int:
    """Ledger lines written after the checkpoint; CheckpointError unless the ledger extends it.

    The ledger is append-only and never rewritten: lines past the checkpoint are releases that
    happened (a client sent an update the server never aggregated) and stay, counted.
    """
    lines = _ledger_lines(path)
    if len(lines) < saved.lines:
        raise CheckpointError(
            f"{path}: {len(lines)} line(s), but the checkpoint saw {saved.lines}: the ledger was "
            "truncated; restore it from a backup, resuming would hide spent epsilon"
        )
    if saved.lines and line_hash(lines[saved.lines - 1]) != saved.head:
        raise CheckpointError(
            f"{path}: line {saved.lines} is not the one the checkpoint saw: the ledger was rewritten"
        )
    if lines:
        report = verify_chain(b"".join(lines), run_id=run_id)
        if not report.ok:
            raise CheckpointError(f"{path}: the chain does not verify: {report.problems[0]}")
    return len(lines) - saved.lines


def config_hash(cfg: FedrecConfig) -> str:
    return _digest(cfg.to_dict())


def _legacy_config_hash(cfg: FedrecConfig) -> str:
    """The config's hash as a fedrec wrote it while direction_outliers defaulted to "reject"
    (the key written only when "reflect"): the runs it checkpointed resume."""
    data = cfg.to_dict()
    data.pop("direction_outliers", None)
    if cfg.direction_outliers == "reflect":
        data["direction_outliers"] = "reflect"
    return _digest(data)


def _digest(config: dict[str, Any]) -> str:
    """SHA-256 of a config's dict as ``FedrecConfig.to_json`` writes it (sorted keys)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _ledger_lines(path: Path) -> list[bytes]:
    """The complete lines (a half-written last line is not one)."""
    if not path.exists():
        return []
    return [line + b"\n" for line in read_locked(path).split(b"\n")[:-1]]


def _numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v.numpy()) for k, v in arrays.items()}


def _rng_arrays() -> dict[str, np.ndarray]:
    _, key, pos, has_gauss, cached = cast(tuple, np.random.get_state())
    return {
        "rng|numpy": np.append(key.astype(np.int64), pos),
        "rng|numpy-gauss": np.array([has_gauss, cached], dtype=np.float64),
        "rng|torch": torch.get_rng_state().numpy().copy(),
    }


def _python_random_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _write_arrays(path: Path, arrays: dict[str, np.ndarray]) -> dict[str, str]:
    tmp = path.with_name(path.name + ".tmp")
    save_file(arrays, str(tmp))
    _fsync(tmp)
    os.replace(tmp, path)
    return {"name": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def _read_arrays(folder: Path, spec: dict[str, str]) -> dict[str, np.ndarray]:
    path = folder / spec["name"]
    if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != spec["sha256"]:
        raise CheckpointError(f"{path}: missing or damaged (hash mismatch)")
    return load_file(str(path))


def mark_round_started(run: RunDir, server_round: int) -> None:
    """Record that ``server_round`` begins, before any of its messages leaves: a resume then
    knows which rounds past its checkpoint the clients may already have released."""
    folder = checkpoint_dir(run)
    folder.mkdir(exist_ok=True)
    write_bytes_atomic(folder / STARTED, json.dumps({"round": server_round}).encode())


def last_round_started(run: RunDir) -> int:
    """The last round ``mark_round_started`` recorded (0: none, or a run older than it)."""
    path = checkpoint_dir(run) / STARTED
    return int(json.loads(path.read_text())["round"]) if path.is_file() else 0


def _fsync(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _progress_to_json(p: Progress) -> dict[str, Any]:
    data = dataclasses.asdict(p)
    data["rounds"] = [dataclasses.asdict(r) for _, r in sorted(p.rounds.items())]
    return data


def _progress_from_json(data: dict[str, Any]) -> Progress:
    rounds = {}
    for r in data["rounds"]:
        r["failures"] = [tuple(f) for f in r["failures"]]
        r["rejected"] = [tuple(x) for x in r["rejected"]]
        r["rescaled"] = [tuple(x) for x in r.get("rescaled", [])]  # absent before rescaling
        rounds[r["round"]] = RoundLog(**r)
    return Progress(**{**data, "rounds": rounds})
