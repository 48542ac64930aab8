"""PromptGrid (fedrec.server.prompt_grid): replies collected as they arrive, within the timeout."""

from __future__ import annotations

import time
from uuid import uuid4

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from fedrec.server.prompt_grid import MAX_POLL_S, PromptGrid, prompt


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # a Message outside a running app
    for attr in ("_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 0)


class SlowSites(Grid):
    """A SuperLink's view of sites that answer ``delay[node]`` seconds after the push (never
    if absent). Its own send_and_receive is Flower's fixed 3-s loop, which PromptGrid must not
    use."""

    def __init__(self, delay: dict[int, float]) -> None:
        self.delay, self.pending, self.pulls = delay, {}, 0

    def set_run(self, run):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    @property
    def run(self):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def get_node_ids(self):  # type: ignore[no-untyped-def]
        return list(self.delay)

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's grids do
            node = msg.metadata.dst_node_id
            if node in self.delay:
                self.pending[msg.metadata.message_id] = (time.monotonic() + self.delay[node], msg)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
        self.pulls += 1
        ready = [
            i for i in message_ids if i in self.pending and self.pending[i][0] <= time.monotonic()
        ]
        return [Message(RecordDict(), reply_to=self.pending.pop(i)[1]) for i in ready]

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        raise AssertionError("Flower's own loop (a 3-s sleep between pulls) was used")


def _messages(nodes):
    body = RecordDict({"config": ConfigRecord({"stage": "setup"})})
    return [Message(body, dst_node_id=n, message_type="train") for n in nodes]


def test_replies_are_collected_within_a_poll_of_arriving():
    sites = SlowSites({1: 0.3, 2: 0.6, 3: 0.9})
    t0 = time.monotonic()
    replies = list(PromptGrid(sites).send_and_receive(_messages([1, 2, 3]), timeout=30))
    elapsed = time.monotonic() - t0
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2, 3]
    assert all(not r.has_error() for r in replies)
    # the last reply arrived at 0.9 s; Flower's loop would have seen it at 3 s
    assert 0.9 <= elapsed < 0.9 + MAX_POLL_S + 0.5, elapsed
    assert sites.pulls < 20  # backing off, not spinning


def test_a_site_that_never_answers_costs_the_timeout_and_no_more():
    sites = SlowSites({1: 0.1})  # node 2 never answers
    t0 = time.monotonic()
    replies = list(PromptGrid(sites).send_and_receive(_messages([1, 2]), timeout=1.5))
    elapsed = time.monotonic() - t0
    assert [r.metadata.src_node_id for r in replies] == [1]
    assert 1.5 <= elapsed < 2.0, elapsed


def test_simulations_keep_flowers_in_memory_grid_and_deployments_get_the_prompt_one():
    in_memory = InMemoryGrid.__new__(InMemoryGrid)  # only its type matters here
    assert prompt(in_memory) is in_memory
    wrapped = prompt(SlowSites({}))
    assert isinstance(wrapped, PromptGrid) and wrapped.get_node_ids() == []
