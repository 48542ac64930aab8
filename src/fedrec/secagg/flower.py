"""Secure aggregation over Flower's Message API: the server driver and the client handler.

Messages have type ``train.secagg`` (``MESSAGE_TYPE``): a ClientApp answers them with
``@app.train("secagg")`` calling ``handle_secagg``; the ServerApp calls ``secagg_aggregate``
inside its ``@app.main()``. Four round trips per aggregation; the third carries the
caller's training content (global weights, config) and triggers the client's training.

A client that fails, refuses or times out in any stage simply counts as dropped there.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from numpy.typing import NDArray

from fedrec.secagg import wire
from fedrec.secagg.client import SecAggClient
from fedrec.secagg.params import SecAggConfig, SecAggError, plan_round
from fedrec.secagg.server import AggregateResult, SecAggServer

log = logging.getLogger(__name__)
MESSAGE_TYPE = "train.secagg"
ERROR_CODE_SECAGG = 4101


@dataclass(frozen=True)
class ClientUpdate:
    """What the client's callback returns: the update to sum, and records to send beside it.

    ``arrays`` must already be clipped and noised for DP. ``records`` (metrics, a ledger
    ConfigRecord...) travel in the clear next to the masked vector: never put weights there.
    """

    arrays: Mapping[str, NDArray]
    records: Mapping[str, ConfigRecord | MetricRecord] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if any(not isinstance(r, ConfigRecord | MetricRecord) for r in self.records.values()):
            raise TypeError("ClientUpdate.records holds ConfigRecords and MetricRecords only")


UpdateFn = Callable[[Message, Context], ClientUpdate]
T = TypeVar("T")


@dataclass(frozen=True)
class SecAggRound:
    """The outcome of ``secagg_aggregate``."""

    result: AggregateResult  # the sums, survivors, dropouts and error bound
    replies: dict[int, RecordDict]  # survivors' clear records from the masked-input stage
    seconds: dict[str, float]  # wall time per stage, server side

    def metrics(self) -> dict[str, float]:
        out = {f"secagg.seconds.{k}": v for k, v in self.seconds.items()}
        out["secagg.survivors"] = float(len(self.result.survivors))
        out |= {f"secagg.dropped.{k}": float(len(v)) for k, v in self.result.dropped.items()}
        out["secagg.error-bound"] = self.result.error_bound
        return out


def secagg_aggregate(
    grid: Grid,
    node_ids: list[int],
    *,
    config: SecAggConfig,
    round_id: int | str,
    train_content: RecordDict | None = None,
    timeout: float | None = 300.0,
    train_timeout: float | None = 3600.0,
) -> SecAggRound:
    """Securely sum the updates of ``node_ids``; raises ``TooFewSurvivors`` below threshold.

    ``train_content`` is added to the masked-input stage's messages (the clients train then).
    ``timeout`` bounds each key-exchange stage, ``train_timeout`` the masked-input stage: a
    node that has not answered by then is treated as dropped.
    """
    rid = str(round_id)
    server = SecAggServer(plan_round(config, node_ids, rid, random.SystemRandom()), config)
    seconds: dict[str, float] = {}

    def ask(stage: str, contents: Mapping[int, RecordDict], wait: float | None) -> dict:
        t0 = time.perf_counter()
        messages = [
            Message(content=c, dst_node_id=u, message_type=MESSAGE_TYPE, group_id=rid)
            for u, c in contents.items()
        ]
        replies = _answers(stage, grid.send_and_receive(messages, timeout=wait))
        seconds[stage] = time.perf_counter() - t0
        return replies

    keys = server.collect_keys(
        _parse(
            ask("setup", _map(server.setup(), wire.setup_to_record), timeout),
            wire.advert_from_record,
        )
    )
    inbox = server.collect_shares(
        _parse(ask("share_keys", _map(keys, wire.keys_to_record), timeout), wire.sealed_from_record)
    )
    forward = {
        u: _with(wire.sealed_to_record("masked_input", s), train_content) for u, s in inbox.items()
    }
    masked_replies = ask("masked_input", forward, train_timeout)
    requests = server.collect_masked(_parse(masked_replies, wire.masked_from_record))
    shares = _parse(
        ask("unmask", _map(requests, wire.request_to_record), timeout), wire.shares_from_record
    )
    t0 = time.perf_counter()
    result = server.unmask(shares)
    seconds["reconstruct"] = time.perf_counter() - t0
    clear = {u: _clear_records(masked_replies[u]) for u in result.survivors}
    log.info(
        "secagg round %s: %d survivors, dropped %s",
        rid,
        len(result.survivors),
        {k: v for k, v in result.dropped.items() if v},
    )
    return SecAggRound(result, clear, seconds)


def handle_secagg(
    msg: Message,
    context: Context,
    update_fn: UpdateFn,
    min_survivors: Callable[[Message], int] | None = None,
) -> Message:
    """Answer one secure-aggregation message; the protocol state lives in ``context.state``.

    ``update_fn(msg, context)`` is called in the masked-input stage and returns the
    client's ``ClientUpdate``. Protocol failures are answered as error replies.

    ``min_survivors(msg)``: the fewest inputs a sum must hold for this client's update to be
    private in it (distributed DP: its noise is a share of the sum's). If the round's
    reconstruction threshold, below which this client refuses to unmask, is lower, the client
    refuses the round before ``update_fn`` runs: it neither trains nor spends budget.
    """
    try:
        stage = wire.stage_of(msg.content)
        saved = context.state.config_records.get(wire.STATE_KEY)
        client = SecAggClient.from_dict(dict(saved)) if saved is not None else SecAggClient()
        reply = _step(client, stage, msg, context, update_fn, min_survivors)
    except (SecAggError, ValueError, KeyError, TypeError) as err:
        log.error("node %d: secure aggregation failed: %s", msg.metadata.dst_node_id, err)
        return Message(Error(code=ERROR_CODE_SECAGG, reason=f"secagg: {err}"), reply_to=msg)
    context.state.config_records[wire.STATE_KEY] = ConfigRecord(client.to_dict())  # type: ignore[arg-type]
    return Message(content=reply, reply_to=msg)


def _step(
    client: SecAggClient,
    stage: str,
    msg: Message,
    context: Context,
    update_fn: UpdateFn,
    min_survivors: Callable[[Message], int] | None,
) -> RecordDict:
    content = msg.content
    if stage == "setup":
        setup = wire.setup_from_record(content)
        if setup.node_id != msg.metadata.dst_node_id:
            raise SecAggError(f"setup addressed to node {setup.node_id}, received by another")
        return wire.advert_to_record(client.setup(setup))
    # every later stage belongs to the round this client set up (the server sends each
    # stage's messages in the round's group): a late message of another round is refused
    if str(msg.metadata.group_id) != client.state.round_id:
        raise SecAggError(
            f"a '{stage}' message of round '{msg.metadata.group_id}'; this client is in round "
            f"'{client.state.round_id or 'none'}'"
        )
    if stage == "share_keys":
        return wire.sealed_to_record(
            "share_keys", client.share_keys(wire.keys_from_record(content))
        )
    if stage == "masked_input":
        sealed = wire.sealed_from_record(content)
        if client.state.stage != "share_keys":  # check before the (long) training
            raise SecAggError(f"masked_input after '{client.state.stage or 'nothing'}'")
        need = min_survivors(msg) if min_survivors is not None else 0
        if need > client.state.threshold:  # before training: no budget spent on a refusal
            raise SecAggError(
                f"the round's threshold {client.state.threshold} is below the {need} "
                "contributors this client's noise share needs; not training this round"
            )
        # open and check the peers' shares and keys before training, so that a peer's bad
        # share or key makes this client refuse with its budget unspent
        opened = client.open_shares(sealed)
        try:
            update = update_fn(msg, context)
        except Exception as err:  # a refusal or a failed training: answer, never raise
            raise SecAggError(f"no update: {type(err).__name__}: {err}") from err
        masked = client.mask(opened, update.arrays)
        reply = wire.masked_to_record(masked, client.config.modulus)
        for key, record in update.records.items():
            if key in reply:
                raise ValueError(f"ClientUpdate.records may not use the key '{key}'")
            reply[key] = record
        return reply
    if stage == "unmask":
        return wire.shares_to_record(client.unmask(wire.request_from_record(content)))
    raise SecAggError(f"unknown secure-aggregation stage '{stage}'")


def _answers(stage: str, replies: object) -> dict[int, RecordDict]:
    out = {}
    for reply in replies:  # type: ignore[attr-defined]
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("secagg %s: node %d dropped: %s", stage, node, reply.error.reason)
        else:
            out[node] = reply.content
    return out


def _parse(replies: Mapping[int, RecordDict], parse: Callable[[RecordDict], object]) -> dict:
    out = {}
    for node, content in replies.items():
        try:
            out[node] = parse(content)
        except (KeyError, TypeError, ValueError, SecAggError) as err:
            log.warning("secagg: malformed reply from node %d dropped: %s", node, err)
    return out


def _map(items: Mapping[int, T], to_record: Callable[[T], RecordDict]) -> dict[int, RecordDict]:
    return {u: to_record(x) for u, x in items.items()}


def _with(content: RecordDict, extra: RecordDict | None) -> RecordDict:
    for key, record in (extra or {}).items():
        if key == wire.CONFIG_KEY:
            raise ValueError(f"train_content may not use the key '{wire.CONFIG_KEY}'")
        content[key] = record
    return content


def _clear_records(content: RecordDict) -> RecordDict:
    return RecordDict(
        {k: v for k, v in content.items() if k not in (wire.CONFIG_KEY, wire.MASKED_KEY)}
    )
