"""Grids that wrap Flower's: a delegating base, and one that collects replies promptly.

Flower's deployed Grid (``flwr.superlink.grid.http_grid.HttpGrid``, what a ServerApp gets from
a SuperLink) sleeps a fixed 3 s between pulls of the replies in ``send_and_receive``. A round
of secure aggregation is four such exchanges, three of them (key exchange, unmasking) answered
by the sites within a few seconds, so each also waited out the rest of a 3-s sleep.
``PromptGrid`` makes the same calls through the Grid's public ``push_messages`` /
``pull_messages`` and pulls again after 0.1 s, backing off to 1 s while nothing arrives: a
reply waits at most about a second for the server to see it, and a long training stage costs
a pull a second. With it (and the ClientApp importing torch only to train, and the SuperExec
polling every 0.2 s) a key-exchange stage on the local three-site federation took 3.6-5.1 s
instead of 12.2 s (``python benchmarks/deployed_round.py``; docs/secure-aggregation.md).
Flower's in-memory Grid (simulation) already pulls every 0.1 s and is used as it is.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

FIRST_POLL_S = 0.1
MAX_POLL_S = 1.0
BACKOFF = 1.5


class DelegatingGrid(Grid):
    """A Grid that hands every call to ``inner``; subclasses override what they change."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner

    def set_run(self, run):  # type: ignore[no-untyped-def]
        return self.inner.set_run(run)

    @property
    def run(self):  # type: ignore[no-untyped-def]
        return self.inner.run

    def create_message(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def get_nodes(self):  # type: ignore[no-untyped-def]
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.inner.send_and_receive(messages, timeout=timeout)


class PromptGrid(DelegatingGrid):
    """``send_and_receive`` as Flower's (push, pull until every reply or ``timeout``), polling
    from ``FIRST_POLL_S`` up to ``MAX_POLL_S`` instead of every 3 s."""

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        waiting = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        poll = FIRST_POLL_S
        while waiting:
            pulled = list(self.pull_messages(waiting))
            replies += pulled
            waiting -= {m.metadata.reply_to_message_id for m in pulled}
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                break
            if pulled:
                poll = FIRST_POLL_S
            time.sleep(
                poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic()))
            )
            poll = min(poll * BACKOFF, MAX_POLL_S)
        return replies


def prompt(grid: Grid) -> Grid:
    """``grid`` wrapped in a PromptGrid, unless it is Flower's in-memory (simulation) Grid."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    return grid if isinstance(grid, InMemoryGrid) else PromptGrid(grid)
