"""The hash-chained ledger: appends, tamper detection, locking (fedrec.privacy.ledger)."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path
from typing import Any

import pytest

from fedrec.privacy import (
    ClientPrivacyState,
    Ledger,
    LedgerEntry,
    LedgerError,
    PrivacyError,
    genesis_hash,
    read_ledger,
    verify_chain,
)

RUN = "run-a"


def _fields(i: int = 0, client: str = "site-1", task: str = "recall") -> dict[str, Any]:
    return {
        "client": client,
        "task": task,
        "round": i + 1,
        "mechanism": "dp-sgd",
        "unit": "user",
        "noise_multiplier": 1.1,
        "sample_rate": 0.01,
        "steps": 100,
        "clipping_norm": 1.0,
        "delta": 1e-5,
        "accountant": "prv",
        "epsilon": 0.1 * (i + 1),
        "epsilon_composed": 0.1 * (i + 1),
        "budget_epsilon": 8.0,
    }


def _ledger(tmp_path: Path, n: int = 5, run_id: str = RUN) -> Path:
    ledger = Ledger(tmp_path / f"{run_id}.jsonl", run_id)
    for i in range(n):
        ledger.append(_fields(i))
    return ledger.path


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _problems_about(path: Path, line: int) -> list[str]:
    report = verify_chain(path, run_id=RUN)
    assert not report.ok
    return [p for p in report.problems if p.startswith(f"line {line}:")]


def test_append_chains_and_verifies(tmp_path: Path) -> None:
    path = _ledger(tmp_path, 3)
    entries = read_ledger(path)
    assert [e["seq"] for e in entries] == [0, 1, 2]
    assert entries[0]["prev_hash"] == genesis_hash(RUN)
    report = verify_chain(path, run_id=RUN)
    assert report.ok, report.problems
    assert report.n_lines == 3 and len(report.entries) == 3
    assert verify_chain(_lines(path)).ok  # lines as readlines() gives them
    assert Ledger(path, RUN).verify(expected_head=report.head_hash).ok


def test_empty_and_missing_ledgers(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert verify_chain(tmp_path / "empty.jsonl", run_id=RUN).ok
    missing = verify_chain(tmp_path / "nope.jsonl")
    assert not missing.ok and "does not exist" in missing.problems[0]


def test_edited_number_is_detected(tmp_path: Path) -> None:
    path = _ledger(tmp_path)
    lines = _lines(path)
    edited = json.loads(lines[2])
    edited["epsilon"] = 0.01
    lines[2] = json.dumps(edited, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    path.write_bytes(b"".join(lines))
    assert any("edited" in p for p in _problems_about(path, 3))
    assert any("prev_hash" in p for p in _problems_about(path, 4))


def test_edited_line_with_recomputed_hash_breaks_the_next_link(tmp_path: Path) -> None:
    from fedrec.privacy.ledger import canonical_json, entry_hash

    path = _ledger(tmp_path)
    lines = _lines(path)
    forged = json.loads(lines[1])
    forged["epsilon"] = 0.0
    forged["hash"] = entry_hash(forged)
    lines[1] = canonical_json(forged) + b"\n"
    path.write_bytes(b"".join(lines))
    assert _problems_about(path, 2) == []
    assert any("does not match line 2" in p for p in _problems_about(path, 3))


def test_swapped_lines_are_detected(tmp_path: Path) -> None:
    path = _ledger(tmp_path)
    lines = _lines(path)
    lines[1], lines[2] = lines[2], lines[1]
    path.write_bytes(b"".join(lines))
    assert any("seq" in p for p in _problems_about(path, 2))
    assert any("prev_hash" in p for p in _problems_about(path, 3))


def test_removed_middle_line_is_detected(tmp_path: Path) -> None:
    path = _ledger(tmp_path)
    lines = _lines(path)
    del lines[2]
    path.write_bytes(b"".join(lines))
    problems = _problems_about(path, 3)
    assert any("prev_hash does not match line 2" in p for p in problems)
    assert any("seq is 3, expected 2" in p for p in problems)


def test_removed_first_line_is_detected(tmp_path: Path) -> None:
    path = _ledger(tmp_path)
    path.write_bytes(b"".join(_lines(path)[1:]))
    assert any("genesis" in p for p in _problems_about(path, 1))


def test_truncated_last_line_is_detected(tmp_path: Path) -> None:
    path = _ledger(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    problems = _problems_about(path, 5)
    assert problems and "truncated" in problems[0]
    with pytest.raises(LedgerError, match="line 5 is truncated"):
        read_ledger(path)


def test_a_half_written_last_line_is_moved_aside_by_fedrec_ledger_trim(tmp_path: Path) -> None:
    """A crash mid-append left a partial line, which blocked every later append (and so every
    client) for good. `fedrec ledger trim` moves it aside, kept, and only that line."""
    from fedrec.cli import main

    path = _ledger(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    complete = data[: data.rfind(b"\n", 0, len(data) - 1) + 1]
    with pytest.raises(LedgerError, match="fedrec ledger trim"):
        Ledger(path, RUN).append(_fields(5))
    assert main(["ledger", "trim", str(path)]) == 0
    assert path.read_bytes() == complete
    (aside,) = tmp_path.glob(f"{path.name}.partial-*")
    assert complete + aside.read_bytes() == data[: len(data) - 40]  # nothing lost
    Ledger(path, RUN).append(_fields(4))  # the chain goes on from line 4
    assert verify_chain(path, run_id=RUN).ok and len(read_ledger(path)) == 5
    assert main(["ledger", "trim", str(path)]) == 0  # complete: nothing to move
    assert len(list(tmp_path.glob(f"{path.name}.partial-*"))) == 1


def test_trim_moves_nothing_when_the_complete_lines_do_not_chain(tmp_path: Path) -> None:
    path = _ledger(tmp_path)
    lines = _lines(path)
    tampered = b"".join([lines[0], lines[2], lines[1], *lines[3:]])[:-40]  # swapped, then cut
    path.write_bytes(tampered)
    from fedrec.privacy.ledger import set_aside_partial_line

    with pytest.raises(LedgerError, match="do not chain"):
        set_aside_partial_line(path)
    assert path.read_bytes() == tampered and not list(tmp_path.glob("*.partial-*"))


def test_foreign_line_is_detected(tmp_path: Path) -> None:
    path = _ledger(tmp_path, 3)
    other = _ledger(tmp_path, 4, run_id="run-b")
    with path.open("ab") as fh:
        fh.write(_lines(other)[3])
    problems = _problems_about(path, 4)
    assert any("foreign" in p for p in problems)
    assert any("prev_hash" in p for p in problems)


def test_dropped_tail_needs_the_expected_head(tmp_path: Path) -> None:
    path = _ledger(tmp_path)
    head = verify_chain(path).head_hash
    path.write_bytes(b"".join(_lines(path)[:-1]))
    assert verify_chain(path, run_id=RUN).ok  # a shorter chain is still a chain
    report = verify_chain(path, run_id=RUN, expected_head=head)
    assert not report.ok and "head hash" in report.problems[0]


def test_missing_field_is_detected(tmp_path: Path) -> None:
    from fedrec.privacy.ledger import canonical_json, entry_hash

    path = _ledger(tmp_path, 2)
    lines = _lines(path)
    entry = json.loads(lines[1])
    del entry["delta"]
    entry["hash"] = entry_hash(entry)
    lines[1] = canonical_json(entry) + b"\n"
    path.write_bytes(b"".join(lines))
    assert any("missing field(s): delta" in p for p in _problems_about(path, 2))


def test_append_refuses_a_broken_ledger(tmp_path: Path) -> None:
    path = _ledger(tmp_path, 3)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(LedgerError, match="does not verify"):
        Ledger(path, RUN).append(_fields(9))
    assert path.read_bytes() == data[:-10]


def test_append_refuses_another_runs_ledger(tmp_path: Path) -> None:
    path = _ledger(tmp_path, 2)
    with pytest.raises(LedgerError, match="foreign"):
        Ledger(path, "run-b").append(_fields(2))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"epsilon": -1.0}, "'epsilon'"),
        ({"mechanism": "laplace"}, "'mechanism'"),
        ({"steps": 2.5}, "'steps'"),
        ({"seq": 7}, "set by the ledger"),
        ({"hash": "0" * 64}, "set by the ledger"),
        ({"colour": "red"}, "unknown field"),
    ],
)
def test_append_validates_fields(tmp_path: Path, change, match) -> None:
    with pytest.raises(PrivacyError, match=match):
        Ledger(tmp_path / "l.jsonl", RUN).append(_fields() | change)
    fields = _fields()
    del fields["delta"]
    with pytest.raises(PrivacyError, match="missing field"):
        Ledger(tmp_path / "l.jsonl", RUN).append(fields)


def _writer(path: str, client: str, n: int) -> None:
    ledger = Ledger(path, RUN)
    for i in range(n):
        ledger.append(_fields(i, client=client))


def test_concurrent_writers_keep_one_chain(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.jsonl")
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(path, f"site-{k}", 15)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    report = verify_chain(path, run_id=RUN)
    assert report.ok, report.problems[:3]
    assert report.n_lines == 60
    for k in range(4):
        rounds = [e["round"] for e in report.entries if e["client"] == f"site-{k}"]
        assert rounds == list(range(1, 16))


def test_entry_from_state_matches_the_state() -> None:
    state = ClientPrivacyState(accountant="rdp")
    state.record("recall", noise_multiplier=1.0, sample_rate=0.02, steps=50)
    state.record("ranking", noise_multiplier=1.2, sample_rate=0.02, steps=40)
    common = {
        "client": "site-1",
        "round": 1,
        "clipping_norm": 1.0,
        "delta": 1e-5,
        "budget_epsilon": 5.0,
    }
    recall = LedgerEntry.from_state(state, task="recall", **common)
    ranking = LedgerEntry.from_state(state, task="ranking", **common)
    assert (recall.noise_multiplier, recall.steps) == (1.0, 50)
    assert recall.epsilon_composed == recall.epsilon  # as of its own record: recall alone
    assert ranking.epsilon_composed == pytest.approx(state.composed_epsilon(delta=1e-5))
    assert ranking.accountant == "rdp" and ranking.unit == "user"
    with pytest.raises(PrivacyError, match="clipping_norm"):
        LedgerEntry.from_state(state, task="recall", **(common | {"clipping_norm": 0.0}))
