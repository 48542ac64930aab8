"""Secure aggregation under Flower's own strategies: a Grid that turns a round into SecAgg.

Flower's strategies send one ``train`` message per sampled node through
``grid.send_and_receive`` and average the replies. ``SecureAggregationGrid`` intercepts exactly
that call: it runs the four-stage protocol of ``fedrec.secagg`` with the strategy's message
content as the training content, learns only the sum of the survivors' updates (deltas from the
global model), and hands the strategy one reply per survivor that all carry the same array, the
uniform mean ``global + sum / n``, beside each survivor's clear metrics and ledger lines. Any
average of identical arrays is that array, so FedAvg, FedProx and FedAdam (whose server
optimiser then steps on the mean) work unchanged; dropped nodes come back as error replies the
strategy drops and the server records. Robust aggregators (median, trimmed mean, Krum) need
individual updates and are refused with secure aggregation (``fedrec.config``).

Why a Grid and not a Strategy: the round loop (Flower's ``Strategy.start``, or
``fedrec.server.rounds.run_rounds``, which makes the same calls so it can resume) does one
``send_and_receive`` per round, and sampling, evaluation and the server optimiser stay in the
strategy; wrapping the grid leaves all of that untouched, where a strategy subclass would have
to reimplement the aggregation it wraps.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import Array, ArrayRecord, Error, Message, RecordDict
from flwr.serverapp import Grid

from fedrec.secagg.flower import secagg_aggregate
from fedrec.secagg.params import SecAggConfig
from fedrec.server.prompt_grid import DelegatingGrid
from fedrec.strategies.records import ARRAYS_KEY

log = logging.getLogger(__name__)
ERROR_CODE_DROPPED = 4102  # a node that dropped out of the secure aggregation


class SecureAggregationGrid(DelegatingGrid):
    """Delegates to ``inner``; ``train`` rounds go through secure aggregation."""

    def __init__(self, inner: Grid, config: SecAggConfig, run_name: str) -> None:
        super().__init__(inner)
        self.config, self.run_name = config, run_name
        self.rounds: dict[int, dict[str, float]] = {}  # per round: protocol metrics

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        if not messages or messages[0].metadata.message_type != "train":
            return self.inner.send_and_receive(messages, timeout=timeout)
        return self._secure_round(messages, timeout)

    def _secure_round(self, messages: list[Message], timeout: float | None) -> list[Message]:
        content = messages[0].content  # a strategy sends every node the same content
        server_round = int(content["config"]["server-round"])
        by_node = {m.metadata.dst_node_id: m for m in messages}
        out = secagg_aggregate(
            self.inner,
            sorted(by_node),
            config=self.config,
            round_id=f"{self.run_name}/{server_round}",
            train_content=content,
            train_timeout=timeout,
        )
        self.rounds[server_round] = out.metrics()
        glob = content[ARRAYS_KEY]
        n = len(out.result.survivors)
        mean = ArrayRecord(
            {
                k: Array((glob[k].numpy() + out.result.sums[k] / n).astype(glob[k].numpy().dtype))
                for k in glob
            }
        )
        replies = []
        for node, msg in by_node.items():
            if node in out.replies:
                clear = out.replies[node]
                body = RecordDict({ARRAYS_KEY: mean, **{k: clear[k] for k in clear}})
                replies.append(Message(content=body, reply_to=msg))
            else:
                reason = "dropped out of secure aggregation"
                replies.append(Message(Error(code=ERROR_CODE_DROPPED, reason=reason), reply_to=msg))
        log.info(
            "round %d: secure sum of %d updates (error bound %.2e per coordinate)",
            server_round,
            n,
            out.result.error_bound,
        )
        return replies
