"""A deployed site's ledger holds all its runs; its lifetime epsilon composes across them.

Real accountants throughout (Opacus PRV/RDP, Google's dp-accounting), no mocks.
"""

from __future__ import annotations

import functools
import json
from dataclasses import replace
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import PLDAccountant
from flwr.app import Context, RecordDict
from flwr.common.config import parse_config_args

from fedrec.client.app import _site_budget, _site_delta
from fedrec.client.local import RoundResult
from fedrec.client.privacy import PrivacyRefusal, client_privacy
from fedrec.config import load_config
from fedrec.deploy import DeployError
from fedrec.deploy.client import Partner, preflight, supernode_command
from fedrec.privacy import (
    COMPOSED,
    ClientPrivacyState,
    Ledger,
    LedgerEntry,
    LedgerError,
    PrivacyError,
    audit_ledger,
    calibrate_noise,
    epsilon_opacus,
    format_table,
    read_ledger,
    verify_chain,
)
from fedrec.privacy.audit import LIFETIME
from fedrec.training import TrainStats
from fedrec.workload import build_workload

DELTA = 1e-3
TASKS = ("recall", "ranking", "personal")


def _cfg(rounds: int = 1, epsilon: float = 2.0, fusion_fit: str = "fixed"):
    """A site's run; without the DP fusion fit unless asked (its reserve would leave part of
    each run's budget unspent by these tests' training-only runs)."""
    return load_config(None, {
        "dataset": "synthetic:merchants=2,users=80,items=200", "partition": "site",
        "rounds": rounds, "privacy.mode": "record", "privacy.epsilon": epsilon,
        "privacy.delta": DELTA, "fusion_fit": fusion_fit,
    })  # fmt: skip


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def _round(ctl) -> RoundResult:
    return RoundResult({t: TrainStats(1.0, s, q, 10, 0.1) for t, (q, s) in ctl.plan.items()})


def _run(cfg, data, ledger: Path, run_id: str, *, budget: float | None, rounds: int):
    """One deployed run of client 0 on its site ledger: ``rounds`` rounds, a new controller
    each round (as the ClientApp makes one per message); calibrated in the first."""
    ctx = _context()
    for rnd in range(1, rounds + 1):
        ctl = client_privacy(
            cfg, ctx, 0, data, ledger_path=str(ledger), run_id=run_id, site=True,
            site_budget=budget,
        )  # fmt: skip
        ctl.before_round(rnd)
        ctl.after_round(rnd, _round(ctl))
    return ctl, ctx


def _pld(entries: list[dict]) -> float:
    """Epsilon of the concatenated history, straight from dp-accounting (no fedrec code)."""
    event = dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(
                e["sample_rate"], dp_accounting.GaussianDpEvent(e["noise_multiplier"])
            ),
            e["steps"],
        )
        for e in entries
    ])  # fmt: skip
    acc = PLDAccountant()
    acc.compose(event)
    return float(acc.get_epsilon(DELTA))


def _release(entry: dict) -> dict:
    """An entry's release fields (what a client hands to ``Ledger.append``)."""
    return {
        k: v for k, v in entry.items() if k not in ("seq", "run_id", "time", "prev_hash", "hash")
    }


def _items(entries: list[dict]) -> list[tuple[float, float, int]]:
    return [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries]


def _append_recall(
    path: Path, run_id: str, accountant: str, release: tuple[float, float, int], *, budget: float
) -> None:
    """Append one recall release of a fresh accountant (a run's first line) to a site ledger."""
    state = ClientPrivacyState(accountant=accountant)
    sigma, q, steps = release
    state.record("recall", noise_multiplier=sigma, sample_rate=q, steps=steps)
    entry = LedgerEntry.from_state(
        state, client="client-0", task="recall", round=1, clipping_norm=1.0, delta=DELTA,
        budget_epsilon=budget,
    )  # fmt: skip
    Ledger(path, run_id, site=True).append(entry)


@pytest.fixture(scope="module")
def data():
    return build_workload(_cfg()).client_data(0)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, data):
    """Run A spends most of a lifetime budget of 3; run B then calibrates to what remains."""
    ledger = tmp_path_factory.mktemp("site") / "privacy_ledger-acme.jsonl"
    cfg = _cfg(epsilon=2.0)
    a, _ = _run(cfg, data, ledger, "run-a", budget=3.0, rounds=1)
    b, _ = _run(cfg, data, ledger, "run-b", budget=3.0, rounds=1)
    return ledger, cfg, a, b


def test_calibrate_noise_composes_the_spent_history() -> None:
    spent = [(0.9, 0.02, 400), (1.3, 0.05, 100)]
    calibrate = functools.partial(
        calibrate_noise, delta=1e-5, sample_rate=0.02, steps_per_round=20, rounds=3,
        task_shares={t: 1.0 for t in TASKS}, accountant="rdp",
    )  # fmt: skip
    fresh = calibrate(epsilon=6.0)
    assert calibrate(epsilon=6.0, spent=()) == fresh
    after = calibrate(epsilon=6.0, spent=spent)
    assert all(after[t] > fresh[t] for t in TASKS)
    planned = [(after[t], 0.02, 20 * 3) for t in TASKS]
    total = epsilon_opacus([*spent, *planned], delta=1e-5, accountant="rdp")
    assert 0.98 * 6.0 < total <= 6.0  # the whole history meets the budget, and uses it
    # composed, not subtracted: the new run alone may spend more than 6 - eps(spent)
    eps_spent = epsilon_opacus(spent, delta=1e-5, accountant="rdp")
    assert epsilon_opacus(planned, delta=1e-5, accountant="rdp") > 6.0 - eps_spent
    with pytest.raises(PrivacyError):  # the spent history alone is over budget
        calibrate(epsilon=1.0, spent=[(0.8, 0.5, 1000)])


def test_two_runs_share_one_chain_and_verify(two_runs) -> None:
    ledger, *_ = two_runs
    entries = read_ledger(ledger)
    assert [e["run_id"] for e in entries] == ["run-a"] * 3 + ["run-b"] * 3
    assert [e["seq"] for e in entries] == list(range(6))
    assert verify_chain(ledger, site=True).ok
    strict = verify_chain(ledger)  # as a run ledger, run B's lines are foreign
    assert not strict.ok and any("foreign" in p for p in strict.problems)
    with pytest.raises(PrivacyError, match="several runs"):
        verify_chain(ledger, site=True, run_id="run-a")


def test_second_run_calibrates_to_the_remaining_lifetime_budget(two_runs) -> None:
    ledger, cfg, a, b = two_runs
    assert all(b.sigmas[t] > a.sigmas[t] for t in TASKS)  # less budget left: more noise
    entries = read_ledger(ledger)
    run_a = [e for e in entries if e["run_id"] == "run-a"]
    run_b = [e for e in entries if e["run_id"] == "run-b"]
    lifetime = epsilon_opacus(_items(entries), delta=DELTA, accountant="prv")
    assert 0.95 * 3.0 < lifetime <= 3.0  # run B spends what the site has left, no more
    assert run_a[-1]["epsilon_composed"] > 0.9 * 2.0  # run A alone spent most of it
    # entries stay per run: run B's reported composed epsilon is its own, not the lifetime
    assert run_b[-1]["epsilon_composed"] == pytest.approx(
        epsilon_opacus(_items(run_b), delta=DELTA, accountant="prv")
    )
    assert run_b[-1]["epsilon_composed"] < lifetime - 1.0
    assert all(e["budget_epsilon"] == 3.0 for e in entries)  # the site's budget, enforced


def test_audit_reports_per_run_and_lifetime(two_runs, tmp_path) -> None:
    ledger, *_ = two_runs
    result = audit_ledger(ledger, site=True)
    assert result.ok, (result.problems, [(r.label, r.task, r.detail) for r in result.rows])
    entries = read_ledger(ledger)
    assert {r.run for r in result.rows} == {"run-a", "run-b", LIFETIME}
    assert len(result.rows) == 3 * (len(TASKS) + 1)
    for run in ("run-a", "run-b"):
        mine = [e for e in entries if e["run_id"] == run]
        row = next(r for r in result.rows if r.run == run and r.task == COMPOSED)
        assert row.epsilon == mine[-1]["epsilon_composed"] and row.budget == 3.0
    life = next(r for r in result.rows if r.run == LIFETIME and r.task == COMPOSED)
    independent = _pld(entries)  # the concatenated history of both runs
    assert life.recomputed["dp-accounting-pld"] == pytest.approx(independent, rel=1e-9)
    assert abs(life.epsilon - independent) <= 0.02 + 0.02 * independent  # PRV vs PLD
    assert life.epsilon == epsilon_opacus(_items(entries), delta=DELTA, accountant="prv")
    assert life.epsilon > max(r.epsilon for r in result.rows if r.run != LIFETIME)
    ranking = next(r for r in result.rows if r.run == LIFETIME and r.task == "ranking")
    assert ranking.recomputed["dp-accounting-pld"] == pytest.approx(
        _pld([e for e in entries if e["task"] == "ranking"]), rel=1e-9
    )
    assert ranking.rounds == 2  # round 1 of each run
    labels = {row[0] for row in format_table(result)}
    assert labels == {"client-0 [run run-a]", "client-0 [run run-b]", f"client-0 [{LIFETIME}]"}
    assert not audit_ledger(ledger).ok  # as one run's ledger it does not verify


def test_a_spent_site_refuses_a_new_run(two_runs, data) -> None:
    ledger, cfg, *_ = two_runs
    before = ledger.read_bytes()
    with pytest.raises(PrivacyRefusal, match="lifetime budget 3"):
        client_privacy(
            cfg, _context(), 0, data, ledger_path=str(ledger), run_id="run-c", site=True,
            site_budget=3.0,
        )  # fmt: skip
    with pytest.raises(PrivacyRefusal, match="lifetime"):  # no site budget: the run's epsilon
        client_privacy(cfg, _context(), 0, data, ledger_path=str(ledger), run_id="run-c", site=True)
    assert ledger.read_bytes() == before


def test_a_release_of_another_run_mid_run_is_counted(tmp_path, data) -> None:
    """Runs may overlap at a site: the lifetime check before each round sees the other's lines."""
    ledger = tmp_path / "privacy_ledger-acme.jsonl"
    cfg = _cfg(rounds=2, epsilon=2.0)
    ctl, ctx = _run(cfg, data, ledger, "run-a", budget=2.5, rounds=1)
    _append_recall(ledger, "run-z", "prv", (1.0, 0.1, 50), budget=2.5)
    ctl = client_privacy(
        cfg, ctx, 0, data, ledger_path=str(ledger), run_id="run-a", site=True, site_budget=2.5
    )
    assert len(ctl.state) == 3 and len(ctl.prior) == 1  # its own lines, and run-z's
    ctl_run_only = ctl.state.composed_epsilon(delta=DELTA)
    assert ctl_run_only < 2.0  # round 2 fits the run's own budget ...
    with pytest.raises(PrivacyRefusal, match="lifetime epsilon"):  # ... but not the site's
        ctl.before_round(2)


def test_tampering_in_either_run_is_detected(two_runs, tmp_path) -> None:
    ledger, *_ = two_runs
    lines = ledger.read_bytes().splitlines(keepends=True)

    def broken(new_lines: list[bytes], name: str) -> Path:
        path = tmp_path / name
        path.write_bytes(b"".join(new_lines))
        return path

    for i in (1, 4):  # a line of run A, a line of run B
        entry = json.loads(lines[i])
        entry["noise_multiplier"] *= 2  # claim more noise than was used
        line = json.dumps(entry, sort_keys=True, separators=(",", ":")).encode() + b"\n"
        edited = [*lines[:i], line, *lines[i + 1 :]]
        report = verify_chain(broken(edited, f"edit{i}.jsonl"), site=True)
        assert not report.ok and any(p.startswith(f"line {i + 1}:") for p in report.problems)
        assert not audit_ledger(tmp_path / f"edit{i}.jsonl", site=True).ok
    dropped_run_a = verify_chain(broken(lines[3:], "no-a.jsonl"), site=True)  # forget run A
    assert not dropped_run_a.ok and any("genesis" in p for p in dropped_run_a.problems)
    gap = verify_chain(broken(lines[:3] + lines[4:], "gap.jsonl"), site=True)
    assert not gap.ok and any(p.startswith("line 4:") for p in gap.problems)
    with pytest.raises(LedgerError, match="does not verify"):  # the client will not train on it
        Ledger(tmp_path / "gap.jsonl", "run-c", site=True).append(_release(json.loads(lines[0])))


def test_old_single_run_ledgers_still_load(tmp_path) -> None:
    """A ledger written before site ledgers existed: one run, verified both ways, then grown."""
    path = tmp_path / "privacy_ledger-acme.jsonl"
    state = ClientPrivacyState(accountant="rdp")
    old = Ledger(path, "run-old")  # the pre-existing, single-run class usage
    for rnd in (1, 2):
        state.record("recall", noise_multiplier=1.2, sample_rate=0.05, steps=40)
        old.append(LedgerEntry.from_state(
            state, client="client-0", task="recall", round=rnd, clipping_norm=1.0, delta=DELTA,
            budget_epsilon=4.0,
        ))  # fmt: skip
    assert verify_chain(path, run_id="run-old").ok and verify_chain(path, site=True).ok
    assert audit_ledger(path, run_id="run-old").ok and audit_ledger(path, site=True).ok
    _append_recall(path, "run-new", "rdp", (1.2, 0.05, 40), budget=4.0)  # counts from zero
    with pytest.raises(LedgerError):  # a run ledger still refuses a second run
        old.append(_release(read_ledger(path)[0]))
    result = audit_ledger(path, site=True)
    assert [e["run_id"] for e in read_ledger(path)] == ["run-old", "run-old", "run-new"]
    assert result.ok, result.problems


def test_lifetime_over_budget_is_flagged(tmp_path) -> None:
    """Two runs each within budget 2, together over it: only the lifetime rows catch it."""
    path = tmp_path / "privacy_ledger-acme.jsonl"
    for run in ("run-a", "run-b"):
        state = ClientPrivacyState(accountant="rdp")
        state.record("recall", noise_multiplier=1.0, sample_rate=0.05, steps=40)
        Ledger(path, run, site=True).append(LedgerEntry.from_state(
            state, client="client-0", task="recall", round=1, clipping_norm=1.0, delta=DELTA,
            budget_epsilon=2.0,
        ))  # fmt: skip
    per_run = read_ledger(path)[0]["epsilon_composed"]
    assert per_run < 2.0 < epsilon_opacus(_items(read_ledger(path)), delta=DELTA, accountant="rdp")
    result = audit_ledger(path, site=True)
    assert not result.ok
    assert all(r.status == "ok" for r in result.rows if r.run != LIFETIME)
    life = next(r for r in result.rows if r.run == LIFETIME and r.task == COMPOSED)
    assert life.status == "over-budget"
    assert any("seq 1 (run 'run-b'): lifetime epsilon" in p for p in result.problems)


def test_budget_flag_reaches_the_client_app_as_node_config(tmp_path) -> None:
    data = tmp_path / "shop"
    partner = Partner("fl.example.com:9092", data, None, None, 2, tmp_path / "l.jsonl", budget=2.5,
                      budget_delta=1e-5)  # fmt: skip
    cmd = supernode_command(partner, data)
    node_config = parse_config_args([cmd[cmd.index("--node-config") + 1]])
    assert node_config["budget-epsilon"] == "2.5" and node_config["budget-delta"] == "1e-05"
    ctx = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
    assert _site_budget(ctx) == 2.5 and _site_delta(ctx) == 1e-5
    assert _site_budget(_context()) is None and _site_delta(_context()) is None
    no_delta = supernode_command(replace(partner, budget_delta=None), data)
    assert "budget-delta" not in parse_config_args([no_delta[no_delta.index("--node-config") + 1]])


@pytest.mark.parametrize(
    ("budget", "delta", "problem"),
    [(None, 1e-5, "needs --budget"), (8.0, 0.0, r"must be in \(0, 1\)"),
     (8.0, 1.0, r"must be in \(0, 1\)"), (8.0, float("nan"), r"must be in \(0, 1\)")],
)  # fmt: skip
def test_a_bad_budget_delta_stops_the_site_at_start(tmp_path, budget, delta, problem) -> None:
    data = tmp_path / "shop.csv"
    data.write_text("user,item\n1,2\n")
    partner = Partner("127.0.0.1:1", data, None, None, 0, tmp_path / "l.jsonl", budget=budget,
                      budget_delta=delta)  # fmt: skip
    with pytest.raises(DeployError, match=problem):
        preflight(partner)  # before the (closed) server address is probed


@pytest.mark.parametrize("mode", ["none", "user"])
def test_a_site_with_a_budget_refuses_runs_its_ledger_cannot_account(
    tmp_path, monkeypatch, mode
) -> None:
    """The run's config comes from the server: a site's own budget makes it refuse a run
    without DP (an unbounded epsilon) or with user-level DP (noise the server adds), before it
    reads any data; a record-level run goes on to train."""
    from flwr.app import ConfigRecord, Message
    from flwr.supercore.task_identity import TaskIdentity

    import fedrec.client.app as client_app

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # a Message outside a running app
    for attr in ("_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 0)
    trained = []
    monkeypatch.setattr(client_app, "_train", lambda *args: trained.append(args) or "trained")
    node = {"partition-id": 0, "data-path": str(tmp_path / "shop"), "budget-epsilon": "8.0",
            "ledger-path": str(tmp_path / "ledger.jsonl")}  # fmt: skip

    def train(settings):
        cfg = load_config(None, {"dataset": "synthetic", "partition": "site", **settings})
        content = {"config": ConfigRecord({"fedrec": cfg.to_json(), "server-round": 1})}
        msg = Message(RecordDict(content), dst_node_id=1, message_type="train")
        ctx = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
        return client_app.train(msg, ctx)

    reply = train({"privacy.mode": mode})
    assert reply.has_error() and f"privacy.mode '{mode}'" in reply.error.reason and not trained
    assert train({"privacy.mode": "record"}) == "trained" and len(trained) == 1
    # a site that fixed its budget's delta refuses a run asking for a larger one, no other
    node["budget-delta"] = "1e-05"
    reply = train({"privacy.mode": "record", "privacy.delta": 1e-3})
    assert reply.has_error() and "delta 1e-05" in reply.error.reason and len(trained) == 1
    assert "privacy.delta 0.001, above it" in reply.error.reason
    for delta in (1e-5, 1e-6):
        assert train({"privacy.mode": "record", "privacy.delta": delta}) == "trained"
    assert len(trained) == 3
    # a site without a ledger of its own takes part in no DP run (the message's ledger path is
    # the server's choice of a file on the site's machine)
    for key in ("ledger-path", "budget-epsilon", "budget-delta"):
        del node[key]
    reply = train({"privacy.mode": "record"})
    assert reply.has_error() and "no privacy ledger" in reply.error.reason and len(trained) == 3
    assert train({"privacy.mode": "none"}) == "trained"


def test_a_site_budget_needs_a_site_ledger(tmp_path, data) -> None:
    with pytest.raises(PrivacyError, match="site"):
        client_privacy(_cfg(), _context(), 0, data, ledger_path=None, run_id="r", site_budget=1.0)


def test_cli_audits_a_site_ledger_file(two_runs, tmp_path) -> None:
    import shutil
    import subprocess
    import sys

    ledger, *_ = two_runs
    copy = tmp_path / ledger.name
    shutil.copy(ledger, copy)
    run = [sys.executable, "-m", "fedrec.cli", "audit", str(copy), "--final-only"]
    out = subprocess.run(run, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    printed = out.stdout + out.stderr  # the table goes to the console (stderr)
    assert LIFETIME in printed and "run-b" in printed and (tmp_path / "audit.json").exists()
    refused = subprocess.run([*run, "--empirical"], capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "run directory" in refused.stderr


# --- the DP fusion fit of a deployed run: each site's own release (client/dp_fusion.py) ------


@pytest.fixture
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):  # Message() outside a running app needs them
        monkeypatch.setattr(TaskIdentity, attr, 1)


def _fusion_query(cfg, models, run_id: str):
    from flwr.app import ConfigRecord, Message

    from fedrec.strategies.records import ARRAYS_KEY, pack

    config = ConfigRecord({"fedrec": cfg.to_json(), "fusion-tasks": list(models), "run-id": run_id})
    return Message(RecordDict({ARRAYS_KEY: pack(models), "config": config}), dst_node_id=1,
                   message_type="query.dpfusion")  # fmt: skip


def _site_fusion(cfg, ledger: Path, run_id: str, calls: list, *, budget=None):
    """One DP fusion query answered by client 0 of the site, scoring real (untrained) models on
    its validation users; ``calls`` counts the exact computations (new draws)."""
    from fedrec.client.dp_fusion import NAMES_KEY, SUMS_KEY, site_fusion_release
    from fedrec.client.local import build_task_models
    from fedrec.fusion.dp import validation_sums

    work = build_workload(cfg)
    models = build_task_models(cfg, work.spec, 0, item_text=None)

    def exact(cands):
        calls.append(validation_sums(models, work, cands))
        return calls[-1]

    reply = site_fusion_release(
        _fusion_query(cfg, models, run_id), cfg, 0, ledger_path=str(ledger), run_id=run_id,
        budget=budget, exact_sums=exact,
    )  # fmt: skip
    names = list(reply.content[NAMES_KEY][NAMES_KEY])
    return dict(zip(names, reply.content[SUMS_KEY][SUMS_KEY].numpy().tolist(), strict=True))


def test_a_site_makes_the_dp_fusion_release_once_within_its_budget(
    tmp_path, data, task_identity
) -> None:
    from fedrec.client.dp_fusion import kept_path

    cfg = _cfg(rounds=2, epsilon=2.0, fusion_fit="dp")  # the calibration sets the fit aside
    ledger = tmp_path / "privacy_ledger-acme.jsonl"
    _run(cfg, data, ledger, "run-f", budget=None, rounds=2)
    trained = ledger.read_bytes()
    calls: list = []
    noisy = _site_fusion(cfg, ledger, "run-f", calls)
    (line,) = [e for e in read_ledger(ledger) if e["task"] == "fusion"]
    assert (line["mechanism"], line["sample_rate"], line["steps"]) == ("gaussian", 1.0, 1)
    assert line["clipping_norm"] == 2.0 and line["noise_multiplier"] == cfg.privacy.fusion_noise
    assert line["round"] == 2 and line["run_id"] == "run-f"
    assert 0.95 * 2.0 < line["epsilon_composed"] <= 2.0  # the reserve, spent and no more
    exact = calls[0]
    assert sorted(noisy) == sorted(exact) and all(noisy[n] != exact[n] for n in exact)
    result = audit_ledger(ledger, site=True)
    assert result.ok, result.problems
    # asked again (outputs made again after a server crash): the kept draw, no second release
    with_line = ledger.read_bytes()
    assert _site_fusion(cfg, ledger, "run-f", calls) == noisy
    assert len(calls) == 1 and ledger.read_bytes() == with_line
    # a crash after the draw was kept, before its line: the line is written, nothing drawn
    ledger.write_bytes(trained)
    assert _site_fusion(cfg, ledger, "run-f", calls) == noisy
    (again,) = [e for e in read_ledger(ledger) if e["task"] == "fusion"]
    fresh = ("time", "hash")  # the line is written anew: its own time, so its own hash
    assert len(calls) == 1 and {k: v for k, v in again.items() if k not in fresh} == {
        k: v for k, v in line.items() if k not in fresh
    }
    assert verify_chain(ledger, site=True).ok
    with_line = ledger.read_bytes()
    # the kept draw lost while the ledger holds it: refused rather than drawn again
    kept_path(ledger, "client-0", "run-f").unlink()
    with pytest.raises(PrivacyRefusal, match="second release"):
        _site_fusion(cfg, ledger, "run-f", calls)
    assert len(calls) == 1 and ledger.read_bytes() == with_line


def test_a_site_refuses_a_dp_fusion_release_past_its_budget(tmp_path, data, task_identity) -> None:
    """A run calibrated without the fit (fusion_fit fixed) spent its budget on training: the
    release would exceed it, so no sums leave and the ledger is untouched."""
    ledger = tmp_path / "privacy_ledger-acme.jsonl"
    _run(_cfg(rounds=2, epsilon=2.0), data, ledger, "run-g", budget=None, rounds=2)
    before, calls = ledger.read_bytes(), []
    with pytest.raises(PrivacyRefusal, match="this run's epsilon"):
        _site_fusion(_cfg(rounds=2, epsilon=2.0, fusion_fit="dp"), ledger, "run-g", calls)
    assert calls == [] and ledger.read_bytes() == before


def test_a_site_ledgers_a_kept_draw_as_drawn_and_holds_to_its_runs_settings(
    tmp_path, data, task_identity
) -> None:
    """A draw kept before a crash is ledgered with the noise it was drawn with, whatever the next
    query says; a query for a run the site never trained in, or at another delta, is refused."""
    cfg = _cfg(rounds=2, epsilon=2.0, fusion_fit="dp")
    ledger = tmp_path / "privacy_ledger-acme.jsonl"
    _run(cfg, data, ledger, "run-h", budget=None, rounds=2)
    trained, calls = ledger.read_bytes(), []
    noisy = _site_fusion(cfg, ledger, "run-h", calls)
    ledger.write_bytes(trained)  # the crash: the draw kept, its line never written
    louder = replace(cfg, privacy=replace(cfg.privacy, fusion_noise=1000.0))
    assert _site_fusion(louder, ledger, "run-h", calls) == noisy and len(calls) == 1
    (line,) = [e for e in read_ledger(ledger) if e["task"] == "fusion"]
    assert line["noise_multiplier"] == cfg.privacy.fusion_noise  # as drawn, not as asked
    with pytest.raises(PrivacyRefusal, match="no training release"):
        _site_fusion(cfg, ledger, "run-never", calls)
    other_delta = replace(cfg, privacy=replace(cfg.privacy, delta=DELTA / 2))
    with pytest.raises(PrivacyRefusal, match="trained at delta"):
        _site_fusion(other_delta, ledger, "run-h", calls)
    assert len(calls) == 1


def test_a_users_dp_fusion_negatives_depend_on_that_user_alone() -> None:
    """The DP fit ranks each user among negatives drawn from their own id and items: leaving
    users out of the sums changes no other user's row (the sensitivity is one user's vector),
    unlike the evaluation protocol's one shared stream."""
    from fedrec.fusion.dp import private_candidates

    work = build_workload(_cfg())
    full = private_candidates(work)
    keep = work.valid.users[::3]
    part = private_candidates(replace(work, valid=work.valid.of_users(keep)))
    rows = np.searchsorted(work.valid.users, keep)
    assert np.array_equal(part, full[rows])
    assert (full[:, 0] == work.valid.targets).all() and full.shape[1] == 100
    seen = [set(work.dataset.interactions["item"][work.dataset.interactions["user"] == u])
            for u in work.valid.users[:5]]  # fmt: skip
    assert all(not (set(full[i, 1:]) & seen[i]) for i in range(5))


def test_a_run_at_a_larger_delta_cannot_make_the_sites_earlier_runs_look_cheaper(
    tmp_path, data
) -> None:
    """Without --budget-delta the server sets each run's delta. Run A spends a lifetime budget
    of 2 at delta 1e-5; run B asks for delta 1e-2, at which A's releases cost less than 2. The
    lifetime is composed at the smallest delta of the site's runs, so B is refused, and the
    audit states the lifetime at 1e-5 too."""
    ledger = tmp_path / "privacy_ledger-acme.jsonl"
    tight = replace(_cfg(), privacy=replace(_cfg().privacy, epsilon=2.0, delta=1e-5))
    _run(tight, data, ledger, "run-a", budget=2.0, rounds=1)
    first = read_ledger(ledger)
    spent = _items(first)
    assert epsilon_opacus(spent, delta=1e-5, accountant="prv") > 1.9  # A used its budget
    assert epsilon_opacus(spent, delta=1e-2, accountant="prv") < 1.5  # cheaper at 1e-2
    loose = replace(tight, privacy=replace(tight.privacy, delta=1e-2))
    with pytest.raises(PrivacyRefusal, match="lifetime .*delta 1e-05"):
        _run(loose, data, ledger, "run-b", budget=2.0, rounds=1)
    assert read_ledger(ledger) == first  # nothing released, nothing written
    lifetime = [r for r in audit_ledger(ledger, site=True).rows if r.run == LIFETIME]
    assert lifetime and all(r.delta == 1e-5 for r in lifetime)


def test_a_run_whose_delta_changes_mid_run_is_refused(tmp_path, data) -> None:
    """One run, one delta: a server raising it after round 1 would make the run's own
    releases look cheaper at each check."""
    ledger = tmp_path / "privacy_ledger-acme.jsonl"
    cfg = _cfg(rounds=2)
    ctx = _context()
    ctl = client_privacy(cfg, ctx, 0, data, ledger_path=str(ledger), run_id="run-a", site=True)
    ctl.before_round(1)
    ctl.after_round(1, _round(ctl))
    raised = replace(cfg, privacy=replace(cfg.privacy, delta=1e-2))
    with pytest.raises(PrivacyRefusal, match="earlier releases are at delta 0.001"):
        client_privacy(raised, ctx, 0, data, ledger_path=str(ledger), run_id="run-a", site=True)
