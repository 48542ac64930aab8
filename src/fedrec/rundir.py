"""The run directory: what a person (or an auditor) reads after a run.

config.toml, metrics.jsonl (one line per round and task), privacy_ledger.jsonl, models/<task>/
(safetensors + config), summary.json, report.md with plots. ``summary.json`` is written last and
atomically, so a directory without it is visibly incomplete.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedrec.config import FedrecConfig


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.toml"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def ledger(self) -> Path:
        return self.path / "privacy_ledger.jsonl"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def models(self) -> Path:
        return self.path / "models"

    @property
    def report(self) -> Path:
        return self.path / "report.md"

    def incomplete_marker(self) -> Path:
        return self.path / "INCOMPLETE"


def default_run_path(cfg: FedrecConfig, kind: str = "sim") -> Path:
    base = Path(cfg.dataset).name if "/" in cfg.dataset else cfg.dataset  # a path: its file
    name = base.replace(":", "_").strip("._") or "data"
    return Path("runs") / f"{kind}-{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def create_run_dir(
    cfg: FedrecConfig, path: str | Path | None = None, *, resumable: bool = True
) -> RunDir:
    """Make the directory, write the resolved config, mark it incomplete until finished.
    ``resumable``: whether the command that makes it can continue an unfinished one."""
    run = RunDir(Path(path or cfg.out or default_run_path(cfg)))
    if run.summary.exists():
        raise FileExistsError(f"{run.path}: holds a finished run; pass a new --out directory")
    left = [p.name for p in (run.incomplete_marker(), run.ledger, run.path / "checkpoint")
            if p.exists()]
    if left:  # a new run there would take over its ledger (clients rebuild epsilon from it)
        how = ("continue it with --resume (fedrec server resume when deployed) or "
               if resumable else "delete it or ")  # fmt: skip
        raise FileExistsError(
            f"{run.path}: holds an unfinished run ({', '.join(left)}); {how}pass a new --out "
            "directory"
        )
    run.path.mkdir(parents=True, exist_ok=True)
    run.config.write_text(cfg.to_toml())
    run.incomplete_marker().write_text("this run has not finished (or failed)\n")
    return run


def append_metrics(run: RunDir, rows: Sequence[Mapping[str, Any]]) -> None:
    with run.metrics.open("a") as fh:
        for row in rows:
            fh.write(json.dumps(row, sort_keys=True) + "\n")


def write_metrics(run: RunDir, rows: Sequence[Mapping[str, Any]]) -> None:
    """Replace metrics.jsonl with ``rows`` (a resumed run drops rows its checkpoint lacks)."""
    tmp = run.metrics.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
    os.replace(tmp, run.metrics)


def read_metrics(run: RunDir) -> list[dict[str, Any]]:
    if not run.metrics.exists():
        return []
    return [json.loads(line) for line in run.metrics.read_text().splitlines() if line.strip()]


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all, and durably: after a crash or a power loss it holds
    the old bytes or the new ones (the new file is fsynced before it replaces the old, and the
    folder after)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def finish(run: RunDir, summary: Mapping[str, Any]) -> None:
    write_json_atomic(run.summary, summary)
    run.incomplete_marker().unlink(missing_ok=True)
