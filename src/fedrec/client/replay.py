"""Send a DP release again rather than make a second one, after a server crash.

A record-level client keeps its last reply (the noised update, its metrics and its ledger lines)
in ``<ledger folder>/releases/<client>.{safetensors,json}``, written after its ledger lines and
before the reply leaves. If the server dies before it aggregates, the resumed server asks for
the same round with the same global model: the client sends the kept reply. The same output
released twice tells no more than once (post-processing, Dwork & Roth 2014, Prop. 2.1), and the
ledger already holds its lines. Any other round or global model is a new release: train,
account, ledger. Only the last reply per client is kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from safetensors.numpy import load_file, save_file

from fedrec.strategies.records import ARRAYS_KEY

log = logging.getLogger(__name__)
DIRNAME = "releases"


def arrays_digest(record: ArrayRecord) -> str:
    """SHA-256 over keys, dtypes, shapes and values, in order (not the wire bytes)."""
    h = hashlib.sha256()
    for key, arr in record.items():
        values = np.ascontiguousarray(arr.numpy())
        h.update(f"{key}|{values.dtype}|{values.shape}|".encode())
        h.update(values.tobytes())
    return h.hexdigest()


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
