"""Registered user counts in a simulation (``register_users = true``).

A deployed platform registers each partner's user count with ``fedrec certs set-users`` and
the ServerApp finds a reply's partner from the key its node authenticated with
(``fedrec.deploy.registry``). A simulation has no keys: Flower's engine gives each node a
random id and random key bytes, and tells the ServerApp nothing of which partition a node
holds. The simulation is the platform here, though: it made the partition, so it knows each
client's users. What it lacks is the node -> partition map, which only the node's own context
(``node_config["partition-id"]``) holds.

``Registrar`` is that channel: the outermost layer of the simulated ClientApp, around fedrec's
own app and around any attack a benchmark wraps it in (``fedrec.simulation.faults``). It writes
the map from the node's context before the app sees a message, and no reply content (which an
attacker controls) enters it. It runs in the same process as the app it wraps, so the wrapped
code is trusted not to reach around it: the attacks of ``faults`` change replies only. (A
deployment needs no such trust: there the node is matched by the key it authenticated with.)
Each node writes ``DIR/<node id>`` once, holding
its partition id; ``simulated_registry`` answers the strategy's question (``Observed``: the
grid's nodes -> registered users) from those files and the partition's user counts. A node
that has not handled a message yet has no file; the strategy asks again at aggregation for
every replying node without a count, and a node that replied has written its file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import cast

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid


class Registrar(ClientApp):
    """``inner`` with each node's id -> partition id written to ``directory`` (module doc)."""

    def __init__(self, inner: ClientApp, directory: Path) -> None:
        super().__init__()
        self.inner = inner
        self.directory = Path(directory)

    def __call__(self, message: Message, context: Context) -> Message:
        path = self.directory / str(context.node_id)
        if not path.exists():
            partition = cast(int, context.node_config["partition-id"])
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(str(int(partition)))
            os.replace(tmp, path)  # a reader never sees a half-written file
        return self.inner(message, context)


def simulated_registry(
    directory: Path, users: Sequence[int]
) -> Callable[[Grid], Mapping[int, int]]:
    """grid -> {node id: users of the partition it holds} for the grid's nodes that have
    registered (``users[p]``: partition p's user count, what the clients state when honest)."""
    directory = Path(directory)

    def registered(grid: Grid) -> dict[int, int]:
        out = {}
        for node in grid.get_nodes():
            path = directory / str(int(node.node_id))
            if path.exists():
                out[int(node.node_id)] = int(users[int(path.read_text())])
        return out

    return registered
