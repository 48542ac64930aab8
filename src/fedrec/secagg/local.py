"""One round with every client in this process: for tests, benchmarks and a reference.

``run_local_round`` passes each stage's replies straight from the clients to the server, and
lets chosen clients drop (not answer) at a chosen stage, as they would across a network.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping

import numpy as np
from numpy.typing import NDArray

from fedrec.secagg.client import STAGES, SecAggClient
from fedrec.secagg.params import SecAggConfig, SecAggError, plan_round
from fedrec.secagg.server import AggregateResult, SecAggServer

log = logging.getLogger(__name__)
Tamper = Callable[[str, dict], None]  # (stage, {node: reply}) -> alters replies in place


def run_local_round(
    config: SecAggConfig,
    inputs: Mapping[int, Mapping[str, NDArray]],
    *,
    drop: Mapping[str, set[int]] | None = None,
    seed: int = 0,
    round_id: str = "1",
    tamper: Tamper | None = None,
) -> AggregateResult:
    """Sum ``inputs`` (node -> name -> array) securely; ``drop[stage]`` never answer ``stage``.

    ``tamper`` may alter each stage's replies before the server sees them (tests of checks).
    """
    drop = drop or {}
    unknown = set(drop) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; use {STAGES}")
    gone: set[int] = set()

    def ask(stage: str, nodes: Mapping[int, object], call: Callable[[int], object]) -> dict:
        """Replies of the nodes still up; a client that refuses (SecAggError) has dropped."""
        gone.update(drop.get(stage, set()))
        replies = {}
        for u in sorted(set(nodes) - gone):
            try:
                replies[u] = call(u)
            except SecAggError as err:
                log.warning("%s", err)
                gone.add(u)
        if tamper is not None:
            tamper(stage, replies)
        return replies

    server = SecAggServer(plan_round(config, inputs, round_id, random.Random(seed)), config)
    clients = {u: SecAggClient() for u in inputs}
    rng = np.random.default_rng(seed)
    setups = server.setup()
    keys = server.collect_keys(ask("setup", setups, lambda u: clients[u].setup(setups[u])))
    inbox = server.collect_shares(ask("share_keys", keys, lambda u: clients[u].share_keys(keys[u])))
    requests = server.collect_masked(
        ask("masked_input", inbox, lambda u: clients[u].masked_input(inbox[u], inputs[u], rng))
    )
    return server.unmask(ask("unmask", requests, lambda u: clients[u].unmask(requests[u])))
