"""The round loop: Flower's ``Strategy.start``, but able to begin at any round.

``Strategy.start`` always begins at round 1 and returns only at the end; resuming from a
checkpoint must begin at round k + 1, and a checkpoint is written after every round. The loop
makes the same calls in the same order (configure_train, send_and_receive, aggregate_train,
configure/aggregate_evaluate, then the server's own per-round work), so every Flower strategy
and wrapper runs unchanged. Replies later than ``timeout`` are dropped by the Grid: the round
goes on with the clients that answered.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

log = logging.getLogger(__name__)
POLL_S = 0.2

AfterRound = Callable[[int, ArrayRecord], None]


class TooFewClients(RuntimeError):
    """Fewer clients than ``min_train_clients`` answered, or are connected to ask: the
    federation cannot go on."""


def wait_for_nodes(grid: Grid, expected: int, timeout: float) -> int:
    """Wait until ``expected`` nodes are connected or ``timeout`` passed; returns how many are."""
    deadline = time.monotonic() + timeout
    while (n := len(list(grid.get_node_ids()))) < expected and time.monotonic() < deadline:
        time.sleep(POLL_S)
    if n < expected:
        log.warning("%d of %d clients connected after %.0f s; going on", n, expected, timeout)
    return n


def run_rounds(
    strategy: Strategy,
    grid: Grid,
    arrays: ArrayRecord,
    *,
    rounds: range,
    timeout: float,
    train_config: ConfigRecord,
    after_round: AfterRound,
    before_round: Callable[[int], None] | None = None,
    min_nodes: int = 0,
) -> ArrayRecord:
    """Train ``rounds``; ``before_round(round)`` runs before a round's first message is sent,
    ``after_round(round, global arrays)`` after its aggregation. A round that finds fewer than
    ``min_nodes`` nodes connected within ``timeout`` raises ``TooFewClients`` (Flower's own
    sampling would wait for them for ever)."""
    for server_round in rounds:
        if min_nodes and (n := wait_for_nodes(grid, min_nodes, timeout)) < min_nodes:
            raise TooFewClients(
                f"round {server_round}: only {n} client(s) connected after {timeout:.0f} s; "
                f"at least {min_nodes} needed"
            )
        log.info("round %d/%d", server_round, rounds.stop - 1)
        if before_round is not None:
            before_round(server_round)
        replies = grid.send_and_receive(
            strategy.configure_train(server_round, arrays, train_config, grid), timeout=timeout
        )
        aggregated, _ = strategy.aggregate_train(server_round, replies)
        if aggregated is not None:
            arrays = aggregated
        messages = list(strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid))
        if messages:
            strategy.aggregate_evaluate(
                server_round, grid.send_and_receive(messages, timeout=timeout)
            )
        after_round(server_round, arrays)
    return arrays
