"""The wire format of a round: all task models in one ArrayRecord, keys prefixed by task.

One flattened record lets every Flower strategy (FedAvg, FedProx, FedAdam, robust ones, the DP
wrappers) aggregate all tasks in one round trip while each key, and so each task's global model,
is aggregated on its own. Only models travel: no user IDs, no interactions, no per-user scores.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict

from fedrec.models.base import TaskModel

ARRAYS_KEY = "arrays"
SEP = "/"
LEDGER_KEY = "ledger"  # a record-level client's ledger lines of the round, beside its update


def summed_metric(name: str) -> bool:
    """Whether a reply's metric is a count or a time, which a round sums (``num-examples``,
    ``*-seconds``, ``*.steps``), rather than a loss, which it averages."""
    return name == "num-examples" or name.endswith(("-seconds", ".steps"))


def ledger_entries(content: RecordDict) -> list | None:
    """The entries of a reply's ledger record as sent, or None when it has none or it is not
    a ConfigRecord holding a list under ``entries``."""
    record = content.config_records.get(LEDGER_KEY)
    entries = record.get("entries") if record is not None else None
    return entries if isinstance(entries, list) else None


def pack(models: Mapping[str, TaskModel]) -> ArrayRecord:
    """One ArrayRecord holding every task model's trainable state, as ``task/param``."""
    flat: OrderedDict[str, torch.Tensor] = OrderedDict()
    for task in sorted(models):  # one canonical order: strategies compare arrays by position
        for name, tensor in _travelling_state(models[task]).items():
            flat[f"{task}{SEP}{name}"] = tensor.detach().cpu()
    return ArrayRecord(flat)


def unpack_into(record: ArrayRecord, models: Mapping[str, TaskModel]) -> None:
    """Load each task's weights from ``record`` into ``models`` (shapes must match exactly)."""
    state = record.to_torch_state_dict()
    for task, model in models.items():
        prefix = f"{task}{SEP}"
        own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        expected = _travelling_state(model)
        if set(own) != set(expected):
            missing = sorted(set(expected) - set(own))[:3]
            raise ValueError(
                f"weights for task '{task}' do not match the model (missing {missing})"
            )
        for name, value in own.items():
            if value.shape != expected[name].shape:
                raise ValueError(
                    f"weights for '{task}{SEP}{name}' have shape {tuple(value.shape)}, "
                    f"expected {tuple(expected[name].shape)}"
                )
        model.load_state_dict(own, strict=False)


def task_keys(record: ArrayRecord, task: str) -> list[str]:
    return [k for k in record if k.startswith(f"{task}{SEP}")]


def _travelling_state(model: TaskModel) -> OrderedDict[str, torch.Tensor]:
    """Trainable parameters only: buffers hold public catalogue metadata every party builds."""
    return OrderedDict((n, p) for n, p in model.named_parameters())


def arrays_digest(record: ArrayRecord) -> str:
    """SHA-256 over keys, dtypes, shapes and values, in order (not the wire bytes)."""
    h = hashlib.sha256()
    for key, arr in record.items():
        values = np.ascontiguousarray(arr.numpy())
        h.update(f"{key}|{values.dtype}|{values.shape}|".encode())
        h.update(values.tobytes())
    return h.hexdigest()
