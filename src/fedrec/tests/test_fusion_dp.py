"""The DP fusion fit (``fedrec.fusion.dp``) on a real small run: one release, ledgered once.

The record-DP end-to-end test checks a full run's fusion lines; these check what happens when
the outputs stage runs again after a crash: the kept release is reused, never drawn twice.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from fedrec.client.privacy import client_name
from fedrec.config import FedrecConfig, load_config
from fedrec.fusion.dp import AVERAGE, FUSION_TASK, RELEASE_FILE, candidates, dp_fusion_fit
from fedrec.privacy import ClientPrivacyState, Ledger, LedgerEntry, read_ledger
from fedrec.privacy.audit import audit_ledger
from fedrec.rundir import RunDir
from fedrec.tests.test_fusion_run import small_models_and_work


@pytest.fixture(scope="module")
def models_work():
    return small_models_and_work()


def _run(tmp_path, work) -> tuple[RunDir, FedrecConfig]:
    """A run directory whose ledger holds one training release per client."""
    cfg = load_config(None, {"privacy.mode": "record", "privacy.epsilon": 8.0,
                             "privacy.delta": 1e-3})  # fmt: skip
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    ledger = Ledger(run.ledger, run.path.name)
    for i in range(work.partition.n_clients):
        state = ClientPrivacyState(accountant=cfg.privacy.accountant)
        state.record("recall", noise_multiplier=1.0, sample_rate=0.1, steps=40)
        ledger.append(LedgerEntry.from_state(
            state, client=client_name(i), task="recall", round=1, clipping_norm=1.0,
            delta=cfg.privacy.delta, budget_epsilon=cfg.privacy.epsilon))  # fmt: skip
    return run, cfg


def _fusion_lines(run: RunDir) -> list[dict]:
    return [e for e in read_ledger(run.ledger) if e["task"] == FUSION_TASK]


def test_the_fit_is_one_kept_release_in_every_clients_ledger(tmp_path, models_work):
    models, work = models_work
    run, cfg = _run(tmp_path, work)
    fit = dp_fusion_fit(cfg, run, work, models)
    assert fit.fuser is not None, fit.reason
    lines = _fusion_lines(run)
    assert sorted(e["client"] for e in lines) == sorted(
        client_name(i) for i in range(work.partition.n_clients))  # fmt: skip
    assert all(e["noise_multiplier"] == cfg.privacy.fusion_noise and e["sample_rate"] == 1.0
               and e["steps"] == 1 for e in lines)  # fmt: skip
    assert audit_ledger(run.ledger).ok  # an independent accountant agrees with every line
    kept = json.loads((run.path / RELEASE_FILE).read_text())
    best = max(kept["noisy_sums"], key=kept["noisy_sums"].get)
    assert fit.fuser.weights == pytest.approx(candidates(list(models))[best])

    again = dp_fusion_fit(cfg, run, work, models)  # the outputs stage run a second time
    assert again.fuser.weights == fit.fuser.weights
    assert len(_fusion_lines(run)) == len(lines)  # nothing released or ledgered twice


def test_a_release_kept_before_a_crash_is_reused_and_then_ledgered(tmp_path, models_work):
    models, work = models_work
    run, cfg = _run(tmp_path, work)
    # the server drew the release and died before writing the ledger lines
    sums = dict.fromkeys(candidates(list(models)), 0.0) | {AVERAGE: 1e9}
    (run.path / RELEASE_FILE).write_text(json.dumps({"noisy_sums": sums}))
    fit = dp_fusion_fit(cfg, run, work, models)
    assert fit.fuser.weights == pytest.approx(candidates(list(models))[AVERAGE])
    assert len(_fusion_lines(run)) == work.partition.n_clients


@pytest.mark.parametrize("damage", ["delete", "garble", "other candidates"])
def test_a_lost_or_damaged_release_is_never_drawn_again(tmp_path, models_work, damage):
    models, work = models_work
    run, cfg = _run(tmp_path, work)
    assert dp_fusion_fit(cfg, run, work, models).fuser is not None
    path = run.path / RELEASE_FILE
    if damage == "delete":
        path.unlink()
    elif damage == "garble":
        path.write_text('{"noisy_sums": {"recall": ')
    else:
        path.write_text(json.dumps({"noisy_sums": {"recall": 1.0, "content": 2.0}}))
    before = run.ledger.read_bytes()
    fit = dp_fusion_fit(cfg, run, work, models)
    assert fit.fuser is None and "no DP fit" in fit.reason
    assert run.ledger.read_bytes() == before
    assert not path.exists() or damage != "delete"  # no new draw was kept either


def test_no_fit_when_a_client_has_no_budget_left_for_it(tmp_path, models_work):
    models, work = models_work
    run, cfg = _run(tmp_path, work)
    spent = read_ledger(run.ledger)[-1]["epsilon_composed"]
    cfg = replace(cfg, privacy=replace(cfg.privacy, epsilon=spent + 1e-3))  # the fit costs more
    fit = dp_fusion_fit(cfg, run, work, models)
    assert fit.fuser is None and "no DP fit" in fit.reason
    assert not _fusion_lines(run) and not (run.path / RELEASE_FILE).exists()


def test_a_run_without_a_ledger_is_not_fitted(tmp_path, models_work):
    models, work = models_work
    run = RunDir(tmp_path)
    cfg = load_config(None, {"privacy.mode": "record"})
    fit = dp_fusion_fit(cfg, run, work, models)
    assert fit.fuser is None and not (tmp_path / RELEASE_FILE).exists()


@pytest.mark.parametrize("crash", ["mid-ledger, release file lost", "release file damaged"])
def test_an_earlier_draw_is_ledgered_for_every_client_even_when_it_cannot_be_used(
    tmp_path, models_work, crash
):
    models, work = models_work
    run, cfg = _run(tmp_path, work)
    path = run.path / RELEASE_FILE
    if crash.startswith("mid-ledger"):
        assert dp_fusion_fit(cfg, run, work, models).fuser is not None
        lines = run.ledger.read_text().splitlines()
        run.ledger.write_text("\n".join(lines[:-2]) + "\n")  # died after two clients' lines...
        path.unlink()  # ...and the kept sums are lost
        assert len(_fusion_lines(run)) == work.partition.n_clients - 2
    else:
        path.write_text('{"noisy_sums": ')  # drawn, then the file damaged, no line written
        assert not _fusion_lines(run)
    fit = dp_fusion_fit(cfg, run, work, models)
    assert fit.fuser is None and "no DP fit" in fit.reason
    lines = _fusion_lines(run)
    assert sorted(e["client"] for e in lines) == sorted(
        client_name(i) for i in range(work.partition.n_clients))  # fmt: skip
    assert audit_ledger(run.ledger).ok
