"""The audit recomputes every reported epsilon independently (fedrec.privacy.audit)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedrec.privacy import (
    COMPOSED,
    TABLE_COLUMNS,
    ClientPrivacyState,
    Ledger,
    LedgerEntry,
    Tolerance,
    audit_ledger,
    calibrate_noise,
    epsilon_opacus,
    format_table,
    write_audit,
)

RUN = "run-audit"
DELTA = 1e-5
TASKS = ("recall", "ranking", "personal")


def _simulate(
    path: Path,
    *,
    accountant: str = "rdp",
    clients: dict[str, float] | None = None,
    rounds: int = 3,
    steps: int = 20,
    budget: float = 4.0,
) -> dict[str, ClientPrivacyState]:
    """A run as the lead's loop would write it: record, build the entry, append."""
    clients = clients or {"site-1": 0.02, "site-2": 0.05}
    ledger = Ledger(path, RUN)
    states = {}
    for client, q in clients.items():
        sigmas = calibrate_noise(
            epsilon=budget,
            delta=DELTA,
            sample_rate=q,
            steps_per_round=steps,
            rounds=rounds,
            task_shares={t: 1.0 for t in TASKS},
            accountant=accountant,  # type: ignore[arg-type]
        )
        states[client] = ClientPrivacyState(accountant=accountant)  # type: ignore[arg-type]
    for rnd in range(1, rounds + 1):
        for client, q in clients.items():
            state = states[client]
            for task in TASKS:
                state.record(task, noise_multiplier=sigmas[task], sample_rate=q, steps=steps)
                entry = LedgerEntry.from_state(
                    state,
                    client=client,
                    task=task,
                    round=rnd,
                    clipping_norm=1.0,
                    delta=DELTA,
                    budget_epsilon=budget,
                )
                ledger.append(entry)
    return states


def _row(result, client: str, task: str):
    return next(r for r in result.rows if r.client == client and r.task == task)


def test_honest_rdp_run_passes_and_matches_the_state(tmp_path: Path) -> None:
    path = tmp_path / "privacy_ledger.jsonl"
    states = _simulate(path)
    result = audit_ledger(path, budgets={"site-1": 4.0, "site-2": 4.0})
    assert result.ok, (result.problems, [r.detail for r in result.rows])
    assert len(result.rows) == 2 * (len(TASKS) + 1)
    for client, state in states.items():
        row = _row(result, client, COMPOSED)
        assert row.epsilon == pytest.approx(state.composed_epsilon(delta=DELTA))
        assert row.recomputed["dp-accounting-rdp"] == pytest.approx(row.epsilon, rel=1e-4)
        assert row.recomputed["dp-accounting-pld"] <= row.epsilon  # RDP is the looser bound
        assert row.epsilon <= 4.0 and row.rounds == 3
        assert _row(result, client, "ranking").epsilon == pytest.approx(
            state.epsilon("ranking", delta=DELTA)
        )
    assert [p[0] for p in result.series["site-1"]] == [1, 2, 3]


def test_honest_prv_run_passes(tmp_path: Path) -> None:
    path = tmp_path / "privacy_ledger.jsonl"
    states = _simulate(path, accountant="prv", clients={"site-1": 0.05}, rounds=2, steps=10)
    result = audit_ledger(path)
    assert result.ok, (result.problems, [r.detail for r in result.rows])
    row = _row(result, "site-1", COMPOSED)
    assert row.epsilon == states["site-1"].composed_epsilon(delta=DELTA)
    assert row.recomputed["opacus-prv"] == row.epsilon
    assert 0 < row.epsilon - row.recomputed["dp-accounting-pld"] < 0.02


def test_over_budget_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "privacy_ledger.jsonl"
    _simulate(path)
    result = audit_ledger(path, budgets={"site-1": 1.0})
    assert not result.ok
    assert _row(result, "site-1", COMPOSED).status == "over-budget"
    assert "ledger states budget 4" in _row(result, "site-1", COMPOSED).detail
    assert _row(result, "site-2", COMPOSED).status == "ok"  # held to its ledger budget
    # a run's own budget (config.toml's privacy.epsilon) holds every client; a per-client one
    # still overrides it
    every = audit_ledger(path, run_budget=1.0)
    assert {_row(every, c, COMPOSED).status for c in ("site-1", "site-2")} == {"over-budget"}
    both = audit_ledger(path, budgets={"site-2": 4.0}, run_budget=1.0)
    assert _row(both, "site-1", COMPOSED).status == "over-budget"
    assert _row(both, "site-2", COMPOSED).status == "ok"


def test_training_past_the_ledger_budget_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "privacy_ledger.jsonl"
    states = _simulate(path, clients={"site-1": 0.02}, rounds=2)
    state, ledger = states["site-1"], Ledger(path, RUN)
    for task in TASKS:  # a third round the budget was never calibrated for
        state.record(task, noise_multiplier=0.8, sample_rate=0.02, steps=200)
        fields = {
            "client": "site-1",
            "task": task,
            "round": 3,
            "clipping_norm": 1.0,
            "delta": DELTA,
        }
        ledger.append(LedgerEntry.from_state(state, budget_epsilon=4.0, **fields))
    result = audit_ledger(path)
    assert not result.ok
    assert _row(result, "site-1", COMPOSED).status == "over-budget"


def _forged_run(
    path: Path, *, scale: float = 1.0, per_round: bool = False, last_scale: float | None = None
) -> None:
    """One client, one task, 3 rounds; reported epsilons scaled or per round."""
    ledger = Ledger(path, RUN)
    for rnd in range(1, 4):
        hist = [(1.0, 0.02, 50)] * (1 if per_round else rnd)
        factor = last_scale if rnd == 3 and last_scale is not None else scale
        eps = factor * epsilon_opacus(hist, delta=DELTA, accountant="prv")
        fields = {"client": "site-1", "task": "recall", "round": rnd, "mechanism": "dp-sgd"}
        fields |= {"unit": "user", "noise_multiplier": 1.0, "sample_rate": 0.02, "steps": 50}
        fields |= {"clipping_norm": 1.0, "delta": DELTA, "accountant": "prv", "epsilon": eps}
        ledger.append(fields | {"epsilon_composed": eps, "budget_epsilon": 8.0})


def test_per_round_epsilon_reported_as_total_is_a_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "privacy_ledger.jsonl"
    _forged_run(path, per_round=True)
    result = audit_ledger(path)
    assert not result.ok
    assert _row(result, "site-1", COMPOSED).status == "mismatch"
    assert any(p.startswith("seq 1 ") and "recomputes" in p for p in result.problems)
    assert not any(p.startswith("seq 0 ") for p in result.problems)  # round 1 was right


def test_under_reporting_is_a_mismatch_even_without_entry_checks(tmp_path: Path) -> None:
    path = tmp_path / "privacy_ledger.jsonl"
    _forged_run(path, scale=0.9)
    result = audit_ledger(path, every_entry=False)
    row = _row(result, "site-1", "recall")
    assert row.status == "mismatch"
    assert "opacus-prv" in row.detail and "dp-accounting-pld" in row.detail
    assert not result.ok


def test_decreasing_epsilon_is_flagged_by_the_cheap_checks(tmp_path: Path) -> None:
    path = tmp_path / "privacy_ledger.jsonl"
    _forged_run(path, last_scale=0.5)
    result = audit_ledger(path, every_entry=False)
    assert any(p.startswith("seq 2 ") and "decreased" in p for p in result.problems)
    assert not result.ok


def test_small_differences_are_within_tolerance(tmp_path: Path) -> None:
    path = tmp_path / "privacy_ledger.jsonl"
    _forged_run(path, scale=1.01)
    assert audit_ledger(path).ok
    assert not audit_ledger(path, tolerance=Tolerance(rel=0.0, abs=1e-6)).ok


def test_broken_chain_fails_the_audit_but_still_reports(tmp_path: Path) -> None:
    path = tmp_path / "privacy_ledger.jsonl"
    _simulate(path, clients={"site-1": 0.02}, rounds=2)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:2] + lines[3:]))
    result = audit_ledger(path, run_id=RUN)
    assert not result.ok and not result.chain.ok
    assert any(p.startswith("chain: line 3:") for p in result.problems)
    assert result.rows  # what is left is still recomputed


def test_write_audit_and_table(tmp_path: Path) -> None:
    path = tmp_path / "privacy_ledger.jsonl"
    _simulate(path, clients={"site-1": 0.02, "site-2": 0.05}, rounds=2)
    result = audit_ledger(path)
    json_path, png_path = write_audit(result, tmp_path / "audit")
    data = json.loads(json_path.read_text())
    assert data["ok"] is True and len(data["rows"]) == 8
    assert data["tolerance"] == {"rel": 0.02, "abs": 0.02}
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_table(result)
    assert len(table) == 8 and all(len(r) == len(TABLE_COLUMNS) for r in table)
    assert ("site-1", COMPOSED) in {(r[0], r[1]) for r in table}
