"""Distributed DP noise (privacy.noise = "distributed"): one DP-SGD step per round whose noise
is shared by at least ``min_contributors`` clients under secure aggregation."""

import copy
import json

import numpy as np
import pytest
import torch

from fedrec.client.local import build_task_models
from fedrec.config import ConfigError, FedrecConfig, TaskConfig, load_config
from fedrec.privacy import LedgerEntry, PrivacyError, audit_ledger, read_ledger
from fedrec.secagg.params import SecAggConfig, plan_round
from fedrec.training import DPSGDParams, _batch, train_task

DISTRIBUTED = {
    "privacy.mode": "record",
    "privacy.noise": "distributed",
    "secure_aggregation": True,
    "strategy": "fedadam",
}


def _delta(before, model):
    return torch.cat([(p.detach() - b).ravel() for p, b in zip(model.parameters(), before,
                                                               strict=True)])  # fmt: skip


def test_one_distributed_step_moves_by_minus_the_gradient_sum_over_the_batch_size(small):
    data, spec = small
    cfg = TaskConfig(lr=0.01, batch_size=8, local_epochs=3, dim=16, negatives=4)
    model = build_task_models(FedrecConfig(), spec, 0)["recall"]
    reference = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    # rate 1: every user; clipping far above any gradient; no noise: the exact gradient sum
    dp = DPSGDParams(0.0, 1e6, noise_seed=1, contributors=3, sample_rate=1.0)
    stats = train_task(model, data, cfg, seed=7, dp=dp)
    assert (stats.steps, stats.sample_rate) == (1, 1.0)  # one step, whatever local_epochs says

    torch.manual_seed(7)  # the batch train_task drew: same seed, same generator, all users
    batch = _batch(data, np.arange(data.n_users), cfg, spec.num_items,
                   torch.Generator().manual_seed(7))  # fmt: skip
    reference.train()
    reference(batch).sum().backward()
    expected = torch.cat([-p.grad.ravel() / cfg.batch_size for p in reference.parameters()])
    got = _delta(before, model)
    assert float(expected.norm()) > 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("contributors", "noise_seed"), [(1, 3), (4, 3), (16, 3), (4, None)])
def test_each_client_adds_the_noise_divided_by_the_root_of_the_contributors(
    small, contributors, noise_seed
):
    """Seeded noise (simulations) and the CSPRNG's (noise_seed None: secure_rng, every partner
    site; fedrec.dp_noise) alike."""
    data, spec = small
    cfg = TaskConfig(lr=0.01, batch_size=4, local_epochs=1, dim=16, negatives=4)
    model = build_task_models(FedrecConfig(), spec, 0)["personal"]
    before = [p.detach().clone() for p in model.parameters()]
    # a rate so low the Poisson batch is empty: the update is the noise share alone
    dp = DPSGDParams(2.0, 0.5, noise_seed=noise_seed, contributors=contributors,
                     sample_rate=1e-12)  # fmt: skip
    train_task(model, data, cfg, seed=1, dp=dp)
    noise = _delta(before, model) * -cfg.batch_size
    want = 2.0 * 0.5 / contributors**0.5
    assert noise.numel() > 10_000
    assert float(noise.std()) == pytest.approx(want, rel=0.03)
    assert abs(float(noise.mean())) < 0.05 * want


def test_shares_of_enough_clients_add_up_to_the_full_noise(small):
    data, spec = small
    cfg = TaskConfig(lr=0.01, batch_size=4, local_epochs=1, dim=16, negatives=4)
    total = None
    for client in range(9):
        model = build_task_models(FedrecConfig(), spec, 0)["personal"]
        before = [p.detach().clone() for p in model.parameters()]
        dp = DPSGDParams(1.5, 1.0, noise_seed=100 + client, contributors=9, sample_rate=1e-12)
        train_task(model, data, cfg, seed=client, dp=dp)
        share = _delta(before, model) * -cfg.batch_size
        total = share if total is None else total + share
    assert float(total.std()) == pytest.approx(1.5, rel=0.03)  # sigma * C over the sum


def test_configuration_refuses_what_would_break_the_guarantee():
    assert load_config(None, DISTRIBUTED).privacy.noise == "distributed"
    for drop, match in [
        ("secure_aggregation", "needs secure_aggregation"),
        ("strategy", "needs strategy = 'fedadam'"),
        ("privacy.mode", "form of record-level DP-SGD"),
    ]:
        settings = {k: v for k, v in DISTRIBUTED.items() if k != drop}
        with pytest.raises(ConfigError, match=match):
            load_config(None, settings)
    with pytest.raises(ConfigError, match="min_contributors"):
        load_config(None, {**DISTRIBUTED, "privacy.min_contributors": 1})
    with pytest.raises(ConfigError, match="sample_rate"):
        load_config(None, {**DISTRIBUTED, "privacy.sample_rate": 0.0})
    with pytest.raises(ConfigError, match="privacy.noise"):
        load_config(None, {"privacy.noise": "central"})


def test_simulate_sets_a_majority_and_refuses_more_contributors_than_clients():
    from fedrec.config import with_contributors

    cfg = load_config(None, DISTRIBUTED)
    assert with_contributors(cfg, 21).privacy.min_contributors == 11
    assert with_contributors(cfg, 4).privacy.min_contributors == 3
    fixed = load_config(None, {**DISTRIBUTED, "privacy.min_contributors": 5})
    assert with_contributors(fixed, 21).privacy.min_contributors == 5
    with pytest.raises(ConfigError, match="needs at least 5 clients"):
        with_contributors(fixed, 4)
    half = load_config(None, {**DISTRIBUTED, "fraction_train": 0.5})
    assert with_contributors(half, 21).privacy.min_contributors == 6  # a majority of 10 sampled
    eleven = load_config(
        None, {**DISTRIBUTED, "fraction_train": 0.5, "privacy.min_contributors": 11}
    )
    with pytest.raises(ConfigError, match="each round samples 10"):
        with_contributors(eleven, 21)
    local = load_config(None, {"privacy.mode": "record"})
    assert with_contributors(local, 4) is local


def test_a_deployed_run_is_submitted_with_the_majority_its_clients_require():
    """Partner sites' clients refuse min_contributors 0; `fedrec server run` resolves it from
    the partition, as `fedrec simulate` does, and refuses at start-up what no round could do."""
    from fedrec.deploy.server import deployed_config

    data = {"dataset": "synthetic:merchants=5,users=200,items=300", "partition": "site"}
    cfg = load_config(None, {**DISTRIBUTED, **data})
    assert deployed_config(cfg).privacy.min_contributors == 3  # a majority of 5 sites
    fixed = load_config(None, {**DISTRIBUTED, **data, "privacy.min_contributors": 4})
    assert deployed_config(fixed).privacy.min_contributors == 4
    with pytest.raises(ConfigError, match="needs at least 6 clients"):
        deployed_config(load_config(None, {**DISTRIBUTED, **data, "privacy.min_contributors": 6}))
    local = load_config(None, {"privacy.mode": "record", **data})
    assert deployed_config(local) is local


def test_the_secure_aggregation_threshold_is_raised_to_the_contributors():
    ids = range(1, 8)
    assert plan_round(SecAggConfig(), ids, "r").threshold == 4  # a majority of 7
    assert plan_round(SecAggConfig(min_threshold=6), ids, "r").threshold == 6
    assert plan_round(SecAggConfig(min_threshold=2), ids, "r").threshold == 4
    with pytest.raises(ValueError, match="exceeds"):
        plan_round(SecAggConfig(min_threshold=8), ids, "r")


def test_ledger_entries_carry_their_contributors_and_only_distributed_ones():
    fields = dict(
        client="client-0", task="recall", round=1, noise_multiplier=1.2, sample_rate=0.25,
        steps=1, clipping_norm=1.0, delta=1e-3, accountant="prv", epsilon=0.5,
        epsilon_composed=0.5, budget_epsilon=8.0,
    )  # fmt: skip
    entry = LedgerEntry(**fields, mechanism="dp-sgd-distributed", noise_contributors=11)
    assert entry.to_fields()["noise_contributors"] == 11
    assert "noise_contributors" not in LedgerEntry(**fields).to_fields()
    with pytest.raises(PrivacyError, match="noise_contributors"):
        LedgerEntry(**fields, mechanism="dp-sgd-distributed")
    with pytest.raises(PrivacyError, match="noise_contributors"):
        LedgerEntry(**fields, noise_contributors=11)
    with pytest.raises(PrivacyError, match="noise_contributors"):
        LedgerEntry(**fields, mechanism="dp-sgd-distributed", noise_contributors=1)


def _distributed_cfg(out):
    return load_config(
        None,
        {
            **DISTRIBUTED,
            "dataset": "synthetic:merchants=4,users=160,items=300",
            "partition": "site",
            "rounds": 2,
            "seed": 2,
            "out": str(out),
            "eval_full_ranking": False,
            "privacy.epsilon": 4.0,
            "tasks": {t: {"dim": 16} for t in ("recall", "ranking", "personal")},
        },
    )


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory):
    from fedrec.simulation import simulate

    return simulate(_distributed_cfg(tmp_path_factory.mktemp("ddp") / "run"), baselines=False)


@pytest.mark.slow
def test_a_distributed_dp_federation_is_accounted_and_audited(distributed_run):
    run, summary = distributed_run
    entries = read_ledger(run.ledger)
    fit = [e for e in entries if e["task"] == "fusion"]  # the DP fusion fit, one per client
    assert len(fit) == 4 and {e["mechanism"] for e in fit} == {"gaussian"}
    entries = [e for e in entries if e["task"] != "fusion"]
    assert len(entries) == 2 * 4 * 3  # rounds x clients x tasks: nobody dropped
    assert {e["mechanism"] for e in entries} == {"dp-sgd-distributed"}
    assert {e["noise_contributors"] for e in entries} == {3}  # a majority of 4
    assert {(e["steps"], e["sample_rate"]) for e in entries} == {(1, 0.25)}
    assert len({e["noise_multiplier"] for e in entries}) == 1  # one multiplier everywhere
    for client in {e["client"] for e in entries}:
        mine = [e["epsilon_composed"] for e in entries if e["client"] == client]
        assert mine == sorted(mine) and mine[0] < mine[-1] <= 4.0
    assert audit_ledger(run.ledger, run_id=run.path.name).ok
    from fedrec.cli import _claims_check  # what `fedrec audit` checks against config.toml

    # every line's inputs, its noise multiplier too, as the config and the users give them
    claims = _claims_check(run.path, read_ledger(run.ledger), noise=True)
    assert claims == {"checked": 2 * 4 * 3 + 4, "problems": []}
    assert summary["privacy"]["max_epsilon"] <= 4.0
    assert sorted(summary["secure_aggregation"]["rounds"]) == [1, 2]
    assert (summary["privacy"]["noise"], summary["privacy"]["min_contributors"]) == (
        "distributed", 3
    )
    saved = json.loads((run.path / "summary.json").read_text())
    assert saved["privacy"]["max_epsilon"] == summary["privacy"]["max_epsilon"]


@pytest.mark.slow
def test_a_killed_distributed_run_resumes_to_the_uninterrupted_ledger_and_models(
    distributed_run, tmp_path
):
    """The server dies after round 1's checkpoint; the resumed run's FedAdam state, secure
    aggregation and accountants carry on: same releases, same epsilons, same models."""
    from fedrec.models.registry import load_model
    from fedrec.server.checkpoint import resume_config
    from fedrec.simulation import simulate
    from fedrec.tests.test_fault_tolerance import Crash, _crash_after

    with pytest.raises(Crash):
        simulate(_distributed_cfg(tmp_path / "run"), baselines=False, on_round=_crash_after(1))
    run, summary = simulate(
        resume_config(tmp_path / "run"), baselines=False, resume_from=tmp_path / "run"
    )
    ref_run, _ = distributed_run
    assert summary["resumes"] == [{"after_round": 1, "ledger_lines_past_checkpoint": 0}]
    fields = ("client", "task", "round", "noise_multiplier", "noise_contributors", "epsilon",
              "epsilon_composed")  # fmt: skip
    releases = [tuple(e.get(f) for f in fields) for e in read_ledger(run.ledger)]
    reference = [tuple(e.get(f) for f in fields) for e in read_ledger(ref_run.ledger)]
    assert sorted(releases, key=repr) == sorted(reference, key=repr)  # fusion lines: no count
    assert audit_ledger(run.ledger, run_id=run.path.name).ok
    # Secure aggregation rounds each update stochastically onto its fixed-point grid (step
    # about 4e-6 here, unseeded by design), so models agree to that, not bit for bit. A resume
    # that lost FedAdam's moments or replayed a round would be off by about its step (0.01).
    for task in ("recall", "ranking", "personal"):
        ours, theirs = load_model(run.models / task), load_model(ref_run.models / task)
        for key, value in ours.state_dict().items():
            np.testing.assert_allclose(value, theirs.state_dict()[key], rtol=0, atol=1e-4)


@pytest.mark.slow
def test_a_round_the_server_died_in_is_skipped_on_resume_not_sent_again(tmp_path, monkeypatch):
    """Every client released round 2, then the server died before its checkpoint. Asked again,
    each would refuse (its update carries only a share of the noise: never in two sums), and the
    run would stop there; the resume skips round 2 and trains round 3 instead."""
    from collections import Counter
    from dataclasses import replace

    import fedrec.server.federation as federation
    from fedrec.server.checkpoint import resume_config
    from fedrec.simulation import simulate
    from fedrec.tests.test_fault_tolerance import Crash

    cfg = replace(_distributed_cfg(tmp_path / "run"), rounds=3)
    real = federation.save_checkpoint

    def dying(run, cfg, arrays, strategy, progress):
        if progress.round == 2:
            raise Crash("simulated server crash before the round-2 checkpoint")
        return real(run, cfg, arrays, strategy, progress)

    monkeypatch.setattr(federation, "save_checkpoint", dying)
    with pytest.raises(Crash):
        simulate(cfg, baselines=False)
    monkeypatch.undo()
    run_dir = tmp_path / "run"
    run, summary = simulate(resume_config(run_dir), baselines=False, resume_from=run_dir)
    assert summary["stopped_early"] is None and summary["client_failures"] == []
    assert summary["resumes"] == [
        {"after_round": 1, "ledger_lines_past_checkpoint": 12, "skipped_rounds": [2]}
    ]
    assert (summary["rounds"], summary["skipped_rounds"]) == (2, [2])  # 2 aggregated of 3
    assert "Skipped on resume:** round(s) 2" in run.report.read_text()
    rows = [json.loads(x) for x in run.metrics.read_text().splitlines()]
    assert sorted({r["round"] for r in rows}) == [1, 3]  # round 2's sum never reached the model
    releases = Counter((e["client"], e["task"], e["round"]) for e in read_ledger(run.ledger))
    assert len(releases) == 4 * 3 * 3 + 4 and set(releases.values()) == {1}  # none twice
    assert audit_ledger(run.ledger, run_id=run.path.name).ok
    assert 0 < summary["privacy"]["max_epsilon"] <= 4.0


def test_a_client_whose_poisson_batches_were_empty_does_not_turn_the_round_loss_into_nan():
    """One step at rate 0.25: a 7-user silo samples nobody 13% of the time (loss nan)."""
    from flwr.app import MetricRecord, RecordDict

    from fedrec.strategies.factory import aggregate_train_metrics

    def reply(n, loss, seconds):
        return RecordDict({"m": MetricRecord(
            {"num-examples": n, "recall.loss": loss, "recall.train-seconds": seconds}
        )})  # fmt: skip

    out = aggregate_train_metrics(
        [reply(30, 2.0, 1.0), reply(7, float("nan"), 0.5), reply(10, 4.0, 2.0)], "num-examples"
    )
    assert out["recall.loss"] == pytest.approx((30 * 2.0 + 10 * 4.0) / 40)
    assert out["recall.train-seconds"] == 3.5 and out["num-examples"] == 47
    none = aggregate_train_metrics([reply(7, float("nan"), 0.5)], "num-examples")
    assert np.isnan(none["recall.loss"])


def test_a_client_asks_for_as_many_contributors_as_the_run_config_names(monkeypatch):
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # a Message outside a running app
    for attr in ("_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 0)

    from fedrec.client.secure import contributors_needed

    def train_msg(settings):
        cfg = load_config(None, settings)
        content = RecordDict({"config": ConfigRecord({"fedrec": cfg.to_json()})})
        return Message(content, dst_node_id=1, message_type="train")

    assert contributors_needed(train_msg({**DISTRIBUTED, "privacy.min_contributors": 7})) == 7
    local = {**DISTRIBUTED, "privacy.noise": "local", "privacy.min_contributors": 7}
    assert contributors_needed(train_msg(local)) == 0
    bare = Message(RecordDict({"config": ConfigRecord({"lr": 0.1})}), dst_node_id=1,
                   message_type="train")  # fmt: skip
    assert contributors_needed(bare) == 0


@pytest.mark.parametrize("message_type", ["train", "train.secagg"])
def test_a_distributed_noise_update_leaves_only_inside_a_secure_sum(monkeypatch, message_type):
    """Its update carries a share of the noise its ledger line claims: a server that asks for
    it in a plain round (not secure aggregation) is refused before any training."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    import fedrec.client.app as client_app

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # a Message outside a running app
    for attr in ("_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 0)
    trained = []
    monkeypatch.setattr(client_app, "_train", lambda *args: trained.append(args) or "trained")
    cfg = load_config(None, {**DISTRIBUTED, "privacy.min_contributors": 2})
    content = RecordDict({"config": ConfigRecord({"fedrec": cfg.to_json(), "server-round": 1})})
    msg = Message(content, dst_node_id=1, message_type=message_type)
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(),
                  run_config={})  # fmt: skip
    reply = client_app.train(msg, ctx)
    if message_type == "train":
        assert reply.has_error() and "secure sum" in reply.error.reason and not trained
    else:
        assert reply == "trained"
