"""Secure aggregation (fedrec.secagg, issue 5 item 3): exact sums, dropouts, hiding, tampering."""

from __future__ import annotations

import dataclasses
import random
import time

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedrec.secagg import (
    SecAggClient,
    SecAggConfig,
    SecAggError,
    ShareVerificationError,
    TooFewSurvivors,
    UnmaskRequest,
    plan_round,
    run_local_round,
)
from fedrec.secagg.flower import ClientUpdate, handle_secagg, secagg_aggregate
from fedrec.secagg.quantize import flatten, quantize

CFG = SecAggConfig(clipping_range=1.0)
STAGES = ("setup", "share_keys", "masked_input", "unmask")


def _inputs(n: int, seed: int, size: int = 40) -> dict[int, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    ids = sorted(int(x) for x in rng.choice(2**40, size=n, replace=False) + 1)
    return {
        u: {"recall/w": rng.uniform(-1, 1, (size // 4, 4)), "ranking/b": rng.uniform(-1, 1, 7)}
        for u in ids
    }


def _assert_sum(result, inputs, nodes) -> None:
    assert result.survivors == tuple(sorted(nodes))
    for name in ("recall/w", "ranking/b"):
        expected = sum(inputs[u][name] for u in nodes)
        assert result.sums[name].shape == expected.shape
        assert np.max(np.abs(result.sums[name] - expected)) < result.error_bound


@pytest.mark.parametrize(("n", "neighbours"), [(5, None), (8, None), (8, 4)])
def test_sum_of_all_clients_within_the_quantisation_bound(n, neighbours):
    inputs = _inputs(n, seed=n)
    result = run_local_round(dataclasses.replace(CFG, neighbours=neighbours), inputs, seed=1)
    _assert_sum(result, inputs, inputs)
    assert all(not v for v in result.dropped.values())
    assert result.error_bound == pytest.approx(n * 2.0 / (2**22 - 1))


@pytest.mark.parametrize("stage", STAGES)
def test_dropouts_after_each_stage_leave_the_survivors_sum(stage):
    inputs = _inputs(7, seed=2)
    lost = set(sorted(inputs)[:2])
    result = run_local_round(CFG, inputs, drop={stage: lost}, seed=3)
    in_sum = set(inputs) if stage == "unmask" else set(inputs) - lost  # masked inputs stay in
    _assert_sum(result, inputs, in_sum)
    assert set(result.dropped[stage]) == lost


def test_dropouts_spread_over_stages_with_neighbourhoods():
    inputs = _inputs(8, seed=4)
    ids = sorted(inputs)
    cfg = dataclasses.replace(CFG, neighbours=6, threshold=4)
    drop = {"share_keys": {ids[0]}, "masked_input": {ids[1]}, "unmask": {ids[2]}}
    result = run_local_round(cfg, inputs, drop=drop, seed=5)
    _assert_sum(result, inputs, set(ids) - {ids[0], ids[1]})


def test_a_64_bit_modulus_gives_a_finer_sum():
    inputs = _inputs(5, seed=14)
    cfg = SecAggConfig(clipping_range=1.0, quantization_range=2**40, modulus=2**64)
    result = run_local_round(cfg, inputs, drop={"masked_input": {min(inputs)}}, seed=15)
    _assert_sum(result, inputs, set(inputs) - {min(inputs)})
    assert result.error_bound < 1e-11


@pytest.mark.parametrize("stage", STAGES)
def test_fewer_than_threshold_survivors_is_a_clear_error(stage):
    inputs = _inputs(6, seed=6)  # threshold: majority of 6 share holders = 4
    with pytest.raises(TooFewSurvivors, match="threshold|needed"):
        run_local_round(CFG, inputs, drop={stage: set(sorted(inputs)[:3])}, seed=7)


def test_masked_vectors_look_uniform_and_uncorrelated_with_the_inputs():
    rng = np.random.default_rng(8)
    ids = [3, 9, 27, 81, 243]
    inputs = {u: {"x": rng.normal(0, 0.3, 20_000)} for u in ids}
    seen = {}
    run_local_round(
        CFG, inputs, seed=9, tamper=lambda s, r: seen.update(r if s == "masked_input" else {})
    )
    m = CFG.modulus
    for u in ids:
        y = seen[u].vector.astype(np.float64)
        q = quantize(flatten(inputs[u]), CFG, np.random.default_rng(0)).astype(np.float64)
        assert abs(np.corrcoef(y, inputs[u]["x"])[0, 1]) < 0.03
        assert abs(np.corrcoef(y, q)[0, 1]) < 0.03
        # chi-square, 15 dof. The masks come from fresh key pairs (OS entropy, whatever the
        # seed), so every run is a new draw: at p = 0.001 (37.7) one run in about 200 failed
        # over 5 clients (38.4, 2026-12-01); at p = 1e-9 (73.6) none should, and a mask that is
        # not uniform (a constant, the input itself) is in the thousands
        counts = np.histogram(y, bins=16, range=(0, m))[0]
        chi2 = float(np.sum((counts - y.size / 16) ** 2 / (y.size / 16)))
        assert chi2 < 73.6
        assert abs(y.mean() / m - 0.5) < 0.01


def test_a_ring_split_by_dropouts_is_not_unmasked():
    inputs = _inputs(8, seed=18)
    cfg = dataclasses.replace(CFG, neighbours=2)
    plan = plan_round(cfg, inputs, "1", random.Random(19))  # the ring run_local_round builds
    ring = [min(inputs)]
    while len(ring) < len(inputs):
        ring.append(next(v for v in plan.neighbours[ring[-1]] if v not in ring))
    with pytest.raises(SecAggError, match="disconnected"):
        run_local_round(cfg, inputs, drop={"masked_input": {ring[0], ring[4]}}, seed=19)


def test_a_malformed_advert_or_masked_input_drops_only_its_sender():
    inputs = _inputs(7, seed=16)
    bad_key, bad_vector, low_order = sorted(inputs)[:3]

    def spoil(stage, replies):
        if stage == "setup":
            replies[bad_key] = dataclasses.replace(replies[bad_key], mask_pk=b"short")
            # a low-order X25519 point: every agreement with it is all zeros, which fails
            replies[low_order] = dataclasses.replace(replies[low_order], enc_pk=bytes(32))
        if stage == "masked_input":
            m = replies[bad_vector]
            replies[bad_vector] = dataclasses.replace(m, vector=m.vector[:-1])

    result = run_local_round(CFG, inputs, seed=17, tamper=spoil)
    _assert_sum(result, inputs, set(inputs) - {bad_key, bad_vector, low_order})
    assert result.dropped["setup"] == (bad_key, low_order)
    assert result.dropped["masked_input"] == (bad_vector,)


def test_an_altered_revealed_share_aborts_the_round():
    inputs = _inputs(5, seed=10)
    victim = sorted(inputs)[0]

    def alter(stage, replies):
        if stage == "unmask":
            for shares in replies.values():
                s = bytearray(shares[victim])
                s[-1] ^= 1
                shares[victim] = bytes(s)

    with pytest.raises(ShareVerificationError, match=f"node {victim}"):
        run_local_round(CFG, inputs, seed=11, tamper=alter)


def test_an_altered_sealed_share_is_rejected_by_its_receiver():
    cfg = SecAggConfig(clipping_range=1.0)
    plan = plan_round(cfg, [1, 2, 3], "r1")
    clients = {u: SecAggClient() for u in plan.node_ids}
    adverts = {u: clients[u].setup(s) for u, s in _setups(plan, cfg).items()}
    sealed = {u: clients[u].share_keys(adverts) for u in plan.node_ids}
    blob = bytearray(sealed[2][1])
    blob[20] ^= 0x40
    with pytest.raises(SecAggError, match="from node 2 fail authentication"):
        clients[1].masked_input({2: bytes(blob), 3: sealed[3][1]}, {"x": np.zeros(3)})
    with pytest.raises(SecAggError, match="fail authentication"):  # replayed for another node
        clients[3].masked_input({2: sealed[2][1], 1: sealed[1][3]}, {"x": np.zeros(3)})


def test_a_client_never_reveals_both_secrets_of_one_node_nor_unmasks_twice():
    cfg = SecAggConfig(clipping_range=1.0, threshold=2)
    plan = plan_round(cfg, [1, 2, 3], "r1")
    clients = {u: SecAggClient() for u in plan.node_ids}
    adverts = {u: clients[u].setup(s) for u, s in _setups(plan, cfg).items()}
    sealed = {u: clients[u].share_keys(adverts) for u in plan.node_ids}
    for u in plan.node_ids:
        inbox = {v: sealed[v][u] for v in plan.node_ids if v != u}
        clients[u].masked_input(inbox, {"x": np.ones(3)})
    with pytest.raises(SecAggError, match="both alive and dropped"):
        clients[1].unmask(UnmaskRequest(survivors=(1, 2, 3), dropped=(2,)))
    clients[2].unmask(UnmaskRequest(survivors=(1, 2), dropped=(3,)))
    with pytest.raises(SecAggError, match="out of order"):
        clients[2].unmask(UnmaskRequest(survivors=(1, 2, 3), dropped=()))


def test_out_of_range_inputs_are_clipped_and_nan_refused():
    inputs = {u: {"x": np.array([5.0, -5.0, 0.25])} for u in (1, 2, 3)}
    result = run_local_round(CFG, inputs, seed=12)
    np.testing.assert_allclose(result.sums["x"], [3.0, -3.0, 0.75], atol=result.error_bound)
    with pytest.raises(ValueError, match="NaN"):
        flatten({"x": np.array([0.0, np.nan])})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"modulus": 1000}, "power of two"),
        ({"threshold": 1}, "threshold must be >= 2"),
        ({"clipping_range": 0.0}, "clipping_range"),
        ({"quantization_range": 2**31 + 1, "modulus": 2**32}, "at most modulus / 2"),
        ({"quantization_range": 2**60, "modulus": 2**64}, "at most 2\\*\\*53"),
    ],
)
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SecAggConfig(**kwargs)


def test_round_plans_check_capacity_threshold_and_ring():
    with pytest.raises(ValueError, match="overflow"):
        plan_round(SecAggConfig(quantization_range=2**20, modulus=2**22), range(5), "r")
    with pytest.raises(ValueError, match="exceeds"):
        plan_round(SecAggConfig(threshold=6), range(5), "r")
    plan = plan_round(SecAggConfig(neighbours=4), range(10), "r")
    assert all(len(v) == 4 for v in plan.neighbours.values())
    assert all(u in plan.neighbours[v] for u in plan.neighbours for v in plan.neighbours[u])
    assert plan.threshold == 3


@pytest.fixture
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    for attr in ("_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 0)


def _in_process_round(inputs, ctxs, update_fn, config=CFG, need=None):
    """secagg_aggregate over a grid that hands each message to its client's handle_secagg."""

    class InProcessGrid:
        def send_and_receive(self, messages, *, timeout=None):
            return [
                handle_secagg(m, ctxs[m.metadata.dst_node_id], update_fn, need) for m in messages
            ]

    return secagg_aggregate(
        InProcessGrid(),
        list(inputs),
        config=config,
        round_id=4,
        train_content=RecordDict({"train": ConfigRecord({"lr": 0.5})}),
    )


def test_flower_adapter_over_an_in_process_grid_with_one_refusing_client(task_identity):
    inputs = _inputs(5, seed=13)
    refuser = sorted(inputs)[1]
    ctxs = {u: Context(1, u, {}, RecordDict(), {}) for u in inputs}

    def update_fn(msg, ctx):
        if ctx.node_id == refuser:
            raise RuntimeError("privacy budget exhausted")
        lr = msg.content["train"]["lr"]
        return ClientUpdate(inputs[ctx.node_id], {"metrics": MetricRecord({"lr": lr})})

    out = _in_process_round(inputs, ctxs, update_fn)
    _assert_sum(out.result, inputs, set(inputs) - {refuser})
    assert out.result.dropped["masked_input"] == (refuser,)
    assert set(out.replies) == set(inputs) - {refuser}
    assert all(r["metrics"]["lr"] == 0.5 for r in out.replies.values())
    assert out.metrics()["secagg.survivors"] == 4.0
    assert ctxs[refuser].state["secagg-state"]["stage"] == "share_keys"
    assert all(ctxs[u].state["secagg-state"]["seed"] == b"" for u in out.result.survivors)


@pytest.mark.parametrize("min_threshold", [0, 4])
def test_a_client_needing_more_contributors_than_the_threshold_refuses_before_training(
    task_identity, min_threshold
):
    """Distributed DP: each update carries a noise share that is private only in a sum of 4.
    Under a lower threshold no client trains (spending budget) or masks anything."""
    inputs = _inputs(5, seed=21)
    ctxs = {u: Context(1, u, {}, RecordDict(), {}) for u in inputs}
    trained = []

    def update_fn(msg, ctx):
        trained.append(ctx.node_id)
        return ClientUpdate(inputs[ctx.node_id])

    config = dataclasses.replace(CFG, min_threshold=min_threshold)
    if min_threshold == 0:  # a majority of 5 is 3: every client refuses
        with pytest.raises(TooFewSurvivors):
            _in_process_round(inputs, ctxs, update_fn, config, need=lambda msg: 4)
        assert trained == []
        assert all(c.state["secagg-state"]["stage"] == "share_keys" for c in ctxs.values())
    else:
        out = _in_process_round(inputs, ctxs, update_fn, config, need=lambda msg: 4)
        assert sorted(trained) == sorted(inputs)
        _assert_sum(out.result, inputs, set(inputs))


def test_a_peers_bad_share_makes_its_receivers_refuse_before_training(task_identity):
    """A client opens its peers' shares before it trains: one peer sending garbage shares
    costs the others no budget (they refuse with nothing trained), and the round goes on
    without the receivers that cannot open them."""
    inputs = _inputs(5, seed=23)
    ctxs = {u: Context(1, u, {}, RecordDict(), {}) for u in inputs}
    liar = sorted(inputs)[0]
    trained = []

    def update_fn(msg, ctx):
        trained.append(ctx.node_id)
        return ClientUpdate(inputs[ctx.node_id])

    class SpoilingGrid:
        def send_and_receive(self, messages, *, timeout=None):
            replies = [handle_secagg(m, ctxs[m.metadata.dst_node_id], update_fn)
                       for m in messages]
            for reply in replies:
                if reply.metadata.src_node_id == liar and reply.content["secagg"]["stage"] \
                        == "share_keys":
                    reply.content["secagg"]["sealed"] = [
                        bytes(len(b)) for b in reply.content["secagg"]["sealed"]]
            return replies

    with pytest.raises(TooFewSurvivors):  # everyone but the liar refuses: 1 of 5 left
        secagg_aggregate(SpoilingGrid(), list(inputs), config=CFG, round_id=4)
    assert trained == [liar]
    refusers = set(inputs) - {liar}
    assert all(ctxs[u].state["secagg-state"]["stage"] == "share_keys" for u in refusers)


def _client_vector(partition: int) -> np.ndarray:
    return np.random.default_rng(100 + partition).uniform(-1, 1, 50)


def _sim_update(msg, context):
    partition = int(context.node_config["partition-id"])
    if partition == int(msg.content["train"]["drop"]):
        raise RuntimeError("this client drops out")
    return ClientUpdate({"v": _client_vector(partition)}, {"m": MetricRecord({"p": partition})})


SIM_CLIENT = ClientApp()


@SIM_CLIENT.train("secagg")
def _sim_secagg(msg, context):
    return handle_secagg(msg, context, _sim_update)


@pytest.mark.slow
def test_flower_simulation_four_clients_one_dropping(monkeypatch):
    """Flower's simulation engine (Ray), 4 SuperNodes, one refusing to send its update."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    holder = {}
    server = ServerApp()

    @server.main()
    def main(grid, context):
        for _ in range(300):
            nodes = list(grid.get_node_ids())
            if len(nodes) >= 4:
                break
            time.sleep(0.1)
        train = RecordDict({"train": ConfigRecord({"drop": 3})})
        holder["out"] = secagg_aggregate(
            grid, nodes, config=CFG, round_id=1, train_content=train, timeout=60, train_timeout=60
        )

    run_simulation(
        server_app=server,
        client_app=SIM_CLIENT,
        num_supernodes=4,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": 2, "include_dashboard": False, "logging_level": "ERROR"},
        },
    )
    out = holder["out"]
    partitions = {int(r["m"]["p"]) for r in out.replies.values()}
    assert partitions == {0, 1, 2} and len(out.result.dropped["masked_input"]) == 1
    expected = sum(_client_vector(p) for p in partitions)
    np.testing.assert_allclose(out.result.sums["v"], expected, atol=out.result.error_bound)


def _setups(plan, cfg):
    from fedrec.secagg import SecAggServer

    return SecAggServer(plan, cfg).setup()


KEY_EXCHANGE_WITHOUT_TORCH = """
import sys
from flwr.app import Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity
TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 0
import fedrec.client.app as client_app
from fedrec.secagg import SecAggConfig, wire
from fedrec.secagg.flower import secagg_aggregate

ctxs = {u: Context(1, u, {"partition-id": u}, RecordDict(), {}) for u in (11, 12, 13)}
answered = []

class Stop(Exception):
    pass

class Grid:  # hands each message to the site's ClientApp handler, as its SuperNode would
    def send_and_receive(self, messages, *, timeout=None):
        stage = wire.stage_of(messages[0].content)
        if stage == "masked_input":  # the stage that trains, and so needs torch
            raise Stop()
        replies = [client_app.train_secagg(m, ctxs[m.metadata.dst_node_id]) for m in messages]
        assert not any(r.has_error() for r in replies), [r.error for r in replies]
        answered.append(stage)
        return replies

try:
    secagg_aggregate(Grid(), sorted(ctxs), config=SecAggConfig(clipping_range=1.0), round_id=1)
except Stop:
    pass
heavy = sorted(m for m in ("torch", "opacus", "pandas", "transformers") if m in sys.modules)
print(answered, heavy)
"""


def test_a_sites_key_exchange_messages_load_no_training_stack(tmp_path):
    """On a partner site each message runs in a fresh ClientApp process: the key-exchange
    stages of secure aggregation (two of its four messages a round) must not pay for importing
    torch, the models and the accountants, which only the training stage needs."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", KEY_EXCHANGE_WITHOUT_TORCH],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "['setup', 'share_keys'] []"


def test_a_stage_message_of_another_round_is_refused(task_identity):
    """Stage messages carry their round as Flower's group id: a late one from an earlier
    round is not processed against the current round's keys."""
    from flwr.app import Message

    from fedrec.secagg import SecAggServer, plan_round, wire
    from fedrec.secagg.flower import MESSAGE_TYPE

    plan = plan_round(CFG, [1, 2, 3], "7")
    server = SecAggServer(plan, CFG)
    ctxs = {u: Context(1, u, {}, RecordDict(), {}) for u in plan.node_ids}
    adverts = {}
    for u, setup in server.setup().items():
        msg = Message(wire.setup_to_record(setup), dst_node_id=u, message_type=MESSAGE_TYPE,
                      group_id="7")  # fmt: skip
        adverts[u] = wire.advert_from_record(handle_secagg(msg, ctxs[u], None).content)
    keys = server.collect_keys(adverts)
    for group, refused in [("6", True), ("7", False)]:
        msg = Message(wire.keys_to_record(keys[1]), dst_node_id=1, message_type=MESSAGE_TYPE,
                      group_id=group)  # fmt: skip
        reply = handle_secagg(msg, ctxs[1], None)
        assert reply.has_error() is refused
        if refused:
            assert "of round '6'" in reply.error.reason and "in round '7'" in reply.error.reason
