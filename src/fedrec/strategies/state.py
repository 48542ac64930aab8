"""The state a strategy carries between rounds, as arrays and JSON, for checkpoints.

Flower's strategies keep it in attributes: server-optimizer moments (FedAdam/FedYogi/FedAdagrad
``m_t``, ``v_t``; FedAvgM ``momentum_vector`` and ``current_arrays``) and the DP wrappers'
privacy accountant (``state_dict()``); fedrec's Observed keeps the model it last sent
(``sent_arrays``) where its screen may reflect updates. Wrappers are walked through ``inner``
(fedrec) and ``strategy`` (Flower). Anything else a strategy holds is rebuilt by its
constructor or by the next ``configure_train``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import Strategy

# Flower's, and fedrec's Observed wrapper's last global model (the screen's last step)
ARRAY_ATTRS = ("m_t", "v_t", "momentum_vector", "current_arrays", "sent_arrays")
SEP = "|"  # in array names: "<depth>|<attribute>|<key or index>"


class StrategyStateError(ValueError):
    """A saved strategy state does not fit the strategy it is loaded into."""


def chain(strategy: Strategy) -> Iterator[tuple[int, Strategy]]:
    """The strategy and every strategy it wraps, outermost first, with their depth."""
    depth, obj = 0, strategy  # type: int, Strategy | None
    while obj is not None:
        yield depth, obj
        obj = getattr(obj, "inner", None) or getattr(obj, "strategy", None)
        depth += 1


def strategy_state(strategy: Strategy) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays by name, JSON-safe description and accountant states) of the whole chain."""
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {"chain": [type(s).__name__ for _, s in chain(strategy)], "attrs": {}}
    for depth, obj in chain(strategy):
        for attr in ARRAY_ATTRS:
            value = getattr(obj, attr, None)
            kind, items = _items(value)
            if kind is None:
                continue
            meta["attrs"][f"{depth}{SEP}{attr}"] = {"kind": kind, "keys": list(items)}
            for key, arr in items.items():
                arrays[f"{depth}{SEP}{attr}{SEP}{key}"] = np.ascontiguousarray(arr)
        accountant = getattr(obj, "accountant", None)
        if accountant is not None and hasattr(accountant, "state_dict"):
            meta.setdefault("accountants", {})[str(depth)] = accountant.state_dict()
    return arrays, meta


def load_strategy_state(
    strategy: Strategy, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]
) -> None:
    """Put a saved state back into a freshly built strategy of the same kind."""
    objs = dict(chain(strategy))
    names = [type(s).__name__ for s in objs.values()]
    if names != meta["chain"]:
        raise StrategyStateError(
            f"the checkpoint holds the state of {' > '.join(meta['chain'])}, not of "
            f"{' > '.join(names)}: resume with the run's own config"
        )
    for name, spec in meta["attrs"].items():
        depth, attr = name.split(SEP)
        values = {k: arrays[f"{name}{SEP}{k}"] for k in spec["keys"]}
        setattr(objs[int(depth)], attr, _rebuild(spec["kind"], values))
    for depth, state in meta.get("accountants", {}).items():
        objs[int(depth)].accountant.load_state_dict(state)  # type: ignore[attr-defined]


def _items(value: Any) -> tuple[str | None, dict[str, np.ndarray]]:
    if isinstance(value, ArrayRecord):
        return "arrayrecord", {k: v.numpy() for k, v in value.items()}
    if isinstance(value, dict) and value:
        return "dict", {str(k): np.asarray(v) for k, v in value.items()}
    if isinstance(value, list) and value:
        return "list", {str(i): np.asarray(v) for i, v in enumerate(value)}
    return None, {}


def _rebuild(kind: str, values: dict[str, np.ndarray]) -> Any:
    if kind == "arrayrecord":
        return ArrayRecord({k: Array(v) for k, v in values.items()})
    if kind == "dict":
        return dict(values)
    if kind == "list":
        return [values[str(i)] for i in range(len(values))]
    raise StrategyStateError(f"unknown strategy state kind {kind!r}")
