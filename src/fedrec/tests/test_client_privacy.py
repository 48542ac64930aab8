"""A client's DP controller: calibrated once, state kept in context.state, refusal past budget."""

from dataclasses import replace

import pytest
from flwr.app import Context, RecordDict

from fedrec.client.local import RoundResult
from fedrec.client.privacy import PrivacyRefusal, client_privacy
from fedrec.config import load_config
from fedrec.privacy import PrivacyError, audit_ledger, read_ledger
from fedrec.training import TrainStats
from fedrec.workload import build_workload


def _setup(tmp_path, rounds=1, epsilon=2.0):
    cfg = load_config(None, {
        "dataset": "synthetic:merchants=2,users=80,items=200", "partition": "site",
        "rounds": rounds, "privacy.mode": "record", "privacy.epsilon": epsilon,
        "privacy.delta": 1e-3,
    })
    data = build_workload(cfg).client_data(0)
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    return cfg, data, ctx


def _fake_round(ctl):
    return RoundResult({t: TrainStats(1.0, s, q, 10, 0.1) for t, (q, s) in ctl.plan.items()})


def test_budget_is_kept_then_the_client_refuses(tmp_path):
    cfg, data, ctx = _setup(tmp_path, rounds=2)
    ledger = tmp_path / "privacy_ledger.jsonl"
    for rnd in (1, 2):  # a new controller each round: state must come from context.state
        ctl = client_privacy(cfg, ctx, 0, data, ledger_path=str(ledger), run_id="run-x")
        params = ctl.before_round(rnd)
        assert set(params) == set(cfg.tasks) and all(p.noise_multiplier > 0 for p in params.values())
        ctl.after_round(rnd, _fake_round(ctl))
    ctl = client_privacy(cfg, ctx, 0, data, ledger_path=str(ledger), run_id="run-x")
    with pytest.raises(PrivacyRefusal, match="budget"):
        ctl.before_round(3)  # planned for 2 rounds: a third would overspend
    entries = read_ledger(ledger)
    assert len(entries) == 6
    assert entries[-1]["epsilon_composed"] <= 2.0
    assert entries[-1]["epsilon_composed"] > 0.9 * 2.0  # the calibration spends what it may
    assert audit_ledger(ledger, run_id="run-x").ok


def test_a_deployed_client_never_uses_noise_the_server_could_recompute(tmp_path):
    cfg, data, ctx = _setup(tmp_path)
    assert not cfg.privacy.secure_rng  # the simulation default: noise seeded from the run seed
    simulated = client_privacy(cfg, ctx, 0, data, ledger_path=None, run_id="r").before_round(1)
    assert all(p.noise_seed is not None for p in simulated.values())
    again = client_privacy(cfg, _fresh_context(), 0, data, ledger_path=None, run_id="r")
    assert again.before_round(1) == simulated  # reproducible: anyone with the config has it
    deployed = client_privacy(
        cfg, _fresh_context(), 0, data, ledger_path=None, run_id="r", deployed=True
    ).before_round(1)
    assert all(p.noise_seed is None for p in deployed.values())  # OS entropy at training time
    # the same calibration, with the DP fusion fit set aside in both (a deployed site makes
    # that release itself: client/dp_fusion.py); without the fit, less noise
    sigma = {t: p.noise_multiplier for t, p in deployed.items()}
    assert sigma == {t: p.noise_multiplier for t, p in simulated.items()}
    unreserved = client_privacy(
        replace(cfg, fusion_fit="fixed"), _fresh_context(), 0, data, ledger_path=None, run_id="r"
    ).before_round(1)
    assert all(p.noise_multiplier < sigma[t] for t, p in unreserved.items())  # the reserve


def test_delta_too_large_for_the_smallest_client_is_refused(tmp_path):
    cfg, data, ctx = _setup(tmp_path)
    cfg = load_config(None, {**{k: v for k, v in cfg.to_dict().items() if k not in ("tasks", "privacy")},
                             "privacy.mode": "record", "privacy.delta": 0.5})
    with pytest.raises(PrivacyError, match="delta"):
        client_privacy(cfg, ctx, 0, data, ledger_path=None, run_id="r")


def test_no_dp_means_no_controller(tmp_path):
    cfg, data, ctx = _setup(tmp_path)
    plain = load_config(None, {"dataset": cfg.dataset, "partition": cfg.partition})
    assert client_privacy(plain, ctx, 0, data, ledger_path=None, run_id="r") is None


def _fresh_context():
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def test_a_restarted_client_rebuilds_its_accountant_from_the_ledger(tmp_path):
    """Issue 5: context.state does not survive a restart; the ledger does (no epsilon lost)."""
    cfg, data, ctx = _setup(tmp_path, rounds=2)
    ledger = tmp_path / "privacy_ledger.jsonl"
    ctl = client_privacy(cfg, ctx, 0, data, ledger_path=str(ledger), run_id="run-x")
    ctl.before_round(1)
    ctl.after_round(1, _fake_round(ctl))
    spent = ctl.state.composed_epsilon(delta=1e-3)
    other = client_privacy(cfg, _fresh_context(), 1, data, ledger_path=str(ledger), run_id="run-x")
    assert len(other.state) == 0  # another client's lines are not this one's
    again = client_privacy(cfg, _fresh_context(), 0, data, ledger_path=str(ledger), run_id="run-x")
    assert len(again.state) == len(ctl.state) == 3
    assert again.state.composed_epsilon(delta=1e-3) == pytest.approx(spent)
    again.before_round(2)
    again.after_round(2, _fake_round(again))
    last = client_privacy(cfg, _fresh_context(), 0, data, ledger_path=str(ledger), run_id="run-x")
    with pytest.raises(PrivacyRefusal):  # planned for 2 rounds: the ledger remembers both
        last.before_round(3)


def test_a_ledger_with_fewer_releases_than_the_state_is_refused(tmp_path):
    from fedrec.privacy import LedgerError

    cfg, data, ctx = _setup(tmp_path, rounds=2)
    ledger = tmp_path / "privacy_ledger.jsonl"
    ctl = client_privacy(cfg, ctx, 0, data, ledger_path=str(ledger), run_id="run-x")
    ctl.after_round(1, _fake_round(ctl))
    lines = ledger.read_bytes().splitlines(keepends=True)
    ledger.write_bytes(b"".join(lines[:1]))  # the tail cut off: the chain alone cannot tell
    with pytest.raises(LedgerError, match="removed"):
        client_privacy(cfg, ctx, 0, data, ledger_path=str(ledger), run_id="run-x")


def test_a_release_is_sent_again_not_made_twice(tmp_path):
    """Issue 5: the server died after the client released round 1; the resumed server asks again."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

    cfg, data, ctx = _setup(tmp_path, rounds=2)
    ledger = tmp_path / "privacy_ledger.jsonl"
    sent = ArrayRecord({"recall/w": Array(np.arange(4, dtype=np.float32))})
    ctl = client_privacy(cfg, ctx, 0, data, ledger_path=str(ledger), run_id="run-x")
    assert ctl.replay(1, sent) is None
    entries = ctl.after_round(1, _fake_round(ctl))
    reply = RecordDict(
        {
            "arrays": ArrayRecord({"recall/w": Array(np.ones(4, dtype=np.float32))}),
            "metrics": MetricRecord({"num-examples": 80, "recall.loss": 0.25}),
            "ledger": ConfigRecord({"entries": entries}),
        }
    )
    ctl.remember(1, reply)
    again = client_privacy(cfg, _fresh_context(), 0, data, ledger_path=str(ledger), run_id="run-x")
    kept = again.replay(1, sent)
    assert kept is not None and dict(kept["metrics"]) == {"num-examples": 80, "recall.loss": 0.25}
    np.testing.assert_array_equal(kept["arrays"]["recall/w"].numpy(), np.ones(4))
    assert len(read_ledger(ledger)) == 3  # nothing new released or written
    moved = ArrayRecord({"recall/w": Array(np.arange(4, dtype=np.float32) + 1)})
    assert again.replay(1, moved) is None  # another global model: a new release
    assert again.replay(2, sent) is None  # another round: a new release


def test_under_distributed_noise_a_released_round_is_never_sent_again(tmp_path):
    """Its update holds 1/min_contributors of the noise; sent again into a sum over other
    clients, the difference of the two sums would expose it. The client refuses instead, and
    releases nothing new."""
    import dataclasses

    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

    cfg, data, ctx = _setup(tmp_path, rounds=2)
    cfg = dataclasses.replace(
        cfg, secure_aggregation=True, strategy="fedadam",
        privacy=dataclasses.replace(cfg.privacy, noise="distributed", min_contributors=2),
    )
    ledger = tmp_path / "privacy_ledger.jsonl"
    sent = ArrayRecord({"recall/w": Array(np.arange(4, dtype=np.float32))})
    ctl = client_privacy(cfg, ctx, 0, data, ledger_path=str(ledger), run_id="run-x")
    assert ctl.contributors == 2 and ctl.replay(1, sent) is None
    entries = ctl.after_round(1, _fake_round(ctl))
    ctl.remember(1, RecordDict({
        "arrays": ArrayRecord({"recall/w": Array(np.ones(4, dtype=np.float32))}),
        "metrics": MetricRecord({"num-examples": 80}),
        "ledger": ConfigRecord({"entries": entries}),
    }))  # fmt: skip
    lines = len(read_ledger(ledger))
    again = client_privacy(cfg, _fresh_context(), 0, data, ledger_path=str(ledger), run_id="run-x")
    with pytest.raises(PrivacyRefusal, match="already released under distributed noise"):
        again.replay(1, sent)
    assert len(read_ledger(ledger)) == lines


def test_two_processes_of_one_client_make_one_release_per_round(tmp_path, monkeypatch):
    """Issue 5: a ClientApp of the stopped run still training when the resumed server asks the
    site for the same round. The release lock makes the second wait and send the first's reply
    again: one set of ledger lines, the same reply twice (without the lock both trained from the
    same empty ledger and the round was in the ledger twice)."""
    import threading

    import numpy as np
    from flwr.app import ConfigRecord, Message
    from flwr.supercore.task_identity import TaskIdentity

    from fedrec.client.app import train
    from fedrec.client.local import build_task_models
    from fedrec.strategies.records import pack

    for attr in ("_run_id", "_node_id", "_task_id"):  # Message() outside a running app
        monkeypatch.setattr(TaskIdentity, attr, 1)
    cfg, _, _ = _setup(tmp_path, rounds=2)
    ledger = tmp_path / "privacy_ledger.jsonl"
    models = build_task_models(cfg, build_workload(cfg).spec, cfg.seed)
    config = {"fedrec": cfg.to_json(), "server-round": 1, "run-id": "run-x",
              "ledger-path": str(ledger)}  # fmt: skip
    replies = []

    def client_app_process():
        ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config={})  # fmt: skip
        msg = Message(RecordDict({"arrays": pack(models), "config": ConfigRecord(config)}),
                      dst_node_id=1, message_type="train")  # fmt: skip
        replies.append(train(msg, ctx))

    threads = [threading.Thread(target=client_app_process) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.has_content() for r in replies), [r.error for r in replies if r.has_error()]
    entries = read_ledger(ledger)
    assert sorted((e["task"], e["round"]) for e in entries) == sorted((t, 1) for t in cfg.tasks)
    first, second = (r.content["arrays"] for r in replies)
    for key in first:
        np.testing.assert_array_equal(first[key].numpy(), second[key].numpy())
    assert list(replies[0].content["ledger"]["entries"]) == list(
        replies[1].content["ledger"]["entries"]
    )


def test_a_deployed_runs_summary_takes_epsilon_from_the_lines_the_clients_sent(tmp_path):
    """Deployed, each site keeps its ledger and the run's own file stays empty: summary.json's
    epsilon comes from the ledger lines received with the replies, not a silent 0."""
    from fedrec.rundir import RunDir
    from fedrec.server.outputs import privacy_summary

    cfg, data, ctx = _setup(tmp_path, rounds=2)
    site_ledger = tmp_path / "site" / "privacy_ledger.jsonl"
    site_ledger.parent.mkdir()
    ctl = client_privacy(cfg, ctx, 0, data, ledger_path=str(site_ledger), run_id="run-x")
    received = ctl.after_round(1, _fake_round(ctl)) + ctl.after_round(2, _fake_round(ctl))
    run = RunDir(tmp_path / "server-run")
    run.path.mkdir()
    junk = ["x", '{"client": 1}', '{"client": "client-9", "task": "t", "epsilon": -1}']
    summary = privacy_summary(cfg, run, [*received, *junk])  # junk from a client: skipped
    last = read_ledger(site_ledger)[-1]
    assert set(summary["per_client"]) == {"client-0"}
    assert summary["per_client"]["client-0"]["composed"] == last["epsilon_composed"] > 0
    assert summary["max_epsilon"] == last["epsilon_composed"] and "received" in summary["source"]
    assert privacy_summary(cfg, run)["max_epsilon"] == 0.0  # nothing recorded, and it says so
    assert privacy_summary(cfg, run)["source"].startswith("none")
