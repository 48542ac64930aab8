"""Malformed updates are rejected before aggregation, with the node id and the reason (issue 5)."""

import re

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from fedrec.config import ConfigError, load_config
from fedrec.simulation.faults import FaultPlan, poison
from fedrec.strategies import Observed, UpdateScreen, make_screen
from fedrec.strategies.records import ARRAYS_KEY
from fedrec.strategies.screen import SIZE_CEILING, median_and_leave_one_out, predicted_norms


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    for attr in ("_run_id", "_node_id", "_task_id"):  # Message() outside a running app needs them
        monkeypatch.setattr(TaskIdentity, attr, 1)


RNG = np.random.default_rng(0)
GLOBAL = {
    "recall/emb": RNG.normal(size=(6, 4)).astype(np.float32),
    "ranking/w": RNG.normal(size=(3,)).astype(np.float32),
}


def _sent() -> ArrayRecord:
    return ArrayRecord({k: Array(v.copy()) for k, v in GLOBAL.items()})


def _reply(node, arrays=None, *, weight=10, step=0.01, extra_records=None):
    if arrays is None:
        arrays = {k: v + step * np.ones_like(v) * (1 + node % 3) for k, v in GLOBAL.items()}
    content = RecordDict(
        {
            ARRAYS_KEY: ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": weight, "recall.loss": 0.5}),
            "ledger": ConfigRecord({"entries": ["x"]}),
            **(extra_records or {}),
        }
    )
    ins = Message(RecordDict(), dst_node_id=node, message_type="train")
    return Message(content, reply_to=ins)


def _honest(n=4):
    return [_reply(node) for node in range(1, n + 1)]


def _bad(kind):
    g = {k: v.copy() for k, v in GLOBAL.items()}
    if kind == "nan":
        g["recall/emb"][0, 0] = np.nan
    elif kind == "inf":
        g["ranking/w"][1] = np.inf
    elif kind == "missing key":
        del g["ranking/w"]
    elif kind == "extra key":
        g["personal/x"] = np.zeros(2, np.float32)
    elif kind == "shape":
        g["ranking/w"] = np.zeros(4, np.float32)
    elif kind == "dtype":
        g["ranking/w"] = g["ranking/w"].astype(np.float64)
    elif kind == "huge norm":
        g = {k: v + 50.0 for k, v in g.items()}
    return _reply(99, g)


@pytest.mark.parametrize(
    "kind, match",
    [
        ("nan", "NaN or Inf"),
        ("inf", "NaN or Inf"),
        ("missing key", "wrong keys"),
        ("extra key", "wrong keys"),
        ("shape", "shape"),
        ("dtype", "dtype float64"),
        ("huge norm", "median"),
    ],
)
def test_each_kind_of_malformed_update_is_rejected_with_node_and_reason(kind, match):
    screen = UpdateScreen(norm_factor=10.0, norm_action="reject")
    kept, rejected = screen.screen(_sent(), [*_honest(), _bad(kind)])
    assert len(kept) == 4 and [node for node, _ in rejected] == [99]
    assert match in rejected[0][1]


@pytest.mark.parametrize(
    "weight, extra", [(0, None), (float("nan"), None), (10, {"other": ArrayRecord()})]
)
def test_replies_flower_would_choke_on_are_rejected(weight, extra):
    kept, rejected = UpdateScreen().screen(
        _sent(), [*_honest(), _reply(7, weight=weight, extra_records=extra)]
    )
    assert len(kept) == 4 and rejected[0][0] == 7


def _relabelled(data, **attrs):
    """An Array whose declared fields say one thing and whose bytes another."""
    arr = Array(np.asarray(data))
    for name, value in attrs.items():
        setattr(arr, name, value)
    return arr


def _with_array(node, key, arr):
    reply = _reply(node)
    reply.content[ARRAYS_KEY][key] = arr
    return reply


def _with_metrics(node, **metrics):
    reply = _reply(node)
    for name, value in metrics.items():
        reply.content["metrics"][name] = value
    return reply


@pytest.mark.parametrize(
    "make, match",
    [  # a label says float32, the bytes are float64: kept, it would make the model float64
        (lambda: _with_array(9, "ranking/w", _relabelled(
            GLOBAL["ranking/w"].astype(np.float64), dtype="float32")), "decodes as float64"),
        (lambda: _with_array(9, "ranking/w", _relabelled(["a", "b", "c"], dtype="float32")),
         "decodes as <U1"),
        (lambda: _with_array(9, "ranking/w", _relabelled(GLOBAL["ranking/w"],
                                                        stype="torch.Tensor")), "cannot be decoded"),
        (lambda: _with_metrics(9, **{"recall.loss": [0.5, 0.1]}), "not a number"),
        (lambda: _with_metrics(9, **{"recall-seconds": float("inf")}), "recall-seconds"),
        (lambda: _with_metrics(9, **{"recall.loss": float("-inf")}), "recall.loss"),
        (lambda: _reply(9, extra_records={"ledger": ConfigRecord({"entries": "abc"})}),
         "'ledger' record"),
    ],
)
def test_replies_that_would_crash_or_poison_the_round_are_rejected(make, match):
    """Each of these crashed the server or slipped a float64 array into the global model, and
    none of them stops Observed: the others are aggregated as if it had not been sent."""
    bad = make()
    kept, rejected = UpdateScreen().screen(_sent(), [*_honest(), bad])
    assert len(kept) == 4 and [n for n, _ in rejected] == [9]
    assert match in rejected[0][1]
    strategy = Observed(FedAvg(arrayrecord_key=ARRAYS_KEY, min_available_nodes=1,
                               min_train_nodes=1), screen=UpdateScreen())
    strategy._sent = _sent()
    arrays, _ = strategy.aggregate_train(1, [*_honest(), make()])
    expected = FedAvg(arrayrecord_key=ARRAYS_KEY).aggregate_train(1, _honest())[0]
    for key in GLOBAL:
        assert arrays[key].numpy().dtype == GLOBAL[key].dtype
        np.testing.assert_allclose(arrays[key].numpy(), expected[key].numpy(), rtol=1e-6)


def test_a_metric_only_some_replies_carry_is_dropped_not_the_reply():
    """Flower aborts the round on replies with different metric names. Deciding by the
    majority's names would let colluders adding one make an honest reply the odd one out:
    the names every kept reply shares are kept, and no reply is rejected for its names."""
    odd = [_with_metrics(n, **{"zz-extra": 1.0}) for n in (2, 3)]
    kept, rejected = UpdateScreen().screen(_sent(), [_reply(1), *odd])
    assert rejected == [] and len(kept) == 3
    assert all(set(m.content["metrics"]) == {"num-examples", "recall.loss"} for m in kept)
    strategy = Observed(FedAvg(arrayrecord_key=ARRAYS_KEY, min_available_nodes=1,
                               min_train_nodes=1), screen=UpdateScreen())
    strategy._sent = _sent()
    _, metrics = strategy.aggregate_train(1, [*_honest(), _with_metrics(9, **{"zz": 1.0})])
    assert "zz" not in metrics and strategy.rounds[1].replies == 5


def test_a_kept_reply_is_put_in_the_global_models_key_order():
    """Strategies that work by position (FedAvgM's momentum, Krum) take the first reply's
    order: a reply listing the same arrays in another order must not mix the tasks."""
    reordered = _reply(1)
    record = reordered.content[ARRAYS_KEY]
    reordered.content[ARRAYS_KEY] = ArrayRecord({k: record[k] for k in reversed(list(record))})
    kept, rejected = UpdateScreen().screen(_sent(), [reordered, *_honest()[1:]])
    assert rejected == [] and all(list(m.content[ARRAYS_KEY]) == list(GLOBAL) for m in kept)


def test_a_rejected_replys_ledger_lines_are_still_counted():
    """Its client released the update and ledgered it, kept or not: the run's summary must
    count that epsilon."""
    strategy = Observed(FedAvg(arrayrecord_key=ARRAYS_KEY, min_available_nodes=1,
                               min_train_nodes=1), screen=UpdateScreen(norm_action="reject"))
    strategy._sent = _sent()
    bad = _bad("huge norm")
    bad.content["ledger"] = ConfigRecord({"entries": ["line of node 99"]})
    strategy.aggregate_train(1, [*_honest(), bad])
    rlog = strategy.rounds[1]
    assert [n for n, _ in rlog.rejected] == [99]
    assert rlog.ledger_entries.count("x") == 4 and "line of node 99" in rlog.ledger_entries


def test_clipping_bound_applies_when_clients_clip_their_whole_update():
    screen = UpdateScreen(norm_bound=1.0, norm_factor=0)
    small = _reply(1, step=0.01)  # norm ~0.05
    big = _reply(2, {k: v + 0.5 for k, v in GLOBAL.items()})  # norm ~2.2
    kept, rejected = screen.screen(_sent(), [small, big])
    assert kept == [small] and rejected[0][0] == 2 and "clipping bound" in rejected[0][1]


def test_median_rule_needs_three_replies_and_can_be_switched_off():
    pair = [_honest(1)[0], _bad("huge norm")]
    assert UpdateScreen().screen(_sent(), pair)[1] == []  # two replies: no reference
    many = [*_honest(), _bad("huge norm")]
    assert UpdateScreen(norm_factor=0).screen(_sent(), many)[1] == []


def test_error_replies_pass_through_to_the_strategy():
    ins = Message(RecordDict(), dst_node_id=5, message_type="train")
    err = Message(Error(code=4001, reason="budget"), reply_to=ins)
    kept, rejected = UpdateScreen().screen(_sent(), [*_honest(), err])
    assert err in kept and rejected == []


def test_observed_aggregates_only_what_the_screen_kept():
    inner = FedAvg(arrayrecord_key=ARRAYS_KEY, min_available_nodes=1, min_train_nodes=1)
    strategy = Observed(inner, screen=UpdateScreen(norm_action="reject"))
    honest = _honest()
    strategy._sent = _sent()
    arrays, _ = strategy.aggregate_train(1, [*honest, _bad("nan"), _bad("huge norm")])
    rlog = strategy.rounds[1]
    assert rlog.replies == 4 and len(rlog.rejected) == 2
    expected = FedAvg(arrayrecord_key=ARRAYS_KEY).aggregate_train(1, _honest())[0]
    for key in GLOBAL:
        np.testing.assert_allclose(arrays[key].numpy(), expected[key].numpy(), rtol=1e-6)


def test_screen_follows_the_config():
    plain = make_screen(load_config(None, {"reject_norm_factor": 5.0}))
    assert plain.norm_bound is None and plain.norm_factor == 5.0
    user = make_screen(
        load_config(None, {"privacy.mode": "user", "privacy.clipping_side": "client"})
    )
    assert user.norm_bound == 1.0 and user.weight_key == "dp-weight"
    with pytest.raises(ValueError, match="norm_factor"):
        UpdateScreen(norm_factor=0.5)


def test_poisoned_update_is_the_honest_one_scaled_or_flipped():
    sent, honest = _sent(), _reply(1).content[ARRAYS_KEY]
    for factor in (10.0, -1.0):
        bad = poison(sent, honest, factor)
        for k in GLOBAL:
            delta = honest[k].numpy() - GLOBAL[k]
            np.testing.assert_allclose(bad[k].numpy() - GLOBAL[k], factor * delta, rtol=1e-4)
            assert bad[k].numpy().dtype == np.float32
    plan = FaultPlan(fail_share=0.3, attack_share=0.1, seed=3)
    assert all(len(plan.failing(10, r)) == 3 for r in (1, 2, 3))
    assert len(plan.attackers(10)) == 1 and plan.failing(10, 1) != plan.failing(10, 2)
    with pytest.raises(ValueError, match="attack_from_round"):
        FaultPlan(attack_share=0.1, attack_from_round=0)


def _non_iid(n=6, seed=1):
    """Honest updates sharing a direction, each with its own larger part (cosines ~0.4-0.6)."""
    rng = np.random.default_rng(seed)
    common = {k: rng.normal(size=v.shape) for k, v in GLOBAL.items()}
    replies = []
    for node in range(1, n + 1):
        own = {k: 0.01 * (c + 0.8 * rng.normal(size=c.shape)) for k, c in common.items()}
        replies.append(_reply(node, {k: (GLOBAL[k] + own[k]).astype(np.float32) for k in GLOBAL}))
    return replies


def _step(replies=None):
    """A last step of the global model: the mean of ``replies``' updates (the honest
    ``_non_iid`` ones by default), as FedAvg moved the model the round before."""
    replies = _non_iid() if replies is None else replies
    return {k: np.mean([r.content[ARRAYS_KEY][k].numpy() - v for r in replies], axis=0)
            for k, v in GLOBAL.items()}


def _flipped(reply, node, tasks=("recall", "ranking")):
    arrays = {}
    for k, v in GLOBAL.items():
        delta = reply.content[ARRAYS_KEY][k].numpy() - v
        arrays[k] = (v - delta if k.split("/")[0] in tasks else v + delta).astype(np.float32)
    return _reply(node, arrays)


def test_sign_flipped_update_is_rejected_and_honest_non_iid_updates_are_kept():
    honest = _non_iid()
    flipped = _flipped(honest[0], 98)
    kept, rejected = UpdateScreen().screen(_sent(), [*honest, flipped])
    assert kept == honest
    assert [node for node, _ in rejected] == [98] and "cosine" in rejected[0][1]
    # one task flipped is enough, and the reason names it
    kept, rejected = UpdateScreen().screen(_sent(), [*honest, _flipped(honest[1], 97, ("ranking",))])
    assert kept == honest and "'ranking'" in rejected[0][1]


def _moved(node, step):
    return _reply(node, {k: (v + step * np.ones_like(v)).astype(np.float32)
                         for k, v in GLOBAL.items()})


def test_direction_rule_needs_four_replies_and_can_be_switched_off(caplog):
    honest = _non_iid()
    pair = [honest[0], _flipped(honest[1], 98)]
    assert UpdateScreen().screen(_sent(), pair)[1] == []  # two replies: no reference
    # three: each would be judged against the mean of the two others, which one attacker
    # (here a flipped x2.9 update, inside the norm rule) decides for both honest replies
    x29 = {k: (v - 2.9 * (honest[0].content[ARRAYS_KEY][k].numpy() - v)).astype(np.float32)
           for k, v in GLOBAL.items()}
    for action in ("reflect", "reject"):
        screen = UpdateScreen(direction_action=action, norm_factor=0)
        kept, rejected, adjusted = screen.screen_all(
            _sent(), [*_non_iid()[:2], _reply(98, x29)]
        )
        assert len(kept) == 3 and rejected == [] and adjusted == []
    four = [*_non_iid()[:3], _flipped(_non_iid()[0], 98)]
    assert [node for node, _ in UpdateScreen().screen(_sent(), four)[1]] == [98]
    off = UpdateScreen(min_cosine=-1.0).screen(_sent(), [*honest, _flipped(honest[0], 98)])
    assert off[1] == []
    assert make_screen(load_config(None, {"reject_min_cosine": -1})).min_cosine == -1
    with pytest.raises(ValueError, match="min_cosine"):
        UpdateScreen(min_cosine=1.0)
    # off under DP (record-level: the noise leaves no shared direction; user-level: clipping
    # bounds each update and a rejection skips the round), on without
    with caplog.at_level("WARNING", logger="fedrec.strategies.screen"):
        for mode in ("record", "user"):
            assert make_screen(load_config(None, {"privacy.mode": mode})).min_cosine == -1
        assert not [r for r in caplog.records if r.name == "fedrec.strategies.screen"]
        explicit = {"privacy.mode": "record", "reject_min_cosine": 0.2}
        assert make_screen(load_config(None, explicit)).min_cosine == -1
    assert "reject_min_cosine = 0.2 is ignored" in caplog.text
    assert make_screen(load_config(None, {})).min_cosine == 0


def test_aggregation_does_not_depend_on_the_order_replies_arrive_in():
    """Float sums depend on order; Flower sums replies in list order. Observed sorts them by
    content, so the same replies arriving in any order give the same global model, bit for bit
    (a run is reproducible from its seed)."""
    big = {"recall/emb": np.full((6, 4), 1e8, np.float32), "ranking/w": np.ones(3, np.float32)}
    values = [big, {k: np.full_like(v, 1.0) for k, v in big.items()},
              {k: -v for k, v in big.items()}]  # fmt: skip
    orders = [(0, 1, 2), (0, 2, 1), (2, 1, 0), (1, 0, 2)]

    def fedavg(order, observed):
        inner = FedAvg(arrayrecord_key=ARRAYS_KEY, min_available_nodes=1, min_train_nodes=1)
        strategy = Observed(inner) if observed else inner
        replies = [_reply(i + 1, arrays=values[i], weight=1) for i in order]
        return strategy.aggregate_train(1, replies)[0]["recall/emb"].numpy()

    plain = [fedavg(order, observed=False) for order in orders]
    assert any(not np.array_equal(plain[0], p) for p in plain[1:])  # order matters to Flower
    sorted_ = [fedavg(order, observed=True) for order in orders]
    assert all(np.array_equal(sorted_[0], s) for s in sorted_[1:])


def _task_norm(arrays, task):
    return np.sqrt(sum(
        float(np.sum((arrays[k].numpy().astype(np.float64) - GLOBAL[k]) ** 2))
        for k in GLOBAL if k.startswith(task + "/")
    ))


def test_rescale_keeps_an_over_scaled_update_at_the_median_norm_in_its_own_direction():
    honest = _non_iid()
    sent = _sent()
    # x20 in recall only, and ranking the honest update of largest norm (above the median, under
    # the rule): ranking must be left as sent
    big = max(honest, key=lambda r: _task_norm(r.content[ARRAYS_KEY], "ranking"))
    scaled_recall = {
        k: (v + (20.0 if k.startswith("recall/") else 1.0)
            * (big.content[ARRAYS_KEY][k].numpy() - v)).astype(np.float32)
        for k, v in GLOBAL.items()
    }
    outlier = _reply(98, scaled_recall)
    # the round's median counts every well-formed reply, the outlier's too
    median = float(np.median([_task_norm(r.content[ARRAYS_KEY], "recall")
                              for r in [*honest, outlier]]))
    screen = UpdateScreen()  # rescale is the default
    kept, rejected, rescaled = screen.screen_all(sent, [*honest, outlier])
    assert rejected == [] and outlier in kept
    assert [node for node, _ in rescaled] == [98] and "'recall'" in rescaled[0][1]
    after = outlier.content[ARRAYS_KEY]
    assert _task_norm(after, "recall") == pytest.approx(median, rel=1e-5)
    ranking_median = float(np.median([_task_norm(r.content[ARRAYS_KEY], "ranking")
                                      for r in [*honest, outlier]]))
    assert _task_norm(after, "ranking") > 1.05 * ranking_median  # above the median, kept
    delta = after["recall/emb"].numpy() - GLOBAL["recall/emb"]
    own = big.content[ARRAYS_KEY]["recall/emb"].numpy() - GLOBAL["recall/emb"]
    cosine = float(np.sum(delta * own) / np.linalg.norm(delta) / np.linalg.norm(own))
    assert cosine == pytest.approx(1.0, abs=1e-5) and after["recall/emb"].numpy().dtype == np.float32
    np.testing.assert_array_equal(after["ranking/w"].numpy(), scaled_recall["ranking/w"])
    # the same update is rejected outright under norm_action="reject"
    again = _reply(98, scaled_recall)
    kept, rejected = UpdateScreen(norm_action="reject").screen(sent, [*honest, again])
    assert again not in kept and [node for node, _ in rejected] == [98]


def test_a_rescaled_update_that_points_away_is_still_rejected():
    honest = _non_iid()
    flipped_x20 = {
        k: (v - 20.0 * (honest[0].content[ARRAYS_KEY][k].numpy() - v)).astype(np.float32)
        for k, v in GLOBAL.items()
    }
    kept, rejected, rescaled = UpdateScreen().screen_all(
        _sent(), [*honest, _reply(98, flipped_x20)]
    )
    assert kept == honest and [node for node, _ in rejected] == [98] and rescaled == []
    assert "cosine" in rejected[0][1] and "after the screen adjusted it" in rejected[0][1]


def test_reflect_keeps_a_flipped_update_as_its_honest_one():
    honest = _non_iid()
    flipped = _flipped(honest[0], 98, ("ranking",))  # recall sent as it is, ranking flipped
    screen = UpdateScreen(direction_action="reflect")
    kept, rejected, adjusted = screen.screen_all(_sent(), [*honest, flipped], last_step=_step())
    assert rejected == [] and flipped in kept
    assert [node for node, _ in adjusted] == [98]
    assert "'ranking'" in adjusted[0][1] and "reflected" in adjusted[0][1]
    assert "'recall'" not in adjusted[0][1]
    for k in GLOBAL:  # both tasks now hold the honest update (up to float32 rounding)
        np.testing.assert_allclose(flipped.content[ARRAYS_KEY][k].numpy(),
                                   honest[0].content[ARRAYS_KEY][k].numpy(), rtol=0, atol=1e-6)
        assert flipped.content[ARRAYS_KEY][k].numpy().dtype == np.float32
    # a flipped x20 update is first rescaled to its predicted norm, then reflected
    x20 = {k: (v - 20.0 * (honest[1].content[ARRAYS_KEY][k].numpy() - v)).astype(np.float32)
           for k, v in GLOBAL.items()}
    bad = _reply(97, x20)
    kept, rejected, adjusted = screen.screen_all(_sent(), [*_non_iid(), bad], last_step=_step())
    assert rejected == [] and "update norm" in adjusted[0][1] and "reflected" in adjusted[0][1]
    delta = bad.content[ARRAYS_KEY]["recall/emb"].numpy() - GLOBAL["recall/emb"]
    own = honest[1].content[ARRAYS_KEY]["recall/emb"].numpy() - GLOBAL["recall/emb"]
    assert float(np.sum(delta * own) / np.linalg.norm(delta) / np.linalg.norm(own)) > 0.999


def test_reflect_needs_the_flip_contrary_to_the_global_models_last_step():
    """Colluders can steer this round's median, not the global model's last step: an update
    below the rule that agrees with where the model has been going is rejected, not added
    negated, and so is every update below the rule when there is no last step to ask (the first
    round, a resumed run's first round after an older checkpoint, a round after one with no
    aggregate). A flip of an honest update is contrary to the last step as its honest update
    agrees with it."""
    honest = _non_iid()
    screen = UpdateScreen(direction_action="reflect")
    zero = {k: np.zeros_like(v, dtype=np.float64) for k, v in GLOBAL.items()}
    for step, why in [(None, "no last step"), (zero, "no last step"),
                      ({k: -v for k, v in _step().items()}, "with the global model's last step")]:
        flipped = _flipped(honest[0], 98)
        kept, rejected, adjusted = screen.screen_all(_sent(), [*honest, flipped], last_step=step)
        assert kept == honest and adjusted == [] and [n for n, _ in rejected] == [98]
        assert "not reflected" in rejected[0][1] and why in rejected[0][1]
    # the margin is reflect_cosine: a last step the honest update (the flip negated) is at
    # cosine 0.05 with is not enough, one at 0.15 is
    step = _step()
    for cosine, reflected in [(0.05, False), (0.15, True)]:
        tilted = {}
        for k, v in GLOBAL.items():
            own = (honest[0].content[ARRAYS_KEY][k].numpy() - v).astype(np.float64)
            own /= np.linalg.norm(own)
            across = step[k] - (step[k].ravel() @ own.ravel()) * own
            across /= np.linalg.norm(across)
            tilted[k] = cosine * own + np.sqrt(1 - cosine**2) * across
        kept, rejected, _ = screen.screen_all(_sent(), [*honest, _flipped(honest[0], 98)],
                                              last_step=tilted)
        if reflected:
            assert rejected == [] and len(kept) == len(honest) + 1
        else:
            assert "negated has cosine 0.050 with the global model's last step" in \
                dict(rejected)[98]


@pytest.mark.parametrize("n", [2, 3, 4, 5, 21])
def test_the_medians_are_numpys_of_all_rows_and_of_the_other_rows(n):
    rng = np.random.default_rng(n)
    updates = rng.normal(size=(n, 40))
    updates[:, :5] = np.round(updates[:, :5])  # ties
    expected = np.stack([np.median(np.delete(updates, i, axis=0), axis=0) for i in range(n)])
    median, others = median_and_leave_one_out(updates)
    np.testing.assert_array_equal(others, expected)
    np.testing.assert_array_equal(median, np.median(updates, axis=0))


def test_a_flipped_update_is_judged_at_minus_its_honest_cosine():
    """Each update is compared with the median of the other updates, so its own vote cannot
    pull the reference towards it: flipping it flips its cosine exactly. Against the median of
    all replies, a flipped update helps make the median it is judged by."""
    honest = _non_iid()
    probe = UpdateScreen(min_cosine=0.99)  # reports every task's cosine

    def cosines(replies):
        _, rejected = probe.screen(_sent(), replies)
        reason = dict(rejected)[98]
        return {t: float(c) for t, c in re.findall(r"'(\w+)' update has cosine (-?[\d.]+)", reason)}

    own = cosines([*honest[1:], _reply(98, {k: honest[0].content[ARRAYS_KEY][k].numpy()
                                             for k in GLOBAL})])
    flipped = cosines([*honest[1:], _flipped(honest[0], 98)])
    assert set(own) == set(flipped) == {"recall", "ranking"}
    for task, c in own.items():
        assert c > 0.2 and flipped[task] == pytest.approx(-c, abs=1e-3), task


def test_reflect_rejects_an_update_only_just_below_the_rule():
    """Steering the median pushes an honest update only just below 0: reflecting that would add
    it negated at its full weight, so "reflect" keeps only a negation at least reflect_cosine
    aligned with the median and rejects one nearer the rule."""
    honest = _non_iid()
    mean = {k: np.mean([r.content[ARRAYS_KEY][k].numpy() - v for r in honest], axis=0)
            for k, v in GLOBAL.items()}
    rng = np.random.default_rng(2)
    arrays = {k: (v - 0.1 * mean[k] + 0.01 * rng.normal(size=v.shape)).astype(np.float32)
              for k, v in GLOBAL.items()}
    kept, rejected, adjusted = UpdateScreen(direction_action="reflect").screen_all(
        _sent(), [*honest, _reply(98, arrays)], last_step=_step()
    )
    assert kept == honest and adjusted == [] and [node for node, _ in rejected] == [98]
    cosine = float(re.search(r"cosine (-?[\d.]+)", rejected[0][1]).group(1))
    assert -0.1 < cosine < 0  # under the rule, but not 0.1 below it
    assert f"negated would have cosine {-cosine:.3f}, under 0.1" in rejected[0][1]
    # with no margin the same update is kept negated
    near = _reply(98, arrays)
    kept, rejected, adjusted = UpdateScreen(direction_action="reflect", reflect_cosine=0.0) \
        .screen_all(_sent(), [*honest, near], last_step=_step())
    assert rejected == [] and near in kept and "reflected" in adjusted[0][1]
    assert make_screen(load_config(None, {"direction_outliers": "reflect",
                                          "reflect_min_cosine": 0.5})).reflect_cosine == 0.5
    with pytest.raises(ConfigError, match="reflect_min_cosine"):
        load_config(None, {"reflect_min_cosine": 1.0})
    with pytest.raises(ValueError, match="reflect_cosine"):
        UpdateScreen(reflect_cosine=-0.1)
    # the default is written nowhere (same config hash as before the setting existed)
    assert "reflect_min_cosine" not in load_config(None, {}).to_dict()


def test_reflect_needs_the_update_below_the_rule_against_all_replies_too():
    """An update judged against the others' median at cosine -1, but which the median of all
    replies (its own vote included) puts at +1, is rejected, not added negated: that is how an
    honest update pushed by colluders steering the median looks, not a flip."""
    target = _moved(1, 1.0)
    others = [_moved(2, -1.0), _moved(3, 2.0), _moved(4, -0.5)]  # per coordinate
    # a last step its negation agrees with: only the median of all replies holds it back
    negation = {k: -(target.content[ARRAYS_KEY][k].numpy() - v) for k, v in GLOBAL.items()}
    kept, rejected, adjusted = UpdateScreen(direction_action="reflect", norm_factor=0) \
        .screen_all(_sent(), [target, *others], last_step=negation)
    assert 1 in dict(rejected) and target not in kept
    assert "cosine -1.000" in dict(rejected)[1]
    assert "has cosine 1.000 with the median of all updates" in dict(rejected)[1]
    assert 1 not in dict(adjusted)


def test_reflect_never_keeps_what_the_rule_would_reject_and_follows_the_config():
    honest = _non_iid()
    # with min_cosine 0.2: this update's ranking part has cosine -0.25 (its negation would pass)
    # but its recall part 0.19, which neither it nor its negation passes: the reply is rejected
    rng = np.random.default_rng(5)
    sideways = {k: (v + 0.01 * rng.normal(size=v.shape)).astype(np.float32)
                for k, v in GLOBAL.items()}
    screen = UpdateScreen(min_cosine=0.2, direction_action="reflect")
    kept, rejected, _ = screen.screen_all(_sent(), [*honest, _reply(98, sideways)],
                                          last_step=_step())
    assert [node for node, _ in rejected] == [98] and kept == honest
    assert "not reflected: 'recall' negated would have cosine" in rejected[0][1]
    # a flipped update whose every failing task passes once negated is kept
    flipped = _flipped(honest[2], 97)
    kept, rejected, _ = screen.screen_all(_sent(), [*honest, flipped], last_step=_step())
    assert rejected == [] and flipped in kept
    assert make_screen(load_config(None, {})).direction_action == "reflect"  # the default
    assert make_screen(load_config(None, {})).may_reflect
    assert make_screen(load_config(None, {"direction_outliers": "reject"})).direction_action \
        == "reject"
    # moot under DP, where the direction rule is off (make_screen): nothing is reflected
    for mode in ("record", "user"):
        assert not make_screen(load_config(None, {"privacy.mode": mode})).may_reflect
    assert not make_screen(load_config(None, {"reject_min_cosine": -1})).may_reflect
    with pytest.raises(ConfigError, match="direction_outliers"):
        load_config(None, {"direction_outliers": "flip"})
    with pytest.raises(ValueError, match="direction_action"):
        UpdateScreen(direction_action="flip")
    # the default is written nowhere (a partner site on a fedrec before the setting existed
    # accepts the default config)
    assert "direction_outliers" not in load_config(None, {}).to_dict()
    assert load_config(None, {"direction_outliers": "reject"}).to_dict()["direction_outliers"] \
        == "reject"


def test_a_zero_median_norm_bounds_movement_at_zero():
    """Most of the round sent the model back unchanged: the predicted norm is 0, and an update
    of any size is over the rule (it was let through while the prediction was 0)."""
    still = [_reply(n, {k: v.copy() for k, v in GLOBAL.items()}) for n in range(1, 5)]
    moving = _reply(98, {k: v + 5.0 for k, v in GLOBAL.items()})
    kept, rejected, adjusted = UpdateScreen().screen_all(_sent(), [*still, moving])
    assert rejected == [] and [node for node, _ in adjusted] == [98]
    for k in GLOBAL:  # rescaled to nothing
        np.testing.assert_array_equal(moving.content[ARRAYS_KEY][k].numpy(), GLOBAL[k])
    again = _reply(98, {k: v + 5.0 for k, v in GLOBAL.items()})
    kept, rejected = UpdateScreen(norm_action="reject").screen(_sent(), [*still, again])
    assert again not in kept and [node for node, _ in rejected] == [98]


def test_observed_aggregates_the_rescaled_update_and_the_config_selects_the_action():
    inner = FedAvg(arrayrecord_key=ARRAYS_KEY, min_available_nodes=1, min_train_nodes=1)
    strategy = Observed(inner, screen=make_screen(load_config(None, {})))  # the default: rescale
    strategy._sent = _sent()
    honest, bad = _honest(), _bad("huge norm")  # +50 on every weight: over 10x in both tasks
    arrays, _ = strategy.aggregate_train(1, [*honest, bad])
    rlog = strategy.rounds[1]
    assert rlog.replies == 5 and rlog.rejected == [] and [n for n, _ in rlog.rescaled] == [99]
    # FedAvg (equal weights) over the honest updates and the bad one at each task's median norm
    updates = [{k: r.content[ARRAYS_KEY][k].numpy() - GLOBAL[k] for k in GLOBAL} for r in honest]
    bad_update = {k: np.full_like(v, 50.0) for k, v in GLOBAL.items()}
    everyone = [*updates, bad_update]
    for task in ("recall", "ranking"):
        keys = [k for k in GLOBAL if k.startswith(task + "/")]
        norms = [np.sqrt(sum(float(np.sum(u[k].astype(np.float64) ** 2)) for k in keys))
                 for u in everyone]
        factor = float(np.median(norms)) / norms[-1]
        for k in keys:
            expected = GLOBAL[k] + np.mean([*(u[k] for u in updates), factor * bad_update[k]], 0)
            np.testing.assert_allclose(arrays[k].numpy(), expected, rtol=1e-5, atol=1e-6)
    reject = make_screen(load_config(None, {"norm_outliers": "reject"}))
    assert reject.norm_action == "reject"
    # user-level DP: each user's influence is bounded by clipping alone, never by a median of
    # other users' norms, so norm outliers are rejected whatever norm_outliers says
    for side in ("server", "client"):
        user = make_screen(load_config(None, {"privacy.mode": "user", "privacy.clipping_side": side}))
        assert user.norm_action == "reject"
    with pytest.raises(ValueError, match="norm_outliers"):
        load_config(None, {"norm_outliers": "clip"})
    with pytest.raises(ValueError, match="norm_action"):
        UpdateScreen(norm_action="clip")


SIZES = (7, 9, 12, 20, 28, 33, 45, 67, 90, 196)


def _sized(seed=2, slope=0.5):
    """Honest updates of silos of very unequal size, each of norm ~ users ** slope (a large silo
    takes more local steps), sharing a direction: the spread of the default federation."""
    rng = np.random.default_rng(seed)
    common = {k: rng.normal(size=v.shape) for k, v in GLOBAL.items()}
    replies = []
    for node, users in enumerate(SIZES, start=1):
        own = {k: c + 0.8 * rng.normal(size=c.shape) for k, c in common.items()}
        for task in ("recall", "ranking"):
            keys = [k for k in GLOBAL if k.startswith(task)]
            norm = np.sqrt(sum(float(np.sum(own[k] ** 2)) for k in keys))
            for k in keys:  # each task's update at 0.01 * users ** slope, times 0.8-1.25
                own[k] *= 0.01 * users**slope * rng.uniform(0.8, 1.25) / norm
        arrays = {k: (GLOBAL[k] + own[k]).astype(np.float32) for k in GLOBAL}
        replies.append(_reply(node, arrays, weight=users))
    return replies


def _scaled(reply, node, factor):
    arrays = {k: (v + factor * (reply.content[ARRAYS_KEY][k].numpy() - v)).astype(np.float32)
              for k, v in GLOBAL.items()}  # fmt: skip
    weight = next(iter(reply.content.metric_records.values()))["num-examples"]
    return _reply(node, arrays, weight=weight)


def test_predicted_norms_fit_a_power_of_the_users_robustly():
    sizes = np.array(SIZES, dtype=float)
    norms = 0.3 * sizes**0.6
    predicted, slope = predicted_norms(norms, sizes)
    assert slope == pytest.approx(0.6) and predicted == pytest.approx(norms)
    poisoned = norms.copy()
    poisoned[[0, 9]] *= 10  # a 10% minority scaled x10 (the smallest and the largest silo)
    predicted, slope = predicted_norms(poisoned, sizes)
    assert 0.5 < slope < 0.7 and np.all(predicted / norms < 1.3) and np.all(predicted / norms > 0.77)
    # no slope (one size for all, or norms falling with size: clamped at 0): the median
    for flat_sizes in (np.full(10, 5.0), None):
        predicted, slope = predicted_norms(norms, flat_sizes)
        assert slope == 0 and np.all(predicted == np.median(norms))
    predicted, slope = predicted_norms(norms[::-1], sizes)
    assert slope == 0 and np.all(predicted == np.median(norms))


def test_the_largest_silo_is_not_an_outlier_but_its_x10_update_is_rescaled_to_its_own_size():
    honest = _sized()
    big = honest[-1]  # 196 users, honest norm ~2.4x the median: inside the rule
    before = [{t: _task_norm(r.content[ARRAYS_KEY], t) for t in ("recall", "ranking")}
              for r in honest]  # fmt: skip
    attacker = _scaled(honest[2], 99, 10.0)  # a 12-user silo sending x10: under 10x the median
    kept, rejected, rescaled = UpdateScreen().screen_all(_sent(), [*honest, attacker])
    assert rejected == [] and [node for node, _ in rescaled] == [99]
    assert "predicted for its 12 users" in rescaled[0][1]
    assert kept == [*honest, attacker] and before == [  # every honest update left as sent
        {t: _task_norm(r.content[ARRAYS_KEY], t) for t in ("recall", "ranking")} for r in honest]
    for task in ("recall", "ranking"):
        honest_norm = _task_norm(honest[2].content[ARRAYS_KEY], task)
        assert _task_norm(attacker.content[ARRAYS_KEY], task) / honest_norm < 1.6  # was 10x
    # the largest silo sending x10: rescaled to about its own honest norm, not to the median
    attacker = _scaled(big, 98, 10.0)
    _, _, rescaled = UpdateScreen().screen_all(_sent(), [*honest, attacker])
    assert [node for node, _ in rescaled] == [98]
    median = float(np.median([_task_norm(r.content[ARRAYS_KEY], "recall") for r in honest]))
    after = _task_norm(attacker.content[ARRAYS_KEY], "recall")
    assert 0.6 < after / _task_norm(big.content[ARRAYS_KEY], "recall") < 1.6
    assert after > 1.5 * median
    # the median reference (the rule before the size fit) misses the small attacker at 10x
    small = _scaled(honest[2], 99, 10.0)
    old = UpdateScreen(norm_factor=10.0, norm_reference="median")
    assert old.screen_all(_sent(), [*honest, small])[2] == []


def test_the_norm_reference_follows_the_config():
    assert make_screen(load_config(None, {})).norm_reference == "size"
    assert make_screen(load_config(None, {})).norm_factor == 3.0
    old = make_screen(load_config(None, {"norm_reference": "median", "reject_norm_factor": 10}))
    assert (old.norm_reference, old.norm_factor) == ("median", 10.0)
    # user-level DP: a rejection skips the round, so the rule only catches absurd updates
    user = make_screen(load_config(None, {"privacy.mode": "user"}))
    assert user.norm_factor == 10.0 and user.norm_action == "reject"
    off = make_screen(load_config(None, {"privacy.mode": "user", "reject_norm_factor": 0}))
    assert off.norm_factor == 0
    with pytest.raises(ValueError, match="norm_reference"):
        load_config(None, {"norm_reference": "mean"})
    with pytest.raises(ValueError, match="norm_reference"):
        UpdateScreen(norm_reference="mean")


def _liar(honest, weight=1_000_000):
    """An x500 update from a client claiming ``weight`` users."""
    liar = _scaled(honest[4], 99, 500.0)
    return _reply(99, {k: liar.content[ARRAYS_KEY][k].numpy() for k in GLOBAL}, weight=weight)


def test_a_client_that_overstates_its_users_buys_at_most_the_ceiling():
    honest = _sized()
    liar = _liar(honest)  # x500, claiming a million users
    median = float(np.median([_task_norm(r.content[ARRAYS_KEY], "recall")
                              for r in [*honest, liar]]))  # fmt: skip
    screen = UpdateScreen(max_weight_factor=0)  # the norm rule's own ceiling, weights as stated
    kept, rejected, rescaled = screen.screen_all(_sent(), [*honest, liar])
    assert [node for node, _ in rescaled] == [99] and "at most 5x" in rescaled[0][1]
    after = _task_norm(liar.content[ARRAYS_KEY], "recall")
    assert after == pytest.approx(SIZE_CEILING * median, rel=1e-5)  # not 500x anything


def test_an_overstated_weight_is_lowered_to_10x_the_median_before_fedavg_averages():
    honest = _sized()
    inner = FedAvg(arrayrecord_key=ARRAYS_KEY, min_available_nodes=1, min_train_nodes=1)
    strategy = Observed(inner, screen=make_screen(load_config(None, {})))
    strategy._sent = _sent()
    liar = _liar(honest)
    arrays, _ = strategy.aggregate_train(1, [*honest, liar])
    median = float(np.median([*SIZES, 1_000_000]))  # 33 users: 10x is 330
    assert median == 33
    (node, why), = strategy.rounds[1].rescaled
    assert node == 99 and "weight 'num-examples' 1e+06 lowered to 330" in why
    assert "predicted for its 330 users" in why  # the norm rule predicts from the lowered weight
    # FedAvg's result is the weighted mean with the liar at 390, its update as rescaled
    weights = [*SIZES, int(10 * median)]
    everyone = [*honest, liar]
    for k in GLOBAL:
        expected = sum(w * r.content[ARRAYS_KEY][k].numpy().astype(np.float64)
                       for w, r in zip(weights, everyone, strict=True)) / sum(weights)
        np.testing.assert_allclose(arrays[k].numpy(), expected, rtol=1e-5)
    # without the cap, the same liar holds 99.96% of FedAvg's weight
    uncapped = Observed(FedAvg(arrayrecord_key=ARRAYS_KEY, min_available_nodes=1,
                               min_train_nodes=1), screen=UpdateScreen(max_weight_factor=0))
    uncapped._sent = _sent()
    far, _ = uncapped.aggregate_train(1, [*_sized(), _liar(_sized())])
    liar_share = 1_000_000 / (1_000_000 + sum(SIZES))
    assert liar_share > 0.999
    moved = {k: float(np.linalg.norm(far[k].numpy() - GLOBAL[k])) for k in GLOBAL}
    capped = {k: float(np.linalg.norm(arrays[k].numpy() - GLOBAL[k])) for k in GLOBAL}
    assert all(moved[k] > 2 * capped[k] for k in GLOBAL)


def test_a_rejected_liar_is_reported_with_its_weight_too():
    honest = _sized()
    kept, rejected, rescaled = UpdateScreen(norm_action="reject").screen_all(
        _sent(), [*honest, _liar(honest)]
    )
    assert kept == honest and rescaled == [] and [n for n, _ in rejected] == [99]
    assert "weight 'num-examples' 1e+06 lowered to 330" in rejected[0][1]
    assert "predicted for its 330 users" in rejected[0][1]


def test_honest_weights_and_few_replies_are_left_as_stated():
    honest = _sized()  # 196 users is 6.4x this round's median (30.5): under 10x
    kept, rejected, rescaled = UpdateScreen().screen_all(_sent(), honest)
    assert rejected == [] and rescaled == []
    assert [next(iter(r.content.metric_records.values()))["num-examples"] for r in kept] == \
        list(SIZES)
    two = [_reply(1, weight=10), _reply(2, weight=10_000)]  # no median of fewer than 3
    assert UpdateScreen(max_weight_factor=1.5, norm_factor=0).screen_all(_sent(), two)[2] == []
    three = [*two, _reply(3, weight=10)]  # the same factor acts from 3 replies on
    assert [n for n, _ in UpdateScreen(max_weight_factor=1.5, norm_factor=0).screen_all(
        _sent(), three)[2]] == [2]  # fmt: skip
    huge = _reply(5, weight=10**400)  # no float holds it: rejected, not a crash
    assert [n for n, _ in UpdateScreen().screen(_sent(), [*_honest(), huge])[1]] == [5]
    with pytest.raises(ValueError, match="max_weight_factor"):
        UpdateScreen(max_weight_factor=1.0)
    with pytest.raises(ConfigError, match="max_weight_factor"):
        load_config(None, {"max_weight_factor": 0.5})


def test_user_level_dp_rejects_any_weight_but_one():
    screen = make_screen(load_config(None, {"privacy.mode": "user"}))
    replies = [_reply(n) for n in range(1, 5)]
    for r in replies:  # the uniform weight every fedrec client sends under user-level DP
        next(iter(r.content.metric_records.values()))["dp-weight"] = 1.0
    next(iter(replies[3].content.metric_records.values()))["dp-weight"] = 100.0
    kept, rejected = screen.screen(_sent(), replies)
    assert kept == replies[:3] and [n for n, _ in rejected] == [4]
    assert "not 1" in rejected[0][1]


def test_few_replies_or_user_level_dp_compare_with_the_median():
    norms, sizes = np.array([1.0, 2.0, 4.0, 8.0]), np.array([1.0, 4.0, 16.0, 64.0])
    predicted, slope = predicted_norms(norms, sizes)  # 4 replies: no fit, however clean
    assert slope == 0 and np.all(predicted == 3.0)
    assert predicted_norms(np.append(norms, 16.0), np.append(sizes, 256.0))[1] == pytest.approx(0.5)
    user = make_screen(load_config(None, {"privacy.mode": "user"}))
    assert user.norm_reference == "median"  # num-examples is not a user-level client's weight


def test_a_registered_user_count_caps_the_weight_a_partner_states():
    """Deployed runs: the liar's node has a registered count (fedrec.deploy.registry), so its
    weight is its partner's count, not 10x the median, before FedAvg averages."""
    honest = _sized()
    liar = _liar(honest)  # claims a million users; its partner registered 30
    registered = {99: 30, 1: 10_000}  # node 1's count is above what it states: untouched
    inner = FedAvg(arrayrecord_key=ARRAYS_KEY, min_available_nodes=1, min_train_nodes=1)
    strategy = Observed(inner, screen=make_screen(load_config(None, {})),
                        registered=lambda grid: registered)  # fmt: skip
    strategy.configure_train(1, _sent(), ConfigRecord(), _NoNodes())
    arrays, _ = strategy.aggregate_train(1, [*honest, liar])
    (node, why), = strategy.rounds[1].rescaled
    assert node == 99 and "1e+06 lowered to 30 (the users registered for it)" in why
    assert "median weight" not in why  # 30 is under 10x the median: the relative cap is moot
    assert "predicted for its 30 users" in why  # the norm rule predicts from the count
    weights = [*SIZES, 30]
    everyone = [*honest, liar]
    for k in GLOBAL:
        expected = sum(w * r.content[ARRAYS_KEY][k].numpy().astype(np.float64)
                       for w, r in zip(weights, everyone, strict=True)) / sum(weights)
        np.testing.assert_allclose(arrays[k].numpy(), expected, rtol=1e-5)
    # without a registered count the same liar keeps 10x the median
    kept, _, rescaled = make_screen(load_config(None, {})).screen_all(
        _sent(), [*_sized(), _liar(_sized())], {1: 10_000}
    )
    assert "lowered to 330 (10x the round's median" in dict(rescaled)[99]


def test_a_node_online_only_after_sampling_still_gets_its_count_and_keeps_it():
    """The grid lists online nodes only: a partner offline when the round was sampled and
    online when it replies is looked up again, and its count stays known in later rounds."""
    asked = []

    def registered(grid):  # the SuperLink's answer: node 99 online from the second call on
        asked.append(1)
        others = {n: 1_000 for n in range(1, len(SIZES) + 1)}  # above what they state
        return {**others, 99: 30} if len(asked) == 2 else {}

    strategy = Observed(FedAvg(arrayrecord_key=ARRAYS_KEY, min_available_nodes=1,
                               min_train_nodes=1),
                        screen=make_screen(load_config(None, {})), registered=registered)  # fmt: skip
    for rnd in (1, 2):
        strategy.configure_train(rnd, _sent(), ConfigRecord(), _NoNodes())
        strategy._sent = _sent()
        honest = _sized()
        strategy.aggregate_train(rnd, [*honest, _liar(honest)])
        (node, why), = strategy.rounds[rnd].rescaled
        assert node == 99 and "lowered to 30 (the users registered" in why, (rnd, why)
    assert len(asked) == 2  # round 2 knew every sampled node's count: the grid was not asked
    assert strategy.registered_counts == {**{n: 1_000 for n in range(1, len(SIZES) + 1)}, 99: 30}


def test_a_registered_count_needs_no_median():
    two = [_reply(1, weight=10), _reply(2, weight=10_000)]  # no median needed for a count
    _, _, rescaled = UpdateScreen(norm_factor=0).screen_all(_sent(), two, {2: 50})
    assert rescaled == [(2, "weight 'num-examples' 10000 lowered to 50 (the users registered "
                            "for it)")]  # fmt: skip
    assert next(iter(two[1].content.metric_records.values()))["num-examples"] == 50


class _NoNodes:
    """A grid stand-in for FedAvg's sampling; the test's ``registered`` asks it nothing."""

    def get_node_ids(self):
        return [*range(1, len(SIZES) + 1), 99]

    def get_nodes(self):
        raise AssertionError("not called")


def test_krum_assumes_the_malicious_nodes_the_rounds_replies_allow():
    """Sampling 11 of 943 clients: from all 943 Flower's Krum would assume 235 malicious and
    compare each update with its nearest neighbour only, so two colluders sending one update
    (at distance 0 from each other) would always be chosen."""
    from fedrec.strategies import make_strategy

    strategy = make_strategy(load_config(None, {"strategy": "krum"}), 943)
    rng = np.random.default_rng(3)
    honest = [_reply(n, {k: v + 0.05 * rng.normal(size=v.shape).astype(np.float32)
                         for k, v in GLOBAL.items()}) for n in range(1, 10)]
    twin = {k: v + 3.0 for k, v in GLOBAL.items()}
    arrays, _ = strategy.aggregate_train(1, [*honest, _reply(20, twin), _reply(21, twin)])
    assert strategy.num_malicious_nodes == 2
    moved = np.abs(arrays["ranking/w"].numpy() - GLOBAL["ranking/w"]).max()
    assert moved < 0.5  # an honest update (noise 0.05), not the colluders' (+3)


def test_a_round_whose_strategy_returns_no_model_is_marked_so():
    """Flower's user-level DP wrapper skips a round (no release, no new model) when a sampled
    reply is missing: the round ran, but summary.json must not let it pass for an update."""
    from fedrec.server.federation import FederationResult
    from fedrec.server.outputs import _fault_summary

    strategy = Observed(FedAvg(arrayrecord_key=ARRAYS_KEY, min_available_nodes=1,
                               min_train_nodes=1), screen=UpdateScreen())
    strategy._sent = _sent()
    ins = Message(RecordDict(), dst_node_id=5, message_type="train")
    arrays, _ = strategy.aggregate_train(1, [Message(Error(code=1, reason="gone"), reply_to=ins)])
    assert arrays is None and strategy.rounds[1].aggregated is False
    strategy.aggregate_train(2, _honest())
    assert strategy.rounds[2].aggregated is True
    fields = FederationResult.__dataclass_fields__
    result = FederationResult(**{k: None for k in fields} | {"rounds": strategy.rounds})
    assert _fault_summary(result)["rounds_without_update"] == [1]
