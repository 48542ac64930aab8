"""The client-side clipping mod: Flower's fixedclipping_mod when asked for, a no-op otherwise."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from flwr.supercore.task_identity import TaskIdentity

from fedrec.client.mods import user_dp_clipping


@pytest.fixture(autouse=True)
def _run_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # Message() outside a running app needs them
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _msg(config: dict) -> Message:
    zeros = {"recall/w": np.zeros(4, np.float32), "recall/b": np.zeros(2, np.float32)}
    arrays = ArrayRecord({k: Array(v) for k, v in zeros.items()})
    content = RecordDict({"arrays": arrays, "config": ConfigRecord(config)})
    return Message(content=content, dst_node_id=1, message_type="train")


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def _reply_with_update(update: dict[str, np.ndarray]):
    def call_next(msg: Message, _ctx: Context) -> Message:
        glob = msg.content["arrays"]
        local = {k: glob[k].numpy() + update[k] for k in glob}
        arrays = ArrayRecord({k: Array(v) for k, v in local.items()})
        return Message(RecordDict({"arrays": arrays}), reply_to=msg)

    return call_next


def _update_norm(reply: Message) -> float:
    arrays = reply.content.array_records["arrays"]
    return float(np.sqrt(sum(float((arrays[k].numpy() ** 2).sum()) for k in arrays)))


def test_update_is_clipped_to_the_norm_the_server_sent() -> None:
    update = {"recall/w": np.full(4, 3.0, np.float32), "recall/b": np.full(2, 4.0, np.float32)}
    msg = _msg({KEY_CLIPPING_NORM: 0.5, "server-round": 1})
    reply = user_dp_clipping(msg, _context(), _reply_with_update(update))
    assert not reply.has_error()
    assert abs(_update_norm(reply) - 0.5) < 1e-5  # the update had norm sqrt(4*9 + 2*16) = 8.2
    w = reply.content.array_records["arrays"]["recall/w"].numpy()
    np.testing.assert_allclose(w / w[0], 1.0)  # direction kept


def test_without_a_clipping_norm_the_update_passes_unchanged() -> None:
    update = {"recall/w": np.full(4, 3.0, np.float32), "recall/b": np.full(2, 4.0, np.float32)}
    reply = user_dp_clipping(_msg({"server-round": 1}), _context(), _reply_with_update(update))
    assert abs(_update_norm(reply) - np.sqrt(4 * 9 + 2 * 16)) < 1e-5
