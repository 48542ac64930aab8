"""Per-round checkpoints: written atomically, loadable, refused when they do not fit (issue 5)."""

import hashlib
import json
import random
import time

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp import GaussianPrivacyEvent

from fedrec.config import load_config
from fedrec.privacy import Ledger, LedgerEntry, read_ledger
from fedrec.privacy.state import ClientPrivacyState
from fedrec.rundir import create_run_dir
from fedrec.server.checkpoint import (
    CheckpointError,
    Progress,
    checkpoint_dir,
    direction_reference_change,
    ledger_position,
    lines_past,
    load_checkpoint,
    restore,
    save_checkpoint,
)
from fedrec.strategies import Observed, RoundLog, make_screen, make_strategy
from fedrec.strategies.state import StrategyStateError

KEYS = {"recall/emb": (5, 3), "ranking/w": (4,)}


def _cfg(tmp_path, **extra):
    return load_config(None, {"out": str(tmp_path / "run"), "rounds": 4, **extra})


def _arrays(seed):
    rng = np.random.default_rng(seed)
    return ArrayRecord({k: Array(rng.normal(size=s).astype(np.float32)) for k, s in KEYS.items()})


def _progress(rounds=2):
    p = Progress(round=rounds, seconds=3.5, eval_seconds=1.25)
    for r in range(1, rounds + 1):
        p.rows.append({"round": r, "task": "recall", "hr@10": 0.1 * r, "train_loss": None})
        p.rounds[r] = RoundLog(r, replies=3, failures=[(7, 4001, "budget")], rejected=[(9, "NaN")])
        p.rounds[r].metrics = {"recall.loss": 0.5 / r}
    return p


def _fedadam(cfg):
    strategy = Observed(make_strategy(cfg, 3))
    inner = strategy.inner
    inner.m_t = {k: np.full(s, 0.5, np.float32) for k, s in KEYS.items()}
    inner.v_t = {k: np.full(s, 0.25, np.float32) for k, s in KEYS.items()}
    return strategy


def test_checkpoint_round_trip_restores_models_strategy_rng_and_progress(tmp_path):
    cfg = _cfg(tmp_path, strategy="fedadam")
    run = create_run_dir(cfg)
    random.seed(5), np.random.seed(6), torch.manual_seed(7)
    np.random.normal()  # numpy now holds the second of a pair of Gaussians (user-level noise)
    save_checkpoint(run, cfg, _arrays(0), _fedadam(cfg), _progress())
    expected = (random.random(), np.random.normal(), np.random.rand(), torch.rand(1).item())
    random.seed(0), np.random.seed(0), torch.manual_seed(0)

    fresh = Observed(make_strategy(cfg, 3))
    ckpt = load_checkpoint(run, cfg)
    restore(ckpt, fresh)
    got = (random.random(), np.random.normal(), np.random.rand(), torch.rand(1).item())
    assert got == expected
    assert list(ckpt.arrays) == list(KEYS)
    for k in KEYS:
        np.testing.assert_array_equal(ckpt.arrays[k].numpy(), _arrays(0)[k].numpy())
        np.testing.assert_array_equal(fresh.inner.m_t[k], np.full(KEYS[k], 0.5, np.float32))
        np.testing.assert_array_equal(fresh.inner.v_t[k], np.full(KEYS[k], 0.25, np.float32))
    assert ckpt.progress == _progress()
    manifest = json.loads((checkpoint_dir(run) / "checkpoint.json").read_text())
    assert manifest["round"] == 2 and manifest["ledger"] == {"lines": 0, "head": ""}


def test_a_new_run_is_refused_where_an_unfinished_one_left_its_files(tmp_path):
    """A fresh run in a crashed run's directory would take over its ledger: its clients would
    rebuild their epsilon from the old lines, and the audit hold them to the new config."""
    cfg = _cfg(tmp_path, **{"privacy.mode": "record"})
    run = create_run_dir(cfg)
    with pytest.raises(FileExistsError, match="unfinished run .*INCOMPLETE.*--resume"):
        create_run_dir(cfg)
    run.incomplete_marker().unlink()
    run.ledger.write_text("")
    with pytest.raises(FileExistsError, match="privacy_ledger.jsonl"):
        create_run_dir(cfg)
    run.ledger.unlink()
    assert create_run_dir(cfg).path == run.path  # an emptied directory may be used again


def test_fedavgm_momentum_survives_a_checkpoint(tmp_path):
    cfg = _cfg(tmp_path, strategy="fedavgm", server_momentum=0.7)
    run = create_run_dir(cfg)
    strategy = Observed(make_strategy(cfg, 3))
    assert type(strategy.inner).__name__ == "FedAvgM" and strategy.inner.server_momentum == 0.7
    strategy.inner.current_arrays = _arrays(1)
    strategy.inner.momentum_vector = [np.full(s, 0.5, np.float32) for s in KEYS.values()]
    save_checkpoint(run, cfg, _arrays(0), strategy, _progress())
    fresh = Observed(make_strategy(cfg, 3))
    restore(load_checkpoint(run, cfg), fresh)
    for k in KEYS:
        np.testing.assert_array_equal(fresh.inner.current_arrays[k].numpy(), _arrays(1)[k].numpy())
    for got, s in zip(fresh.inner.momentum_vector, KEYS.values(), strict=True):
        np.testing.assert_array_equal(got, np.full(s, 0.5, np.float32))


def test_the_global_models_last_step_survives_a_checkpoint(tmp_path, monkeypatch):
    """Reflection asks the global model's last step (strategies/screen.py): the model the
    checkpointed round was sent is saved, so the first round after a resume has the same last
    step as in an uninterrupted run; a checkpoint without it (an earlier fedrec) gives none."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):  # Message() outside a running app
        monkeypatch.setattr(TaskIdentity, attr, 1)
    cfg = _cfg(tmp_path)  # direction_outliers = "reflect", the default
    run = create_run_dir(cfg)

    def observed():
        return Observed(make_strategy(cfg, 3), screen=make_screen(cfg))

    strategy = observed()
    assert strategy._last_step is None and strategy.sent_arrays is None
    strategy.configure_train(2, _arrays(1), ConfigRecord(), _Grid([1, 2, 3], late=()))  # round 2 sent _arrays(1)
    save_checkpoint(run, cfg, _arrays(2), strategy, _progress())  # after it, _arrays(2)
    fresh = observed()
    restore(load_checkpoint(run, cfg), fresh)
    fresh.configure_train(3, _arrays(2), ConfigRecord(), _Grid([1, 2, 3], late=()))
    strategy.configure_train(3, _arrays(2), ConfigRecord(), _Grid([1, 2, 3], late=()))
    for k in KEYS:
        expected = _arrays(2)[k].numpy().astype(np.float64) - _arrays(1)[k].numpy()
        np.testing.assert_array_equal(fresh._last_step[k], expected)
        np.testing.assert_array_equal(strategy._last_step[k], expected)
    older = observed()
    ckpt = load_checkpoint(run, cfg)
    ckpt.strategy_meta["attrs"].pop("0|sent_arrays")
    restore(ckpt, older)
    older.configure_train(3, _arrays(2), ConfigRecord(), _Grid([1, 2, 3], late=()))
    assert older._last_step is None
    # where nothing is reflected the sent model is not kept
    plain = _cfg(tmp_path / "reject", direction_outliers="reject")
    rejecting = Observed(make_strategy(plain, 3), screen=make_screen(plain))
    rejecting.configure_train(2, _arrays(1), ConfigRecord(), _Grid([1, 2, 3], late=()))
    rejecting.configure_train(3, _arrays(2), ConfigRecord(), _Grid([1, 2, 3], late=()))
    assert rejecting.sent_arrays is None and rejecting._last_step is None


def test_each_round_replaces_the_last_checkpoint_and_leaves_no_stray_files(tmp_path):
    cfg = _cfg(tmp_path)
    run = create_run_dir(cfg)
    strategy = Observed(make_strategy(cfg, 3))
    for r in (1, 2, 3):
        save_checkpoint(run, cfg, _arrays(r), strategy, _progress(r))
    names = sorted(p.name for p in checkpoint_dir(run).iterdir())
    assert names == ["checkpoint.json", "models-r0003.safetensors", "server-r0003.safetensors"]
    ckpt = load_checkpoint(run, cfg)
    assert ckpt.progress.round == 3
    np.testing.assert_array_equal(ckpt.arrays["ranking/w"].numpy(), _arrays(3)["ranking/w"].numpy())


def test_a_checkpoint_of_another_direction_reference_resumes_with_a_warning(tmp_path):
    """The screen's direction reference is no config setting (it is not in the config hash): a
    run checkpointed by a fedrec that did not record it resumes, and the resume says so."""

    def changes(cfg, path=None):
        run = create_run_dir(cfg, path)
        save_checkpoint(run, cfg, _arrays(0), Observed(make_strategy(cfg, 3)), _progress())
        manifest_path = checkpoint_dir(run) / "checkpoint.json"
        manifest = json.loads(manifest_path.read_text())
        assert manifest["direction_reference"] == "others-median"
        found = [direction_reference_change(load_checkpoint(run, cfg), cfg)]
        del manifest["direction_reference"]  # as an earlier fedrec wrote it
        manifest_path.write_text(json.dumps(manifest))
        ckpt = load_checkpoint(run, cfg)
        assert ckpt.progress.round == 2  # it still resumes
        return [*found, direction_reference_change(ckpt, cfg)]

    current, earlier = changes(_cfg(tmp_path, direction_outliers="reject"))
    assert current is None
    assert "unrecorded" in earlier and "'others-median'" in earlier
    assert "last step" not in earlier  # nothing is reflected in this run
    # the rule off, or off for the run (under DP, under secure aggregation): nothing differs
    for i, extra in enumerate(({"reject_min_cosine": -1.0}, {"privacy.mode": "record"},
                               {"secure_aggregation": True})):  # fmt: skip
        assert changes(_cfg(tmp_path, **extra), tmp_path / f"off{i}") == [None, None]


def test_a_checkpoint_of_a_fedrec_that_rejected_by_default_resumes_with_a_warning(tmp_path):
    """direction_outliers became "reflect" by default (and reflection began asking the global
    model's last step). A run begun under the old default wrote no direction_outliers, which now
    reads as "reflect": it resumes under the same config hash, and the resume says that the
    rounds left reflect; a run that had set "reflect" (written then, omitted now) resumes too."""
    for name, extra in [("default", {}), ("explicit", {"direction_outliers": "reflect"})]:
        cfg = _cfg(tmp_path, **extra)
        run = create_run_dir(cfg, tmp_path / name)
        save_checkpoint(run, cfg, _arrays(0), Observed(make_strategy(cfg, 3)), _progress())
        path = checkpoint_dir(run) / "checkpoint.json"
        manifest = json.loads(path.read_text())
        assert manifest["reflect_rule"] == "last-step"
        assert direction_reference_change(load_checkpoint(run, cfg), cfg) is None
        del manifest["reflect_rule"]  # as an earlier fedrec wrote it, with its config hash
        old = cfg.to_dict()
        if name == "explicit":
            old["direction_outliers"] = "reflect"
        manifest["config_sha256"] = hashlib.sha256(
            json.dumps(old, sort_keys=True).encode()
        ).hexdigest()
        path.write_text(json.dumps(manifest))
        ckpt = load_checkpoint(run, cfg)
        assert ckpt.progress.round == 2  # it resumes
        change = direction_reference_change(ckpt, cfg)
        assert "direction_outliers = 'reject'" in change and "last step" in change
    # another config is still refused, legacy hash or not
    with pytest.raises(CheckpointError, match="another config"):
        load_checkpoint(run, _cfg(tmp_path, seed=9))
    # a checkpoint of this fedrec (it records the reflect rule) is held to this fedrec's hash:
    # its run's config.toml edited from the default to "reject" (whose legacy hash is the
    # default's) is refused, not resumed rejecting
    cfg = _cfg(tmp_path)
    run = create_run_dir(cfg, tmp_path / "now")
    save_checkpoint(run, cfg, _arrays(0), Observed(make_strategy(cfg, 3)), _progress())
    with pytest.raises(CheckpointError, match="another config"):
        load_checkpoint(run, _cfg(tmp_path, direction_outliers="reject"))


def test_damaged_or_foreign_checkpoints_are_refused(tmp_path):
    cfg = _cfg(tmp_path)
    run = create_run_dir(cfg)
    assert load_checkpoint(run, cfg) is None
    save_checkpoint(run, cfg, _arrays(0), Observed(make_strategy(cfg, 3)), _progress())
    with pytest.raises(CheckpointError, match="another config"):
        load_checkpoint(run, _cfg(tmp_path, seed=9))
    with pytest.raises(StrategyStateError, match="not of"):
        restore(load_checkpoint(run, cfg), make_strategy(cfg, 3))  # not wrapped in Observed
    models = next(checkpoint_dir(run).glob("models-*"))
    models.write_bytes(models.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(run, cfg)


def test_user_level_dp_accountant_state_survives_a_checkpoint(tmp_path):
    cfg = _cfg(tmp_path, **{"privacy.mode": "user", "partition": "user"})
    run = create_run_dir(cfg)
    strategy = Observed(make_strategy(cfg, 30))
    acct = strategy.inner.accountant
    event = GaussianPrivacyEvent(
        noise_multiplier=strategy.inner.noise_multiplier,
        sample_size=strategy.inner.num_sampled_clients,
        population_size=30,
    )
    acct.compose(event, count=2)
    save_checkpoint(run, cfg, _arrays(0), strategy, _progress())
    fresh = Observed(make_strategy(cfg, 30))
    restore(load_checkpoint(run, cfg), fresh)
    assert fresh.inner.accountant.num_releases == 2
    assert fresh.inner.accountant.get_epsilon(1e-3) == pytest.approx(acct.get_epsilon(1e-3))


def _append(ledger, client, rnd):
    state = ClientPrivacyState(accountant="rdp")
    state.record("recall", noise_multiplier=1.0, sample_rate=0.1, steps=10)
    ledger.append(
        LedgerEntry.from_state(
            state, client=client, task="recall", round=rnd, clipping_norm=1.0, delta=1e-3,
            budget_epsilon=8.0,
        )
    )  # fmt: skip


def test_the_ledger_must_extend_the_checkpointed_position(tmp_path):
    path = tmp_path / "run-x" / "privacy_ledger.jsonl"
    ledger = Ledger(path, "run-x")
    for rnd in (1, 2):
        _append(ledger, "client-0", rnd)
    saved = ledger_position(path)
    assert saved.lines == 2 and lines_past(path, "run-x", saved) == 0
    _append(ledger, "client-0", 3)  # a release made after the checkpoint: kept and counted
    assert lines_past(path, "run-x", saved) == 1
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:1]))
    with pytest.raises(CheckpointError, match="truncated"):
        lines_past(path, "run-x", saved)
    path.write_bytes(b"".join([lines[0], lines[1].replace(b'"steps":10', b'"steps":11')]))
    with pytest.raises(CheckpointError, match="rewritten"):
        lines_past(path, "run-x", saved)
    assert len(read_ledger(path)) == 2


class _Grid:
    """A grid whose stragglers never answer within the round's timeout."""

    def __init__(self, nodes, late):
        self.nodes, self.late, self.timeouts = nodes, late, []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Message, MetricRecord, RecordDict

        self.timeouts.append(timeout)
        replies = []
        for msg in messages:
            if msg.metadata.dst_node_id in self.late:
                continue
            arrays = ArrayRecord(
                {k: Array(v.numpy() + 1.0) for k, v in msg.content["arrays"].items()}
            )
            metrics = MetricRecord({"num-examples": 1})
            replies.append(
                Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)
            )
        return replies


def test_a_round_with_too_few_nodes_connected_stops_instead_of_waiting_for_ever(
    tmp_path, monkeypatch
):
    """Flower's sampling waits for min_available_nodes with no timeout: a deployment whose
    sites died would never write its summary. The round waits round_timeout, then stops."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedrec.server.rounds import TooFewClients, run_rounds

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)
    cfg = _cfg(tmp_path, min_train_clients=3)
    strategy = Observed(make_strategy(cfg, 5))  # min_available_nodes = 3
    grid = _Grid(nodes=[11, 12], late=set())
    started = time.monotonic()
    with pytest.raises(TooFewClients, match="round 2: only 2 client.* at least 3"):
        run_rounds(strategy, grid, _arrays(0), rounds=range(2, 4), timeout=0.5,
                   train_config=ConfigRecord(), after_round=lambda r, a: None, min_nodes=3)
    assert time.monotonic() - started < 5 and grid.timeouts == []


def test_rounds_go_on_with_the_clients_that_answered_in_time(tmp_path, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    from fedrec.server.rounds import run_rounds, wait_for_nodes

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)
    cfg = _cfg(tmp_path, round_timeout=7.5, min_train_clients=2)
    strategy = Observed(make_strategy(cfg, 5))
    grid = _Grid(nodes=[11, 12, 13, 14, 15], late={12, 14})
    assert wait_for_nodes(grid, 5, timeout=1.0) == 5
    done = []
    final = run_rounds(
        strategy, grid, _arrays(0), rounds=range(3, 5), timeout=cfg.round_timeout,
        train_config=ConfigRecord(), after_round=lambda r, a: done.append(r),
    )  # fmt: skip
    assert done == [3, 4] and grid.timeouts == [7.5, 7.5]
    assert [strategy.rounds[r].replies for r in (3, 4)] == [3, 3]
    np.testing.assert_allclose(final["ranking/w"].numpy(), _arrays(0)["ranking/w"].numpy() + 2)
    assert wait_for_nodes(_Grid([1], set()), 2, timeout=0.3) == 1  # gives up, goes on


def test_a_resume_under_distributed_noise_skips_the_rounds_begun_past_the_checkpoint(tmp_path):
    """started.json says round 3 began; the checkpoint is after round 1. Under secure
    aggregation (with distributed noise, with local noise, without DP) rounds 2 and 3 are
    skipped (any client may have sent its update into a sum) and the skip is checkpointed at
    once, so a second crash cannot lose it; without secure aggregation nothing is skipped."""
    from fedrec.server.checkpoint import mark_round_started
    from fedrec.server.resume import resume_state

    local = _cfg(tmp_path / "local", **{"privacy.mode": "record"})
    run = create_run_dir(local)
    save_checkpoint(run, local, _arrays(1), Observed(make_strategy(local, 3)), _progress(1))
    mark_round_started(run, 3)
    _, progress = resume_state(run, local, Observed(make_strategy(local, 3)), None, _arrays(0))
    assert progress.round == 1 and "skipped_rounds" not in progress.resumes[-1]
    for name, over in [("local-secagg", {"privacy.mode": "record"}), ("plain-secagg", {})]:
        masked = _cfg(tmp_path / name, secure_aggregation=True, **over)
        run = create_run_dir(masked)
        save_checkpoint(run, masked, _arrays(1), Observed(make_strategy(masked, 3)), _progress(1))
        mark_round_started(run, 3)
        _, progress = resume_state(run, masked, Observed(make_strategy(masked, 3)), None,
                                   _arrays(0))
        assert progress.round == 3 and progress.resumes[-1]["skipped_rounds"] == [2, 3], name

    distributed = _cfg(tmp_path, strategy="fedadam", secure_aggregation=True,
                       **{"privacy.mode": "record", "privacy.noise": "distributed"})  # fmt: skip
    run = create_run_dir(distributed)
    save_checkpoint(run, distributed, _arrays(1), _fedadam(distributed), _progress(1))
    mark_round_started(run, 3)
    arrays, progress = resume_state(
        run, distributed, Observed(make_strategy(distributed, 3)), None, _arrays(0)
    )
    assert progress.round == 3 and progress.resumes[-1]["skipped_rounds"] == [2, 3]
    np.testing.assert_array_equal(arrays["recall/emb"].numpy(), _arrays(1)["recall/emb"].numpy())
    kept = load_checkpoint(run, distributed)  # the skip is on disk before any round runs
    assert kept.progress.round == 3 and kept.progress.resumes == progress.resumes
    _, again = resume_state(
        run, distributed, Observed(make_strategy(distributed, 3)), None, _arrays(0)
    )  # started.json (3) is not past the new checkpoint: nothing more to skip
    assert again.round == 3 and "skipped_rounds" not in again.resumes[-1]
