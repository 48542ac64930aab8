"""A wrapper that records what each round's aggregation saw, and screens what it may see.

The server needs per-round training metrics and the list of clients that refused or failed
(budget refusals end a run cleanly when too few clients remain); Flower's strategies log these
but do not return them, so we observe ``aggregate_train`` without changing its result. With a
``screen`` (strategies/screen.py), malformed updates are dropped before ``inner`` aggregates
and recorded as rejections with the client's node id and the reason.

Replies reach ``inner`` in a canonical order (by content), not in arrival order: Flower sums
them in list order and float addition is not associative, so the order in which workers happen
to finish would change the global model's last bits, and after a few rounds of training the
final HR@10 by about 0.01. Sorted, a run is reproducible from its seed and config, and an
attacked run differs from its clean twin only through the attack.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedrec.strategies.records import ARRAYS_KEY, LEDGER_KEY, arrays_digest, ledger_entries
from fedrec.strategies.screen import UpdateScreen

log = logging.getLogger(__name__)


@dataclass
class RoundLog:
    """What happened in one round's training."""

    round: int
    replies: int = 0
    failures: list[tuple[int, int, str]] = field(default_factory=list)  # (node, code, reason)
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (node, reason): screened out
    # (node, reason): kept with its content changed: rescaled to its predicted norm, its weight
    # lowered, or a task's update reflected (strategies/screen.py); summary.json rescaled_updates
    rescaled: list[tuple[int, str]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    ledger_entries: list[str] = field(default_factory=list)
    # False when the strategy returned no new model: Flower's user-level DP wrappers skip a
    # round (no release, the global model unchanged) when a sampled reply is missing or rejected
    aggregated: bool = True


class Observed(Strategy):
    """Delegates everything to ``inner``; keeps a RoundLog per round; screens replies if asked."""

    def __init__(
        self,
        inner: Strategy,
        screen: UpdateScreen | None = None,
        registered: Callable[[Grid], Mapping[int, int]] | None = None,
    ) -> None:
        self.inner = inner
        self.screen = screen
        # grid -> {node id: users registered for it} of the nodes online now: the screen's first
        # cap on a FedAvg weight (fedrec.deploy.registry; in simulation, simulation/registry.py)
        self.registered = registered
        self.rounds: dict[int, RoundLog] = {}
        self._sent: ArrayRecord | None = None  # the global model of the round being trained
        # the same, kept only where the screen may reflect an update (which asks the global
        # model's last step, strategies/screen.py); checkpointed (strategies/state.py), so a
        # resumed run knows the last step as an uninterrupted one does
        self.sent_arrays: ArrayRecord | None = None
        self._last_step: dict[str, np.ndarray] | None = None  # global model's move last round
        self._grid: Grid | None = None
        # every count seen this run: it only grows (a node id stays bound to its key, or its
        # partition in simulation), so a
        # node offline when the grid is asked keeps the count it had when it was online
        self._counts: dict[int, int] = {}

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._sent, self._grid = arrays, grid
        if self.screen is not None and self.screen.may_reflect:
            self._last_step = _difference(arrays, self.sent_arrays)
            self.sent_arrays = arrays
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        # asked after the strategy sampled (its sampling may wait for nodes to come online)
        self._learn_counts({m.metadata.dst_node_id for m in messages})
        return messages

    @property
    def registered_counts(self) -> dict[int, int]:
        """{node id: registered users} of every node whose count was seen this run."""
        return dict(sorted(self._counts.items()))

    def _learn_counts(self, nodes: set[int]) -> None:
        """Ask the grid for the registered counts unless every node in ``nodes`` has one."""
        if self.registered is not None and self._grid is not None and nodes - set(self._counts):
            self._counts.update(self.registered(self._grid))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = canonical_order(replies)
        rlog = RoundLog(server_round)
        # every reply's ledger lines, a rejected reply's too: its client released the update
        # (and ledgered it) whether or not the screen keeps it
        for msg in replies:
            if not msg.has_error():
                rlog.ledger_entries += _ledger_lines(msg)
        if self.screen is not None and self._sent is not None:
            # a node that came online after the round was sampled: asked again
            self._learn_counts({m.metadata.src_node_id for m in replies if not m.has_error()})
            replies, rlog.rejected, rlog.rescaled = self.screen.screen_all(
                self._sent, replies, self._counts, self._last_step
            )
            for node, reason in rlog.rejected:
                log.warning(
                    "round %d: rejected the update of node %d: %s", server_round, node, reason
                )
            for node, reason in rlog.rescaled:
                log.warning(
                    "round %d: kept the update of node %d, adjusted: %s",
                    server_round, node, reason,
                )
        for msg in replies:
            if msg.has_error():
                rlog.failures.append((msg.metadata.src_node_id, msg.error.code, msg.error.reason))
            else:
                rlog.replies += 1
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        rlog.aggregated = arrays is not None
        if metrics is not None:
            rlog.metrics = {k: float(v) for k, v in metrics.items()}  # type: ignore[arg-type]
        self.rounds[server_round] = rlog
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)


def _difference(
    now: ArrayRecord, before: ArrayRecord | None
) -> dict[str, np.ndarray] | None:
    """{key: now - before} in float64 (None without ``before`` or when the keys differ)."""
    if before is None or list(before) != list(now):
        return None
    return {k: now[k].numpy().astype(np.float64) - before[k].numpy() for k in now}


def _ledger_lines(msg: Message) -> list[str]:
    """The ledger lines a reply carries (none when its ``ledger`` record is malformed)."""
    entries = ledger_entries(msg.content)
    if entries is None:
        if LEDGER_KEY in msg.content:
            log.warning("node %d sent a malformed ledger record; its lines are not counted",
                        msg.metadata.src_node_id)
        return []
    return [e for e in entries if isinstance(e, str)]


def canonical_order(replies: Iterable[Message]) -> list[Message]:
    """``replies`` sorted by content (the update's digest, then the metrics); error replies,
    which no strategy aggregates, first in arrival order."""

    def key(msg: Message) -> tuple[str, str]:
        if msg.has_error() or ARRAYS_KEY not in msg.content:
            return "", ""
        metrics = msg.content.metric_records.get("metrics")
        try:
            digest = arrays_digest(msg.content[ARRAYS_KEY])
        except Exception:  # undecodable arrays from a broken or hostile client: the screen
            digest = "~"  # rejects them; here they only must not stop the sort (last, in order)
        return digest, repr(sorted((metrics or {}).items()))

    return sorted(replies, key=key)
