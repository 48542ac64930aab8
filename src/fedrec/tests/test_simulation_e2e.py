"""End to end through Flower's real simulation engine (Ray): synthetic data, 4 clients, 2 rounds."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from fedrec.config import load_config
from fedrec.models.registry import load_model
from fedrec.privacy import audit_ledger, read_ledger
from fedrec.simulation import simulate

SMALL = "synthetic:merchants=4,users=160,items=300"
# one local epoch of width-16 models: DP tests check accounting and the ledger, not utility,
# and DP-SGD steps (and the accountant's work per step) are what makes them slow
DP_TASKS = {t: {"local_epochs": 1, "dim": 16} for t in ("recall", "ranking", "personal")}


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "fedrec.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _cfg(tmp_path, **extra):
    return load_config(
        None,
        {
            "dataset": SMALL,
            "partition": "site",
            "rounds": 2,
            "seed": 1,
            "out": str(tmp_path / "run"),
            "eval_full_ranking": True,
            **extra,
        },
    )


@pytest.mark.slow
def test_federated_simulation_writes_a_complete_run_directory(tmp_path):
    run, summary = simulate(_cfg(tmp_path), baselines=True)
    assert summary["clients"] == 4 and summary["rounds"] == 2
    assert set(summary["tasks"]) == {"recall", "ranking", "personal"}
    for metrics in summary["tasks"].values():
        assert {"hr@10", "ndcg@10", "full/recall@20"} <= set(metrics)
    assert {"auc", "logloss"} <= set(summary["tasks"]["ranking"])
    assert {"hr@10", "ndcg@10"} <= set(summary["fused"])
    assert summary["fusion"]["method"] == "weighted"
    assert abs(sum(summary["fusion"]["weights"].values()) - 1) < 1e-6
    assert (run.path / "fusion.json").exists()
    assert "content" in summary["fusion"]["weights"]  # the content prior (public text) is fused,
    assert load_model(run.models / "content").task == "recall"  # saved for serving,
    assert summary["fusion"]["vs_best_single"]["task"] in summary["tasks"]  # never "best task"
    assert set(summary["tasks"]) == {"recall", "ranking", "personal"}
    assert set(summary["baselines"]["central"]) == {"recall", "ranking", "personal"}
    assert json.loads(run.summary.read_text()) == json.loads(json.dumps(summary))
    rows = [json.loads(x) for x in run.metrics.read_text().splitlines()]
    assert [(r["round"], r["task"]) for r in rows] == [
        (r, t) for r in (1, 2) for t in ("recall", "ranking", "personal")
    ]
    for task in ("recall", "ranking", "personal"):  # training makes progress across rounds
        losses = [r["train_loss"] for r in rows if r["task"] == task]
        assert losses[1] < losses[0]
        assert load_model(run.models / task).task == task
    assert not run.incomplete_marker().exists()
    assert "plot_hr_at_10.png" in run.report.read_text()


@pytest.mark.slow
def test_record_level_dp_accumulates_epsilon_in_an_auditable_ledger(tmp_path, capsys):
    cfg = _cfg(
        tmp_path,
        tasks=DP_TASKS,
        **{"privacy.mode": "record", "privacy.epsilon": 4.0, "privacy.delta": 1e-3, "rounds": 2},
    )
    run, summary = simulate(cfg, baselines=False)
    entries = read_ledger(run.ledger)
    assert summary["client_failures"] == []
    assert len(entries) == 4 * 3 * 2 + 4  # clients x tasks x rounds, then the DP fusion fit
    fit = entries[-4:]  # one Gaussian release on every client's users, in every ledger
    assert {e["client"] for e in fit} == {f"client-{i}" for i in range(4)}
    assert {(e["task"], e["mechanism"], e["sample_rate"], e["steps"]) for e in fit} == {
        ("fusion", "gaussian", 1.0, 1)
    }
    for client in {e["client"] for e in entries}:
        composed = [e["epsilon_composed"] for e in entries if e["client"] == client]
        assert composed == sorted(composed) and composed[0] < composed[-1]  # cumulative
        assert composed[-1] <= 4.0
    priv = summary["privacy"]
    assert priv["mode"] == "record" and 0 < priv["max_epsilon"] <= priv["budget_epsilon"] == 4.0
    # the released fused model is DP too: chosen by that release (a task alone or the average),
    # no content prior weighed by users' data; nothing released outside the ledger
    fusion = summary["fusion"]
    assert fusion["fitted_on"].startswith("DP: one Gaussian release of 4 candidates")
    weights = sorted(fusion["weights"].values())
    assert set(fusion["weights"]) == {"recall", "ranking", "personal"}
    assert weights in ([0.0, 0.0, 1.0], pytest.approx([1 / 3] * 3))
    assert json.loads((run.path / "fusion.json").read_text())["weights"] == fusion["weights"]
    assert priv["outside_ledger"] == [] and "fusion" in priv["per_client"]["client-0"]
    rows = [json.loads(x) for x in run.metrics.read_text().splitlines()]
    assert rows and all(r["train_loss"] is None for r in rows)  # no unnoised loss left a client
    audit = _cli("audit", str(run.path), "--final-only")  # recomputes every figure
    assert audit.returncode == 0, audit.stderr
    assert (run.path / "audit.json").exists() and (run.path / "epsilon.png").exists()
    # every line's sample rate, steps, clipping norm and delta are what the config and each
    # client's users call for (the fusion lines' too)
    claims = json.loads((run.path / "audit.json").read_text())["claims"]
    assert claims == {"checked": len(entries), "problems": []}
    # what the run fixed apart from its ledger: the budget (config.toml), the head (summary)
    from fedrec.cli import _run_commitments
    from fedrec.privacy import verify_chain

    budget, head, outside = _run_commitments(run.path)
    assert budget == 4.0 and outside == []
    assert head == priv["ledger_head"] == verify_chain(run.ledger, run_id=run.path.name).head_hash
    # the last round's lines removed: still a valid chain, but not the head the run ended at
    lines = run.ledger.read_text().splitlines()
    run.ledger.write_text("\n".join(lines[:-3]) + "\n")
    assert verify_chain(run.ledger, run_id=run.path.name).ok
    from fedrec.cli import main  # in this process from here on: the accountants' caches are warm

    assert main(["audit", str(run.path), "--final-only"]) == 1
    printed = capsys.readouterr()
    assert "removed from the end" in " ".join((printed.out + printed.err).split())  # rich wraps
    # a DP run told to fit its fusion on users' data: the audit says what the ledger misses
    # (here a run from before summary.json recorded it: the audit reads its config.toml)
    (run.path / "config.toml").write_text(replace(cfg, fusion_fit="server").to_toml())
    saved = json.loads(run.summary.read_text())
    del saved["privacy"]["outside_ledger"]
    run.summary.write_text(json.dumps(saved))
    main(["audit", str(run.path), "--final-only"])
    outside = json.loads((run.path / "audit.json").read_text())["outside_ledger"]
    assert len(outside) == 1 and "fusion_fit = server" in outside[0]
    assert "not covered by the ledger" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("side", ["server", "client"])
def test_user_level_dp_fedavg_is_accounted_by_flower_and_the_ledger(tmp_path, side):
    cfg = load_config(
        None,
        {
            "dataset": "synthetic:merchants=2,users=30,items=300",
            "partition": "user",
            "rounds": 2,
            "fraction_train": 0.3,
            "out": str(tmp_path / "run"),
            "privacy.mode": "user",
            "privacy.epsilon": 8.0,
            "privacy.delta": 1e-3,
            "privacy.clipping_side": side,
        },
    )
    run, summary = simulate(cfg, baselines=False)
    assert summary["rounds"] == 2  # with client-side clipping every client's mod clipped
    entries = read_ledger(run.ledger)
    assert [e["round"] for e in entries] == [1, 2]
    assert all(e["mechanism"] == "dp-fedavg" and e["sample_rate"] == 1.0 for e in entries)
    assert entries[0]["epsilon"] < entries[1]["epsilon"] <= 8.0
    assert summary["privacy"]["mode"] == "user"
    assert summary["fusion"]["method"] == "average"  # no per-client accountant to reserve in
    assert audit_ledger(run.ledger, run_id=run.path.name).ok
    from fedrec.cli import _claims_check  # each release's noise and clipping as configured

    assert _claims_check(run.path, read_ledger(run.ledger)) == {"checked": 2, "problems": []}


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"partition": "column:nope"}, "nope"),
        ({"dataset": "no-such-dataset"}, "no-such-dataset"),
    ],
)
def test_bad_input_fails_before_a_run_directory_exists(tmp_path, bad, match):
    from fedrec.data import DataError

    with pytest.raises(DataError, match=match):
        simulate(_cfg(tmp_path, **bad))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("workers", ["0", "two", "-1", "", "\u00b2"])
def test_a_bad_worker_count_fails_before_a_run_directory_exists(tmp_path, monkeypatch, workers):
    from fedrec.config import ConfigError
    from fedrec.simulation.run import SIM_WORKERS_ENV

    monkeypatch.setenv(SIM_WORKERS_ENV, workers)
    with pytest.raises(ConfigError, match=f"{SIM_WORKERS_ENV}=.*whole number"):
        simulate(_cfg(tmp_path))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_fusion_weights_can_be_chosen_by_the_clients(tmp_path):
    """fusion_fit = federated: clients return NDCG sums only; the server's choice is used."""
    cfg = _cfg(tmp_path, fusion_fit="federated", eval_full_ranking=False)
    run, summary = simulate(cfg, baselines=False)
    fusion = summary["fusion"]
    assert fusion["fitted_on"].startswith("federated:") and "of 4 clients" in fusion["fitted_on"]
    assert abs(sum(fusion["weights"].values()) - 1.0) < 1e-9
    saved = json.loads((run.path / "fusion.json").read_text())
    assert saved["weights"] == fusion["weights"]
    assert 0.0 <= summary["fused"]["hr@10"] <= 1.0


@pytest.mark.slow
def test_secure_aggregation_with_record_level_dp(tmp_path):
    """Flower's FedAvg over SecAgg on the real engine: 2 rounds, 4 clients, DP-SGD before
    masking; every client survives, the ledger audits, and the summary reports the protocol."""
    cfg = _cfg(
        tmp_path,
        secure_aggregation=True,
        eval_full_ranking=False,
        tasks=DP_TASKS,
        **{"privacy.mode": "record", "privacy.epsilon": 8.0, "privacy.delta": 1e-3},
    )
    run, summary = simulate(cfg, baselines=False)
    assert summary["rounds"] == 2 and not summary["stopped_early"]
    rounds = summary["secure_aggregation"]["rounds"]
    assert [rounds[r]["secagg.survivors"] for r in sorted(rounds)] == [4.0, 4.0]
    assert audit_ledger(run.ledger, run_id=run.path.name).ok
    assert summary["tasks"]["personal"]["hr@10"] > 0.0


def test_secure_aggregation_refuses_robust_aggregators(tmp_path):
    from fedrec.config import ConfigError

    with pytest.raises(ConfigError, match="robust aggregators"):
        _cfg(tmp_path, secure_aggregation=True, strategy="krum")


@pytest.mark.slow
def test_content_models_train_under_dp_and_serve_from_text(tmp_path):
    """``--text content``: the three content models train under record-level DP through the real
    engine; only their small weights travel, the ledger audits, and the saved models rebuild."""
    from fedrec.models import ContentModel

    cfg = _cfg(
        tmp_path,
        tasks=DP_TASKS,
        **{
            "text.mode": "content",
            "privacy.mode": "record",
            "privacy.epsilon": 8.0,
            "privacy.delta": 1e-3,
        },
    )
    run, summary = simulate(cfg, baselines=False)
    assert summary["client_failures"] == []
    for task in ("recall", "ranking", "personal"):
        model = load_model(run.models / task)
        assert isinstance(model, ContentModel) and model.task == task
        assert float(model.table.norm(dim=1).mean()) == pytest.approx(1.0, abs=1e-4)
        assert 0 < summary["tasks"][task]["hr@10"] <= 1
    assert {"hr@10", "ndcg@10"} <= set(summary["fused"])
    assert len(read_ledger(run.ledger)) == 4 * 3 * 2 + 4  # the last 4: the DP fusion fit
    assert audit_ledger(run.ledger, run_id=run.path.name).ok
