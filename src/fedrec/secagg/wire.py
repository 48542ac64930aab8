"""The protocol's messages as Flower records (one ConfigRecord per stage, one ArrayRecord).

Server to client, under ``CONFIG_KEY``: ``stage`` and that stage's fields. Client to server:
the same key; the masked vector travels in an ArrayRecord under ``MASKED_KEY``
(uint32 when the modulus allows, else uint64).
"""

from __future__ import annotations

from typing import TypeVar, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedrec.secagg.client import ClientSetup, KeyAdvert, MaskedInput, UnmaskRequest
from fedrec.secagg.params import SecAggConfig, SecAggError

CONFIG_KEY = "secagg"
MASKED_KEY = "secagg-masked"
STATE_KEY = "secagg-state"  # the client's protocol state in context.state
T = TypeVar("T")


def stage_of(content: RecordDict) -> str:
    """The stage a secure-aggregation message belongs to."""
    if CONFIG_KEY not in content.config_records:
        raise SecAggError(f"not a secure-aggregation message (no '{CONFIG_KEY}' record)")
    return str(content.config_records[CONFIG_KEY]["stage"])


def _record(stage: str, **fields: object) -> RecordDict:
    return RecordDict({CONFIG_KEY: ConfigRecord({"stage": stage, **fields})})  # type: ignore[dict-item]


def _fields(content: RecordDict) -> ConfigRecord:
    return content.config_records[CONFIG_KEY]


def setup_to_record(s: ClientSetup) -> RecordDict:
    c = s.config
    return _record(
        "setup",
        **{
            "round-id": s.round_id,
            "node-id": s.node_id,
            "threshold": s.threshold,
            "neighbours": list(s.neighbours),
            "clipping-range": float(c.clipping_range),
            "quantization-range": c.quantization_range,
            "modulus-bits": c.modulus.bit_length() - 1,
        },
    )


def setup_from_record(content: RecordDict) -> ClientSetup:
    f = _fields(content)
    config = SecAggConfig(
        clipping_range=_get(f, "clipping-range", float),
        quantization_range=_get(f, "quantization-range", int),
        modulus=2 ** _get(f, "modulus-bits", int),
        threshold=_get(f, "threshold", int),
    )
    return ClientSetup(
        _get(f, "round-id", str),
        _get(f, "node-id", int),
        _get(f, "threshold", int),
        tuple(cast(list[int], _get(f, "neighbours", list))),
        config,
    )


def _get(f: ConfigRecord, key: str, kind: type[T]) -> T:
    value = f[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise SecAggError(f"field '{key}' should be {kind.__name__}, got {type(value).__name__}")
    return value


def advert_to_record(a: KeyAdvert) -> RecordDict:
    return _record(
        "setup", **{"enc-pk": a.enc_pk, "mask-pk": a.mask_pk, "commitment": a.seed_commitment}
    )


def advert_from_record(content: RecordDict) -> KeyAdvert:
    f = _fields(content)
    return KeyAdvert(
        cast(bytes, f["enc-pk"]), cast(bytes, f["mask-pk"]), cast(bytes, f["commitment"])
    )


def keys_to_record(adverts: dict[int, KeyAdvert]) -> RecordDict:
    ids = sorted(adverts)
    return _record(
        "share_keys",
        **{
            "ids": ids,
            "enc-pks": [adverts[v].enc_pk for v in ids],
            "mask-pks": [adverts[v].mask_pk for v in ids],
            "commitments": [adverts[v].seed_commitment for v in ids],
        },
    )


def keys_from_record(content: RecordDict) -> dict[int, KeyAdvert]:
    f = _fields(content)
    rows = zip(
        cast(list[int], f["ids"]),
        cast(list[bytes], f["enc-pks"]),
        cast(list[bytes], f["mask-pks"]),
        cast(list[bytes], f["commitments"]),
        strict=True,
    )
    return {int(v): KeyAdvert(e, m, c) for v, e, m, c in rows}


def sealed_to_record(stage: str, sealed: dict[int, bytes]) -> RecordDict:
    """Sealed shares, keyed by receiver (client reply) or by sender (server forward)."""
    ids = sorted(sealed)
    return _record(stage, **{"peers": ids, "sealed": [sealed[v] for v in ids]})


def sealed_from_record(content: RecordDict) -> dict[int, bytes]:
    f = _fields(content)
    pairs = zip(cast(list[int], f["peers"]), cast(list[bytes], f["sealed"]), strict=True)
    return {int(v): b for v, b in pairs}


def masked_to_record(m: MaskedInput, modulus: int) -> RecordDict:
    names = [name for name, _ in m.layout]
    dims = [d for _, shape in m.layout for d in shape]
    content = _record(
        "masked_input",
        **{"names": names, "ndims": [len(shape) for _, shape in m.layout], "dims": dims},
    )
    dtype = np.uint32 if modulus <= 2**32 else np.uint64
    content[MASKED_KEY] = ArrayRecord({"vector": Array(m.vector.astype(dtype, copy=False))})
    return content


def masked_from_record(content: RecordDict) -> MaskedInput:
    f = _fields(content)
    dims, layout, at = cast(list[int], f["dims"]), [], 0
    for name, nd in zip(cast(list[str], f["names"]), cast(list[int], f["ndims"]), strict=True):
        layout.append((str(name), tuple(int(d) for d in dims[at : at + nd])))
        at += nd
    vector = content.array_records[MASKED_KEY]["vector"].numpy()
    return MaskedInput(tuple(layout), vector)


def request_to_record(r: UnmaskRequest) -> RecordDict:
    return _record("unmask", survivors=list(r.survivors), dropped=list(r.dropped))


def request_from_record(content: RecordDict) -> UnmaskRequest:
    f = _fields(content)
    return UnmaskRequest(
        tuple(cast(list[int], f["survivors"])), tuple(cast(list[int], f["dropped"]))
    )


def shares_to_record(shares: dict[int, bytes]) -> RecordDict:
    ids = sorted(shares)
    return _record("unmask", owners=ids, shares=[shares[v] for v in ids])


def shares_from_record(content: RecordDict) -> dict[int, bytes]:
    f = _fields(content)
    pairs = zip(cast(list[int], f["owners"]), cast(list[bytes], f["shares"]), strict=True)
    return {int(v): b for v, b in pairs}
