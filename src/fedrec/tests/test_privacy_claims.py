"""The audit checks each ledger line's mechanism inputs against the run's config and data.

A client whose accounting strays from what it trained (more steps than it ledgers, a higher
sample rate) writes a valid chain whose epsilons recompute exactly: only the config can tell.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fedrec.client.privacy import client_name, expected_releases, release_plan
from fedrec.config import load_config
from fedrec.privacy import ClientPrivacyState, Ledger, LedgerEntry, read_ledger
from fedrec.privacy.claims import Expected, check_claims
from fedrec.training import sample_rate_for, steps_per_round
from fedrec.workload import build_workload

LOCAL = Expected("dp-sgd", 0.25, 8, 1.0)


def _line(**over):
    return {"client": "client-0", "task": "recall", "round": 1, "mechanism": "dp-sgd",
            "sample_rate": 0.25, "steps": 8, "clipping_norm": 1.0, "delta": 1e-3,
            "noise_multiplier": 2.0} | over  # fmt: skip


def test_lines_that_match_pass_and_each_differing_input_is_named():
    expected = {("client-0", "recall"): LOCAL}
    assert check_claims([_line(), _line(round=2)], expected, delta=1e-3) == (2, [])
    for over, name in [({"steps": 4}, "steps 4, expected 8"),
                       ({"sample_rate": 0.5}, "sample_rate 0.5, expected 0.25"),
                       ({"clipping_norm": 2.0}, "clipping_norm 2.0"),
                       ({"delta": 1e-2}, "delta 0.01, expected 0.001"),
                       ({"mechanism": "gaussian"}, "mechanism 'gaussian'"),
                       ({"noise_contributors": 5}, "noise_contributors 5, expected None"),
                       ({"steps": "8"}, "steps '8'")]:  # fmt: skip
        checked, problems = check_claims([_line(), _line(round=2, **over)], expected, delta=1e-3)
        assert checked == 2 and len(problems) == 1, over
        assert problems[0].startswith("line 2 (client-0, recall, round 2)") and name in problems[0]
    _, problems = check_claims([_line(client="client-9")], expected, delta=1e-3)
    assert "no such client and task" in problems[0]
    # an expected noise multiplier bounds the claimed one from above (claiming more noise is
    # what hides spending), with slack for the calibration's own 1e-3 precision
    fit = Expected("gaussian", 1.0, 1, 2.0, noise_multiplier=8.0)
    line = _line(task="fusion", mechanism="gaussian", sample_rate=1.0, steps=1, clipping_norm=2.0)
    for claimed, flagged in ((9.0, True), (8.0 * 1.001, False), (7.0, False)):
        _, problems = check_claims([line | {"noise_multiplier": claimed}],
                                   {("client-0", "fusion"): fit}, delta=1e-3)  # fmt: skip
        assert bool(problems) == flagged, claimed
    assert "noise_multiplier 9.0, more than the 8.0 calibrated" in check_claims(
        [line | {"noise_multiplier": 9.0}], {("client-0", "fusion"): fit}, delta=1e-3)[1][0]
    # a client whose calibration fails cannot have trained: any line of it is wrong
    broken = Expected("dp-sgd", 0.25, 8, 1.0, problem="its calibration fails")
    _, problems = check_claims([_line()], {("client-0", "recall"): broken}, delta=1e-3)
    assert "its calibration fails" in problems[0]


def test_the_expected_inputs_are_the_training_plan_of_each_clients_users():
    cfg = load_config(None, {"privacy.mode": "record"})
    expected = expected_releases(cfg, [7, 196])
    for client, users in ((0, 7), (1, 196)):
        for task, tcfg in cfg.tasks.items():
            want = expected[(client_name(client), task)]
            assert (want.sample_rate, want.steps) == (
                sample_rate_for(tcfg, users), steps_per_round(tcfg, users))  # fmt: skip
            assert want.mechanism == "dp-sgd" and want.noise_contributors is None
    dist = load_config(None, {"privacy.mode": "record", "privacy.noise": "distributed",
                              "secure_aggregation": True, "strategy": "fedadam",
                              "privacy.min_contributors": 2})  # fmt: skip
    want = expected_releases(dist, [7])[("client-0", "recall")]
    assert (want.mechanism, want.sample_rate, want.steps, want.noise_contributors) == (
        "dp-sgd-distributed", dist.privacy.sample_rate, 1, 2)  # fmt: skip


def _run_dir(tmp_path, *, steps_off: int = 0, sigma: float = 3.0):
    """A run directory whose ledger a client wrote consistently (valid chain, epsilons that
    recompute) from its own plan, client-1's recall steps off by ``steps_off``, every noise
    multiplier ``sigma`` (0: the one the client's calibration gives)."""
    run = tmp_path / "run"
    run.mkdir(parents=True)
    cfg = load_config(None, {"dataset": "synthetic:merchants=3,users=90,items=300",
                             "partition": "site", "rounds": 2, "privacy.mode": "record",
                             "fusion_fit": "fixed", "out": str(run)})  # fmt: skip
    (run / "config.toml").write_text(cfg.to_toml())
    work = build_workload(cfg)
    ledger = Ledger(run / "privacy_ledger.jsonl", run.name)
    users = [work.client_data(c).n_users for c in range(work.partition.n_clients)]
    calibrated = expected_releases(cfg, users, noise=True)
    for c in range(work.partition.n_clients):
        state = ClientPrivacyState(accountant=cfg.privacy.accountant)
        for rnd in (1, 2):
            for task, (q, steps) in release_plan(cfg, users[c]).items():
                off = steps_off if (c, task) == (1, "recall") else 0
                z = sigma or calibrated[(client_name(c), task)].noise_multiplier
                state.record(task, noise_multiplier=z, sample_rate=q, steps=steps + off)
                ledger.append(LedgerEntry.from_state(
                    state, client=client_name(c), task=task, round=rnd,
                    clipping_norm=cfg.privacy.clipping_norm, delta=cfg.privacy.delta,
                    budget_epsilon=cfg.privacy.epsilon))  # fmt: skip
    return run


@pytest.mark.parametrize("steps_off", [0, -1])
def test_fedrec_audit_fails_a_ledger_whose_steps_stray_from_the_config(tmp_path, steps_off):
    run = _run_dir(tmp_path, steps_off=steps_off)
    audit = subprocess.run([sys.executable, "-m", "fedrec.cli", "audit", str(run),
                            "--final-only"], capture_output=True, text=True)  # fmt: skip
    out = audit.stdout + audit.stderr
    claims = json.loads((run / "audit.json").read_text())["claims"]
    assert claims["checked"] == 3 * 3 * 2
    if steps_off == 0:
        assert audit.returncode == 0, out
        assert claims["problems"] == [] and "18 lines, 0 differ" in " ".join(out.split())
        return
    assert audit.returncode == 1, out  # the chain and every epsilon are fine: only the steps
    assert len(claims["problems"]) == 2 and all("client-1, recall" in p for p in
                                                claims["problems"])  # fmt: skip
    assert not json.loads((run / "audit.json").read_text())["ok"]
    assert "ledger input differs from the config" in out


def test_a_damaged_ledger_fails_the_audit_without_a_traceback(tmp_path):
    run = _run_dir(tmp_path)
    with open(run / "privacy_ledger.jsonl", "a") as fh:
        fh.write('{"client": "client-0", "task": \n')  # a half-written line
    audit = subprocess.run([sys.executable, "-m", "fedrec.cli", "audit", str(run),
                            "--final-only"], capture_output=True, text=True)  # fmt: skip
    assert audit.returncode == 1 and "Traceback" not in audit.stderr, audit.stderr
    saved = json.loads((run / "audit.json").read_text())
    assert not saved["ok"] and "chain is broken" in saved["claims"]["skipped"]


def test_the_full_audit_checks_each_noise_multiplier_against_the_calibration(tmp_path):
    from fedrec.cli import _claims_check

    good = _run_dir(tmp_path / "good", sigma=0)
    assert _claims_check(good, read_ledger(good / "privacy_ledger.jsonl"), noise=True) == {
        "checked": 18, "problems": []}  # fmt: skip
    claimed = _run_dir(tmp_path / "claimed", sigma=40.0)  # far more noise than calibrated
    checked = _claims_check(claimed, read_ledger(claimed / "privacy_ledger.jsonl"), noise=True)
    assert len(checked["problems"]) == 18
    assert all("noise_multiplier 40.0, more than the" in p for p in checked["problems"])
    # --final-only (and noise=False) leaves the calibration out
    assert _claims_check(claimed, read_ledger(claimed / "privacy_ledger.jsonl"))["problems"] == []


def test_a_config_no_client_can_calibrate_for_is_a_problem_not_a_crash():
    cfg = load_config(None, {"privacy.mode": "record", "privacy.epsilon": 1e-3})
    want = expected_releases(cfg, [7, 7], noise=True)
    assert all("calibration fails" in w.problem for w in want.values())
