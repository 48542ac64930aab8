"""Issue 5, fault tolerance on Flower's simulation engine (Ray): dropouts, kill and resume."""

import json
import re

import numpy as np
import pytest

from fedrec.cli import main as cli_main
from fedrec.config import load_config
from fedrec.models.registry import load_model
from fedrec.privacy import audit_ledger, read_ledger
from fedrec.server.checkpoint import CheckpointError, resume_config
from fedrec.simulation import simulate
from fedrec.simulation.faults import FaultPlan, with_faults

RELEASE_FIELDS = (
    "client", "task", "round", "mechanism", "noise_multiplier", "sample_rate", "steps",
    "epsilon", "epsilon_composed",
)  # fmt: skip
SMALL_TASKS = {
    "recall": {"local_epochs": 1, "dim": 16},
    "ranking": {"local_epochs": 1, "dim": 16},
    "personal": {"local_epochs": 1, "dim": 16},
}


def _cfg(out, **extra):
    return load_config(
        None,
        {
            "dataset": "synthetic:merchants=4,users=160,items=300",
            "partition": "site",
            "rounds": 3,
            "seed": 1,
            "out": str(out),
            "eval_full_ranking": False,
            "tasks": SMALL_TASKS,
            **extra,
        },
    )


def _dp(out):
    return _cfg(out, **{"privacy.mode": "record", "privacy.epsilon": 4.0, "privacy.delta": 1e-3})


class Crash(RuntimeError):
    pass


def _crash_after(k):
    def on_round(server_round, rows, rlog):
        if server_round == k:
            raise Crash(f"simulated server crash after round {k}")

    return on_round


def _releases(run):
    return sorted(tuple(e[f] for f in RELEASE_FIELDS) for e in read_ledger(run.ledger))


def _final_epsilon(run):
    return {e["client"]: e["epsilon_composed"] for e in read_ledger(run.ledger)}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return simulate(_dp(tmp_path_factory.mktemp("a") / "run"), baselines=False)


@pytest.mark.slow
@pytest.mark.parametrize("crash", ["after round 2", "in round 2, before its checkpoint"])
def test_killed_run_resumes_to_the_ledger_of_an_uninterrupted_one(
    tmp_path, uninterrupted, monkeypatch, crash
):
    cfg = _dp(tmp_path / "run")
    if crash == "after round 2":
        on_round = _crash_after(2)
    else:  # clients released round 2 (ledger lines written), the server died before aggregating
        import fedrec.server.federation as federation

        real = federation.save_checkpoint
        on_round = None

        def dying(run, cfg, arrays, strategy, progress):
            if progress.round == 2:
                raise Crash("simulated server crash before the round-2 checkpoint")
            return real(run, cfg, arrays, strategy, progress)

        monkeypatch.setattr(federation, "save_checkpoint", dying)
    with pytest.raises(Crash):  # Flower re-raises the ServerApp's exception
        simulate(cfg, baselines=False, on_round=on_round)
    monkeypatch.undo()
    run_dir = tmp_path / "run"
    assert not (run_dir / "summary.json").exists()
    assert resume_config(run_dir) == cfg

    run, summary = simulate(resume_config(run_dir), baselines=False, resume_from=run_dir)
    ref_run, ref = uninterrupted
    assert summary["rounds"] == ref["rounds"] == 3 and summary["client_failures"] == []
    past = 12 if crash.startswith("in") else 0  # 4 clients x 3 tasks had released round 2
    assert summary["resumes"] == [
        {"after_round": 2 if past == 0 else 1, "ledger_lines_past_checkpoint": past}
    ]
    rows = [json.loads(x) for x in run.metrics.read_text().splitlines()]
    assert [(r["round"], r["task"]) for r in rows] == [
        (r, t) for r in (1, 2, 3) for t in ("recall", "ranking", "personal")
    ]
    for task in ("recall", "ranking", "personal"):
        ours, theirs = load_model(run.models / task), load_model(ref_run.models / task)
        shapes = {k: v.shape for k, v in ours.state_dict().items()}
        assert shapes == {k: v.shape for k, v in theirs.state_dict().items()}
        for key, value in ours.state_dict().items():  # seeded noise, replies summed in a
            np.testing.assert_array_equal(value, theirs.state_dict()[key])  # canonical order
    assert audit_ledger(run.ledger, run_id=run.path.name).ok  # a valid hash chain
    assert _releases(run) == _releases(ref_run)  # not one release twice, none lost
    assert _final_epsilon(run) == _final_epsilon(ref_run)
    assert not (run.path / "releases").exists()


@pytest.mark.slow  # its fixture runs a whole federation
def test_resume_is_refused_with_other_flags_or_for_a_finished_run(uninterrupted, capsys):
    ref_run, _ = uninterrupted
    assert cli_main(["simulate", "--resume", str(ref_run.path), "--rounds", "5"]) == 2
    assert "drop the other flags" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="finished"):
        resume_config(ref_run.path)


@pytest.mark.slow
def test_thirty_percent_of_clients_failing_every_round_do_not_stop_the_run(tmp_path):
    from fedrec.client.app import app

    cfg = _cfg(tmp_path / "run", dataset="synthetic:merchants=10,users=300,items=300")
    plan = FaultPlan(fail_share=0.3, seed=4)
    run, summary = simulate(cfg, baselines=False, client_app=with_faults(app, plan))
    assert summary["rounds"] == 3 and summary["stopped_early"] is None
    failures = summary["client_failures"]
    assert [sum(f["round"] == r for f in failures) for r in (1, 2, 3)] == [3, 3, 3]
    assert all("simulated failure" in f["reason"] for f in failures)
    assert summary["rejected_per_round"] == {"1": 0, "2": 0, "3": 0}
    assert all(np.isfinite(m["hr@10"]) for m in summary["tasks"].values())


@pytest.mark.slow
def test_x1000_updates_are_rejected_or_rescaled_to_their_predicted_norm_and_logged(tmp_path):
    """One attacker in five sends 1000x its update. norm_outliers = "reject" drops it;
    "rescale" (the default) keeps it at the norm the round predicts for its client's users, so
    the final models end near the rejecting run's, not hundreds of updates away from them."""
    from fedrec.client.app import app

    plan = FaultPlan(attack_share=0.2, attack_factor=1000.0, seed=2)
    runs = {}
    for action in ("reject", "rescale"):
        cfg = _cfg(
            tmp_path / action,
            dataset="synthetic:merchants=5,users=200,items=300",
            rounds=2,
            norm_outliers=action,
        )
        runs[action] = simulate(cfg, baselines=False, client_app=with_faults(app, plan))
    _, rejected = runs["reject"]
    assert rejected["rounds"] == 2 and rejected["rejected_per_round"] == {"1": 1, "2": 1}
    assert all("predicted for its" in r["reason"] for r in rejected["rejected_updates"])
    assert len({r["node"] for r in rejected["rejected_updates"]}) == 1
    assert "rescaled_updates" not in rejected
    _, kept = runs["rescale"]
    assert kept["rounds"] == 2 and kept["rejected_per_round"] == {"1": 0, "2": 0}
    rescaled = kept["rescaled_updates"]
    assert [r["round"] for r in rescaled] == [1, 2]
    assert len({r["node"] for r in rescaled}) == 1  # one attacker (node ids differ per run)
    for task in ("recall", "ranking", "personal"):
        w = {a: load_model(run.models / task).state_dict() for a, (run, _) in runs.items()}
        apart = sum(float(((w["rescale"][k] - w["reject"][k]) ** 2).sum()) for k in w["reject"])
        size = sum(float((w["reject"][k] ** 2).sum()) for k in w["reject"])
        # measured: 0.013-0.015 of the rejecting run's weight norm; with the x1000 updates
        # aggregated unscaled, 4.8-5.7
        assert 0 < (apart / size) ** 0.5 < 0.5, task  # > 0: the attacker's data is in it


@pytest.mark.slow
def test_a_client_overstating_its_users_is_weighed_at_10x_the_median_in_a_real_run(tmp_path):
    """An attacker states 1000x its users (FedAvg's weight) in every round of a real simulated
    federation: the screen lowers its weight to 10x the round's median and names it."""
    from fedrec.client.app import app

    plan = FaultPlan(attack_share=0.2, weight_factor=1000, seed=2)  # an honest update, a lie
    cfg = _cfg(tmp_path, dataset="synthetic:merchants=5,users=200,items=300", rounds=2)
    _, summary = simulate(cfg, baselines=False, client_app=with_faults(app, plan))
    adjusted = summary["rescaled_updates"]
    assert [r["round"] for r in adjusted] == [1, 2] and len({r["node"] for r in adjusted}) == 1
    for r in adjusted:
        stated, lowered, median = map(float, re.search(
            r"weight 'num-examples' (\S+) lowered to (\S+) \(10x the round's median weight "
            r"(\S+)\)", r["reason"]).groups())  # fmt: skip
        users = stated / 1000  # the attacker's own users, stated 1000x
        assert users == int(users) and 1 <= users <= median * 4 and lowered == int(10 * median)
    assert summary["rejected_per_round"] == {"1": 0, "2": 0}


@pytest.mark.slow
def test_registered_user_counts_weigh_an_overstating_client_at_its_own_users(tmp_path):
    """With register_users the simulation registers each client's user count (as `fedrec
    certs set-users` does for a partner site): the same 1000x liar is weighed at exactly its
    own users, every node's count is its partition's, and no honest weight is touched."""
    from fedrec.client.app import app
    from fedrec.workload import build_workload

    plan = FaultPlan(attack_share=0.2, weight_factor=1000, seed=2)
    cfg = _cfg(
        tmp_path, dataset="synthetic:merchants=5,users=200,items=300", rounds=2,
        register_users=True,
    )  # fmt: skip
    _, summary = simulate(cfg, baselines=False, client_app=with_faults(app, plan))
    work = build_workload(cfg)
    sizes = sorted(work.client_data(c).n_users for c in range(work.partition.n_clients))
    registered = summary["registered_users"]
    assert len(registered) == 5 and sorted(registered.values()) == sizes
    (attacker,) = plan.attackers(5)
    adjusted = summary["rescaled_updates"]
    assert [r["round"] for r in adjusted] == [1, 2] and len({r["node"] for r in adjusted}) == 1
    for r in adjusted:
        stated, lowered = map(float, re.search(
            r"weight 'num-examples' (\S+) lowered to (\S+) \(the users registered",
            r["reason"]).groups())  # fmt: skip
        assert stated == 1000 * lowered
        assert lowered == work.client_data(attacker).n_users
        assert registered[str(r["node"])] == lowered
    assert summary["rejected_per_round"] == {"1": 0, "2": 0}


@pytest.mark.slow
def test_sign_flipped_updates_are_reflected_from_the_second_round(tmp_path):
    """One attacker in ten sends minus its update from round 2. Under direction_outliers =
    "reflect" (the default) the screen keeps it negated, i.e. as the honest update, so the run
    ends at the clean run's models up to float rounding (under "reject" the reply would be
    dropped with its data). Reflection asks the global model's last step, which the first round
    has not (tests/test_update_screen.py), so the attack starts in round 2. ML-100K in ten
    near-equal silos: on small synthetic silos an honest ranking update can point against the
    last step (-0.06), and reflection then rightly rejects the flip. The margin is 0.03 here:
    the honest ranking update of round 2 is at 0.049 with the last step, under the default
    0.1, which at the default rejects this flip (measured; the 12-round benchmark's figures
    are in the README)."""
    from fedrec.client.app import app

    plan = FaultPlan(attack_share=0.1, attack_factor=-1.0, seed=2, attack_from_round=2)
    data = {"dataset": "ml-100k", "partition": "dirichlet:1000", "clients": 10, "rounds": 2}
    runs = {"clean": simulate(_cfg(tmp_path / "clean", **data), baselines=False)}
    cfg = _cfg(tmp_path / "reflect", direction_outliers="reflect", reflect_min_cosine=0.03,
               **data)
    runs["reflect"] = simulate(cfg, baselines=False, client_app=with_faults(app, plan))
    _, reflected = runs["reflect"]
    assert reflected["rejected_per_round"] == {"1": 0, "2": 0}
    [adjusted] = reflected["rescaled_updates"]
    assert adjusted["round"] == 2 and "reflected" in adjusted["reason"]
    # every task flipped, every task kept negated
    cosines = [float(c) for c in re.findall(r"cosine (-[\d.]+)", adjusted["reason"])]
    assert len(cosines) == 3 and max(cosines) <= -0.3
    for task in ("recall", "ranking", "personal"):
        w = {k: load_model(run.models / task).state_dict() for k, (run, _) in runs.items()}
        size = sum(float((w["clean"][k] ** 2).sum()) for k in w["clean"])
        apart = sum(float(((w["reflect"][k] - w["clean"][k]) ** 2).sum()) for k in w["clean"])
        # the clean run up to float32 rounding of the negation
        assert apart / size < 1e-8, task
