"""Failure and attack simulation, for tests and benchmarks only: never part of a real run.

``with_faults(app, plan)`` wraps a ClientApp so that, in a simulation, some clients fail or
straggle in some rounds, and some send a poisoned update: their honest update ``u`` replaced by
``factor * u`` (model poisoning; ``factor=10`` scales it, ``factor=-1`` flips its sign; Blanchard
et al. 2017, Fang et al. 2020), and may overstate its users (``weight_factor``: FedAvg weighs a
reply by the ``num-examples`` it states). No config field or flag turns this on: only code that builds the
wrapped app and passes it to ``fedrec.simulation.simulate(client_app=...)``.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import cast

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedrec.strategies.records import ARRAYS_KEY


@dataclass(frozen=True)
class FaultPlan:
    """Which simulated clients misbehave, and how. Seeded: the same plan, the same faults."""

    fail_share: float = 0.0  # share of clients failing in each round (drawn anew every round)
    stall_seconds: float = 0.0  # failing clients stall this long, then answer (0: they raise)
    attack_share: float = 0.0  # share of clients that poison every update (fixed for the run)
    attack_factor: float = 1.0  # attackers send factor x their honest update
    weight_factor: int = 1  # attackers state this x their users as their FedAvg weight
    attack_from_round: int = 1  # the first round the attackers poison (honest before it)
    seed: int = 0

    def __post_init__(self) -> None:
        if not (0 <= self.fail_share < 1 and 0 <= self.attack_share < 1):
            raise ValueError("fail_share and attack_share must be in [0, 1)")
        if self.stall_seconds < 0:
            raise ValueError("stall_seconds must be >= 0")
        if self.weight_factor < 1:
            raise ValueError("weight_factor must be at least 1")
        if self.attack_from_round < 1:
            raise ValueError("attack_from_round must be at least 1")

    def failing(self, n_clients: int, server_round: int) -> set[int]:
        k = round(self.fail_share * n_clients)
        return set(random.Random(self.seed * 7919 + server_round).sample(range(n_clients), k))

    def attackers(self, n_clients: int) -> set[int]:
        k = round(self.attack_share * n_clients)
        if self.attack_share > 0:
            k = max(k, 1)
        return set(random.Random(self.seed).sample(range(n_clients), k))


def poison(sent: ArrayRecord, honest: ArrayRecord, factor: float) -> ArrayRecord:
    """``sent + factor * (honest - sent)``, key by key, in each array's own dtype."""
    out = {}
    for key, arr in honest.items():
        g, w = sent[key].numpy(), arr.numpy()
        out[key] = Array(np.asarray(g + factor * (w - g), dtype=w.dtype))
    return ArrayRecord(out)


def with_faults(app: ClientApp, plan: FaultPlan) -> ClientApp:
    """``app`` with the failures and attacks of ``plan`` (train messages only)."""
    faulty = ClientApp()

    @faulty.train()
    def train(msg: Message, context: Context) -> Message:
        client = cast(int, context.node_config["partition-id"])
        n = cast(int, context.node_config["num-partitions"])
        server_round = cast(int, msg.content.config_records["config"]["server-round"])
        if client in plan.failing(n, server_round):
            if not plan.stall_seconds:
                raise RuntimeError(f"simulated failure of client {client} in round {server_round}")
            time.sleep(plan.stall_seconds)
        reply = app(msg, context)
        attacking = server_round >= plan.attack_from_round and client in plan.attackers(n)
        if attacking and reply.has_content():
            sent, honest = msg.content.array_records[ARRAYS_KEY], reply.content.array_records
            reply.content[ARRAYS_KEY] = poison(sent, honest[ARRAYS_KEY], plan.attack_factor)
            metrics = reply.content.metric_records["metrics"]
            metrics["num-examples"] = plan.weight_factor * cast(int, metrics["num-examples"])
        return reply

    @faulty.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return app(msg, context)

    return faulty
