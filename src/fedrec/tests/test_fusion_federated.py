"""Federated fusion-weight choice: client sums add up to the central grid search."""

from __future__ import annotations

import numpy as np
import pytest

from fedrec.fusion.federated import Candidates, choose, client_sums
from fedrec.fusion.objective import per_user_ndcg, stack_normalized


def _scores(n_users: int, seed: int) -> dict[str, np.ndarray]:
    """Three scorers of 100 candidates (target in column 0): 'a' and 'b' each see half of
    the signal, so a mix beats either; 'noise' is pure noise."""
    rng = np.random.default_rng(seed)
    signal = rng.normal(size=(n_users, 100))
    signal[:, 0] += 2.0
    half = rng.normal(size=(n_users, 100))
    return {
        "a": signal + 1.5 * half,
        "b": 10.0 * (signal - 1.5 * half),  # another scale: normalisation matters
        "noise": rng.normal(size=(n_users, 100)),
    }


def test_client_sums_add_up_to_the_central_means_and_the_same_choice() -> None:
    scores = _scores(300, seed=0)
    cand = Candidates.make(["a", "b", "noise"], step=0.1)
    clients = np.array_split(np.random.default_rng(1).permutation(300), 3)
    total, n = np.zeros((len(cand.normalizations), len(cand.grid))), 0
    for rows in clients:
        s, k = client_sums({t: v[rows] for t, v in scores.items()}, 0, cand)
        total, n = total + s, n + k
    assert n == 300
    # central brute force over all users
    for m, norm in enumerate(cand.normalizations):
        stacked = stack_normalized(scores, list(cand.tasks), norm)
        central = np.array([per_user_ndcg(stacked, w, np.zeros(300, int)).mean()
                            for w in cand.grid])
        np.testing.assert_allclose(total[m] / n, central, rtol=1e-12)
    fuser, best = choose(total, n, cand)
    assert best == pytest.approx((total / n).max())
    w = fuser.weights
    assert w["noise"] == 0.0 and w["a"] > 0 and w["b"] > 0  # mixes the halves, drops the noise
    single = max(total[:, [i for i, g in enumerate(cand.grid) if g.max() == 1.0]].max(), 0)
    assert best > single / n  # the mix beats every single scorer


def test_bad_inputs_are_named() -> None:
    cand = Candidates.make(["a", "b"], step=0.5)
    with pytest.raises(ValueError, match="tasks"):
        client_sums({"a": np.zeros((2, 5)), "c": np.zeros((2, 5))}, 0, cand)
    with pytest.raises(ValueError, match="sums must be"):
        choose(np.zeros((1, 1)), 3, cand)
    with pytest.raises(ValueError, match="normalization"):
        Candidates.make(["a"], normalizations=["softmax"])


def test_a_dp_client_answers_fusion_queries_only_when_the_run_asks_for_the_federated_fit(
    monkeypatch,
) -> None:
    """Under DP the NDCG sums are a release outside the ledger: a client sends them only when
    the run's config names the federated fit (its summary and audit then say so)."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    import fedrec.client.app as client_app
    import fedrec.client.fusion_query as fusion_query
    from fedrec.config import load_config

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # a Message outside a running app
    for attr in ("_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 0)
    sent = []
    monkeypatch.setattr(fusion_query, "fusion_reply", lambda msg, cfg, client: sent.append(cfg))

    def query(settings, **node):
        cfg = load_config(None, {"dataset": "synthetic", "partition": "site", **settings})
        msg = Message(RecordDict({"config": ConfigRecord({"fedrec": cfg.to_json()})}),
                      dst_node_id=1, message_type="query.fusion")  # fmt: skip
        ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0, **node},
                      state=RecordDict(), run_config={})  # fmt: skip
        return client_app.fusion(msg, ctx)

    reply = query({"privacy.mode": "record"})  # auto: fixed weights under DP, no query wanted
    assert reply.has_error() and "federated fusion fit" in reply.error.reason and not sent
    query({"privacy.mode": "record", "fusion_fit": "federated"})  # asked for, and disclosed
    query({})  # no DP
    assert len(sent) == 2
    # a partner site with its own lifetime budget answers none, whatever the run's config says
    for settings in ({"privacy.mode": "record", "fusion_fit": "federated"}, {}):
        reply = query(settings, **{"budget-epsilon": "8.0"})
        assert reply.has_error() and "lifetime epsilon budget" in reply.error.reason
    assert len(sent) == 2


def test_the_server_leaves_out_replies_no_honest_client_sends(monkeypatch) -> None:
    """A wrong shape crashed the server after the last round, and one sum of 1e300 decided
    the choice (and reported a validation NDCG of 3e298): every user's NDCG lies in [0, 1], so
    a reply's sums must lie in [0, its users]."""
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
    from flwr.app import Message as FlowerMessage
    from flwr.supercore.task_identity import TaskIdentity

    import fedrec.server.fusion as server_fusion
    from fedrec.client.fusion_query import SUMS_KEY, USERS_KEY
    from fedrec.config import load_config
    from fedrec.fusion.federated import GRID_STEP

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    for attr in ("_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 0)
    monkeypatch.setattr(server_fusion, "pack", lambda models: ArrayRecord())
    tasks = ["a", "b", "noise"]
    cand = Candidates.make(tasks, GRID_STEP)
    scores = _scores(300, seed=0)
    honest = [client_sums({t: v[rows] for t, v in scores.items()}, 0, cand)
              for rows in np.array_split(np.arange(300), 3)]
    shape = honest[0][0].shape
    hostile = [(np.zeros((1, 2)), 10), (np.full(shape, 1e300), 100), (np.zeros(shape), 0),
               (np.full(shape, 50.0), 10), (np.full(shape, np.nan), 100)]

    class Grid:
        def get_node_ids(self):
            return list(range(1, len(honest) + len(hostile) + 1))

        def send_and_receive(self, messages, *, timeout=None):
            out = []
            for msg, (sums, users) in zip(messages, [*honest, *hostile], strict=True):
                content = RecordDict({SUMS_KEY: ArrayRecord({SUMS_KEY: Array(sums)}),
                                      USERS_KEY: MetricRecord({USERS_KEY: users})})
                out.append(FlowerMessage(content, reply_to=msg))
            return out

    cfg = load_config(None, {"dataset": "synthetic", "partition": "site"})
    result = server_fusion.federated_fusion(Grid(), cfg, dict.fromkeys(tasks))
    fuser, ndcg = choose(sum(s for s, _ in honest), 300, cand)
    assert (result.clients, result.failed, result.users) == (3, 5, 300)
    assert result.validation_ndcg == pytest.approx(ndcg) and result.fuser.weights == fuser.weights
