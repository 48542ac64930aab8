"""Send a DP release again rather than make a second one, after a server crash.

A record-level client keeps its last reply (the noised update, its metrics and its ledger lines)
in ``<ledger folder>/releases/<client>.{safetensors,json}``, written after its ledger lines and
before the reply leaves. If the server dies before it aggregates, the resumed server asks for
the same round with the same global model: the client sends the kept reply. The same output
released twice tells no more than once (post-processing, Dwork & Roth 2014, Prop. 2.1), and the
ledger already holds its lines. Any other round or global model is a new release: train,
account, ledger. Only the last reply per client is kept.

One release at a time per client: ``release_lock`` holds an exclusive ``flock`` on
``<ledger folder>/releases/<client>.lock`` from reading the ledger to keeping the reply. A
ClientApp still training for the stopped run when the resumed server asks its site for the same
round would otherwise release that round a second time, both computed from the ledger as it was
before either (so the second line's cumulative epsilon would leave out the first). With the lock
the second waits, then finds the first's reply kept and sends it again. The OS frees the lock
when a process dies, so a killed ClientApp never blocks its site.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from safetensors.numpy import load_file, save_file

from fedrec.strategies.records import ARRAYS_KEY

log = logging.getLogger(__name__)
DIRNAME = "releases"


@contextmanager
def release_lock(ledger_path: str | os.PathLike[str], client: str) -> Iterator[None]:
    """Hold ``client``'s release lock (see the module docstring); waits for another holder."""
    folder = Path(ledger_path).parent / DIRNAME
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{client}.lock", "a") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("%s: another process of this client is releasing; waiting for it", client)
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@dataclass(frozen=True)
class ReleaseCache:
    folder: Path
    client: str

    @property
    def _arrays(self) -> Path:
        return self.folder / f"{self.client}.safetensors"

    @property
    def _meta(self) -> Path:
        return self.folder / f"{self.client}.json"

    def save(self, server_round: int, global_digest: str, content: RecordDict) -> None:
        """Keep ``content`` as the release of ``server_round`` made from ``global_digest``."""
        self.folder.mkdir(parents=True, exist_ok=True)
        record = content.array_records[ARRAYS_KEY]
        tmp = self._arrays.with_name(self._arrays.name + ".tmp")
        save_file({k: np.ascontiguousarray(v.numpy()) for k, v in record.items()}, str(tmp))
        os.replace(tmp, self._arrays)
        meta = {
            "round": server_round,
            "global": global_digest,
            "keys": list(record.keys()),
            "arrays_sha256": hashlib.sha256(self._arrays.read_bytes()).hexdigest(),
            "metrics": dict(content.metric_records["metrics"].items()),
            "ledger": [str(e) for e in cast(list, content.config_records["ledger"]["entries"])],
        }
        tmp = self._meta.with_name(self._meta.name + ".tmp")
        tmp.write_text(json.dumps(meta, sort_keys=True))
        os.replace(tmp, self._meta)

    def load(self, server_round: int, global_digest: str) -> tuple[RecordDict, list[str]] | None:
        """The kept reply for this round and global model, with its ledger lines, or None."""
        try:
            meta = json.loads(self._meta.read_text())
            if meta["round"] != server_round or meta["global"] != global_digest:
                return None
            if hashlib.sha256(self._arrays.read_bytes()).hexdigest() != meta["arrays_sha256"]:
                raise ValueError("arrays do not match their hash")
            values = load_file(str(self._arrays))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError) as err:
            log.warning("%s: kept release unusable (%s); training anew", self.client, err)
            return None
        content = RecordDict(
            {
                ARRAYS_KEY: ArrayRecord({k: Array(values[k]) for k in meta["keys"]}),
                "metrics": MetricRecord(meta["metrics"]),
                "ledger": ConfigRecord({"entries": meta["ledger"]}),
            }
        )
        return content, meta["ledger"]
