"""Secure aggregation under Flower's FedAvg: the strategy sees only the survivors' mean."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from fedrec.client.secure import secure_update
from fedrec.secagg.flower import handle_secagg
from fedrec.secagg.params import SecAggConfig
from fedrec.server.secure_grid import ERROR_CODE_DROPPED, SecureAggregationGrid
from fedrec.strategies.records import ARRAYS_KEY

GLOBAL = {"recall/w": np.linspace(-1, 1, 12).astype(np.float32).reshape(3, 4),
          "ranking/b": np.zeros(5, np.float32)}


@pytest.fixture(autouse=True)
def _identity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    for attr in ("_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 0)


def _delta(node: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(node)
    return {k: rng.uniform(-0.1, 0.1, v.shape) for k, v in GLOBAL.items()}


def _train(refuser: int, msg: Message, context: Context) -> Message:
    """A stand-in for the ClientApp's train: local = global + a known delta, or a refusal."""
    from flwr.app import Error

    if context.node_id == refuser:
        return Message(Error(code=4001, reason="budget exhausted"), reply_to=msg)
    glob = msg.content[ARRAYS_KEY]
    local = {k: Array((glob[k].numpy() + _delta(context.node_id)[k]).astype(np.float32))
             for k in glob}
    metrics = MetricRecord({"num-examples": 10 + context.node_id, "recall.loss": 1.0})
    return Message(RecordDict({ARRAYS_KEY: ArrayRecord(local), "metrics": metrics}), reply_to=msg)


def test_fedavg_through_the_secure_grid_gets_the_survivors_uniform_mean() -> None:
    nodes, refuser = [3, 5, 8, 13, 21], 8
    contexts = {u: Context(1, u, {}, RecordDict(), {}) for u in nodes}
    update_fn = partial(secure_update, partial(_train, refuser))

    class InProcessGrid:  # delivers each message to its node's handler
        def send_and_receive(self, messages, *, timeout=None):
            return [handle_secagg(m, contexts[m.metadata.dst_node_id], update_fn)
                    for m in messages]

    grid = SecureAggregationGrid(InProcessGrid(), SecAggConfig(), "run")
    glob = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    content = RecordDict({ARRAYS_KEY: glob, "config": ConfigRecord({"server-round": 1})})
    messages = [Message(content=content, dst_node_id=u, message_type="train") for u in nodes]
    replies = list(grid.send_and_receive(messages, timeout=60))

    errors = [r for r in replies if r.has_error()]
    assert len(errors) == 1 and errors[0].error.code == ERROR_CODE_DROPPED
    survivors = [u for u in nodes if u != refuser]
    expected = {k: GLOBAL[k] + np.mean([_delta(u)[k] for u in survivors], axis=0) for k in GLOBAL}
    arrays, metrics = FedAvg(arrayrecord_key=ARRAYS_KEY).aggregate_train(1, replies)
    bound = SecAggConfig().step()  # quantisation error of the mean, per coordinate
    for k, v in expected.items():
        np.testing.assert_allclose(arrays[k].numpy(), v, atol=bound + 1e-6)
    assert metrics["recall.loss"] == pytest.approx(1.0)
    assert grid.rounds[1]["secagg.survivors"] == 4.0
    ok = [r for r in replies if not r.has_error()]
    assert all(np.array_equal(r.content[ARRAYS_KEY]["recall/w"].numpy(),
                              ok[0].content[ARRAYS_KEY]["recall/w"].numpy()) for r in ok)


def test_evaluate_and_other_messages_pass_through() -> None:
    seen = []

    class Inner:
        def send_and_receive(self, messages, *, timeout=None):
            seen.extend(messages)
            return []

    grid = SecureAggregationGrid(Inner(), SecAggConfig(), "run")
    msg = Message(RecordDict({}), dst_node_id=1, message_type="query.fusion")
    assert list(grid.send_and_receive([msg])) == [] and seen == [msg]
