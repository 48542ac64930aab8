"""``fedrec server resume RUN_DIR`` (issue 5): a killed deployed run continues, nothing released twice.

The fast tests check the command line, the app bundle that tells the ServerApp to resume, the
run-directory lock, and every refusal (one line, exit code 2, before anything starts). The slow
test runs a real SuperLink with TLS and three real SuperNodes with their own ledgers under
record-level DP, kills the ServerApp once round 1 is checkpointed, and resumes the run through
the CLI.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from fedrec.config import load_config
from fedrec.deploy import launch
from fedrec.rundir import RunDir, create_run_dir, finish
from fedrec.server.checkpoint import CheckpointError, Progress, save_checkpoint
from fedrec.server.resume import HOLDER, hold_run, run_holder


def _fedrec(capsys, *argv: str) -> tuple[int, str]:
    from fedrec.cli import main

    code = main(list(argv))
    return code, " ".join(capsys.readouterr().err.split())


def _checkpointed_run(tmp_path: Path, rounds: int = 3, released: int = 0) -> RunDir:
    """An unfinished run with a real checkpoint after round 1 (what a killed run leaves), its
    ledger holding ``released`` entries."""
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from fedrec.privacy import Ledger, LedgerEntry
    from fedrec.privacy.state import ClientPrivacyState
    from fedrec.strategies import Observed, make_strategy

    cfg = load_config(None, {"out": str(tmp_path / "run"), "rounds": rounds})
    run = create_run_dir(cfg)
    state = ClientPrivacyState(accountant="rdp")
    for _ in range(released):
        state.record("recall", noise_multiplier=1.0, sample_rate=0.1, steps=5)
        entry = LedgerEntry.from_state(
            state,
            client="client-0",
            task="recall",
            round=1,
            clipping_norm=1.0,
            delta=1e-5,
            budget_epsilon=8.0,
        )
        Ledger(run.ledger, run.path.name).append(entry)
    arrays = ArrayRecord({"recall/w": Array(np.zeros(4, np.float32))})
    save_checkpoint(run, cfg, arrays, Observed(make_strategy(cfg, 3)), Progress(round=1))
    return run


# --- the command line -----------------------------------------------------------------------


def test_resume_takes_a_run_dir_and_the_site_flags_of_server_run():
    from fedrec.cli import build_parser
    from fedrec.deploy.cli import cmd_server_resume

    args = build_parser().parse_args(
        ["server", "resume", "runs/x", "--insecure", "--address", "10.0.0.1:9", "--detach"]
    )
    assert args.func is cmd_server_resume and args.run_dir == "runs/x"
    assert args.insecure and args.address == "10.0.0.1:9" and args.detach
    args = build_parser().parse_args(["server", "resume", "r", "--certs", "c", "--timeout", "5"])
    assert args.certs == "c" and args.timeout == 5.0 and args.address == launch.DEFAULT_ADDRESS
    assert args.flwr_home is None and not args.detach


@pytest.mark.parametrize("extra", [["--rounds", "5"], ["--config", "x.toml"], []])
def test_resume_refuses_config_flags_and_needs_a_run_dir(extra):
    from fedrec.cli import build_parser

    argv = ["server", "resume", *(["r"] if extra else []), "--insecure", *extra]
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2  # the run keeps its own config.toml


def test_the_app_bundle_tells_the_serverapp_which_run_to_resume(tmp_path):
    import tomli_w
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.config import flatten_dict, get_fab_config

    from fedrec.server.app import RESUME_KEY, config_from_run_config

    assert launch.RESUME_KEY == RESUME_KEY
    cfg = load_config(None, {"dataset": "/srv/eval", "rounds": 3})
    for resume, expected in ((tmp_path / "run", str(tmp_path / "run")), (None, "")):
        app = tmp_path / f"app-{expected != ''}" / launch.APP_NAME
        app.mkdir(parents=True)
        (app / "pyproject.toml").write_text(tomli_w.dumps(launch.app_pyproject(cfg, resume=resume)))
        run_config = flatten_dict(
            get_fab_config(build_fab_from_disk(app))["tool"]["flwr"]["app"]["config"]
        )
        assert run_config[RESUME_KEY] == expected and config_from_run_config(run_config) == cfg


def test_per_field_run_configs_ignore_the_resume_key():
    from fedrec.server.app import RESUME_KEY, config_from_run_config

    cfg = config_from_run_config({"num-server-rounds": 2, "seed": 3, RESUME_KEY: ""})
    assert cfg.rounds == 2 and cfg.seed == 3


# --- refusals: one line, exit code 2, nothing started -----------------------------------------


def test_refuses_a_folder_that_is_not_a_run(capsys, tmp_path):
    code, err = _fedrec(capsys, "server", "resume", str(tmp_path / "none"), "--insecure")
    assert code == 2 and "no such run directory" in err and "Traceback" not in err
    code, err = _fedrec(capsys, "server", "resume", str(tmp_path), "--insecure")
    assert code == 2 and "no config.toml; not a fedrec run directory" in err


def test_refuses_a_finished_run(capsys, tmp_path):
    run = _checkpointed_run(tmp_path)
    finish(run, {"rounds": 3})
    code, err = _fedrec(capsys, "server", "resume", str(run.path), "--insecure")
    assert code == 2 and "has finished (summary.json); nothing to resume" in err


def test_refuses_a_run_without_its_incomplete_marker(capsys, tmp_path):
    run = _checkpointed_run(tmp_path)
    run.incomplete_marker().unlink()
    code, err = _fedrec(capsys, "server", "resume", str(run.path), "--insecure")
    assert code == 2 and "not an unfinished fedrec run" in err


def test_refuses_a_config_toml_that_differs_from_the_checkpoints(capsys, tmp_path):
    run = _checkpointed_run(tmp_path, rounds=3)
    run.config.write_text(run.config.read_text().replace("rounds = 3", "rounds = 9"))
    code, err = _fedrec(capsys, "server", "resume", str(run.path), "--insecure")
    assert code == 2 and "written under another config" in err


def test_the_operator_is_told_what_the_rounds_left_do_differently(tmp_path):
    """A run checkpointed while direction_outliers defaulted to "reject" resumes reflecting:
    ``fedrec server resume`` says so before it starts (the ServerApp's own warning goes to the
    SuperLink's log); a checkpoint of this fedrec has nothing to say."""
    from fedrec.deploy.resume import resumable_run

    run = _checkpointed_run(tmp_path)
    assert resumable_run(run.path).notice is None
    manifest_path = run.path / "checkpoint" / "checkpoint.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["reflect_rule"]  # as the fedrec before it wrote it (same config hash here)
    manifest_path.write_text(json.dumps(manifest))
    notice = resumable_run(run.path).notice
    assert "direction_outliers = 'reject'" in notice and 'set direction_outliers = "reject"' \
        in notice


def test_refuses_an_unreadable_config(capsys, tmp_path):
    run = _checkpointed_run(tmp_path)
    run.config.write_text("rounds = [")
    code, err = _fedrec(capsys, "server", "resume", str(run.path), "--insecure")
    assert code == 2 and "config.toml" in err and "Traceback" not in err


def test_refuses_a_truncated_ledger(capsys, tmp_path):
    run = _checkpointed_run(tmp_path, released=2)
    lines = run.ledger.read_bytes().splitlines(keepends=True)
    run.ledger.write_bytes(lines[0])
    code, err = _fedrec(capsys, "server", "resume", str(run.path), "--insecure")
    assert code == 2 and "the ledger was truncated" in err


def test_refuses_while_a_serverapp_still_writes_the_run(capsys, tmp_path, monkeypatch):
    import fedrec.deploy.resume as resume

    monkeypatch.setattr(resume, "RELEASE_WAIT_S", 0.5)
    run = _checkpointed_run(tmp_path)
    home = tmp_path / "flwr-home"
    port = _closed_port()
    with hold_run(run, flower_run_id=41):
        code, err = _fedrec(
            capsys,
            "server",
            "resume",
            str(run.path),
            "--insecure",
            "--flwr-home",
            str(home),
            "--address",
            f"127.0.0.1:{port}",
        )
    assert code == 2 and "ServerApp of Flower run 41" in err and "flwr stop 41 fedrec" in err


# --- the run directory's holder ---------------------------------------------------------------


def test_one_serverapp_at_a_time_holds_a_run_and_names_its_flower_run(tmp_path):
    run = _checkpointed_run(tmp_path)
    assert run_holder(run) is None
    with hold_run(run, flower_run_id=7):
        holder = run_holder(run)
        assert holder == {"flower_run_id": 7, "pid": os.getpid(), "alive": True}
        with pytest.raises(CheckpointError, match="another ServerApp is writing"), hold_run(run, 8):
            pass
    assert run_holder(run) == {"flower_run_id": 7, "pid": os.getpid(), "alive": False}
    with hold_run(run, flower_run_id=8):
        assert run_holder(run)["flower_run_id"] == 8
    assert (run.path / HOLDER).is_file()


def test_a_dead_serverapp_frees_the_run(tmp_path):
    """flock dies with its process: a killed ServerApp never blocks the resume."""
    import sys

    run = _checkpointed_run(tmp_path)
    code = (
        "import sys, time; from pathlib import Path; from fedrec.rundir import RunDir; "
        "from fedrec.server.resume import hold_run\n"
        f"with hold_run(RunDir(Path({str(run.path)!r})), 5):\n"
        "    print('held', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        assert run_holder(run)["alive"] is True
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert run_holder(run) == {"flower_run_id": 5, "pid": proc.pid, "alive": False}


def test_the_serverapp_refuses_a_missing_run_directory(tmp_path):
    with (
        pytest.raises(CheckpointError, match="no such run directory"),
        hold_run(RunDir(tmp_path / "gone"), 1),
    ):
        pass
    assert not (tmp_path / "gone").exists()


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- a real SuperLink and SuperNodes on 127.0.0.1 (slow) --------------------------------------


@pytest.mark.slow
def test_a_deployed_run_killed_after_round_1_resumes_and_releases_nothing_twice(tmp_path, capsys):
    from fedrec.deploy.client import start_supernode
    from fedrec.deploy.partners import set_users
    from fedrec.deploy.server import run_status, stop_run, submit_run
    from fedrec.privacy import read_ledger, verify_chain
    from fedrec.tests.test_deploy_e2e import Federation

    fed = Federation(tmp_path)
    try:
        fed.setup()
        # the platform registered 1 user for acme: both ServerApps (the killed one and the
        # resumed one, started by 'fedrec server resume') cap acme's FedAvg weight at it, found
        # through the key the SuperLink authenticated (fedrec.deploy.registry)
        set_users(fed.certs.path, "acme", 1)
        acme = int(fed.registered["acme"])
        names = ("acme", "globex", "initech")
        ledgers = {n: tmp_path / f"site-{n}" / "ledger" / "privacy_ledger.jsonl" for n in names}
        for i, name in enumerate(names):
            ledgers[name].parent.mkdir(parents=True)
            # guarded (the default): a stopped run's late reply must not take the resumed run's
            # place at the SuperNode (fedrec.deploy.guard, run)
            partner = replace(fed.partner(name, i), ledger=ledgers[name])
            fed.children.append(start_supernode(partner, echo=False))
        out = tmp_path / "run"
        cfg = load_config(
            None,
            {
                "dataset": str(fed.data),
                "partition": "site",
                "rounds": 3,
                "out": str(out),
                "tasks": {"recall": {"dim": 8, "local_epochs": 1}},
                "privacy.mode": "record",
                "privacy.epsilon": 8.0,
            },
        )
        first = submit_run(fed.site, cfg)
        _wait_for_checkpoint(out, 1, timeout=300)
        # the server dies in round 2 (or 3 on a fast machine: the kill only has to come before
        # the run's end, which a whole round's work leaves time for)
        _kill_serverapp(fed.children[0].proc.pid)
        killed = time.monotonic()
        after = json.loads((out / "checkpoint" / "checkpoint.json").read_text())["round"]
        assert after in (1, 2) and not (out / "summary.json").exists(), "the run ended first"
        site_flags = ["--certs", str(fed.certs.path), "--address", fed.site.local]
        site_flags += ["--flwr-home", str(fed.site.flwr_home)]
        code, err = _fedrec(capsys, "server", "resume", str(out), *site_flags)
        # not two servers; Flower reports the killed ServerApp's run as running until its
        # heartbeat lapses, at least 37.5 s after the kill
        late = f"{err} ({time.monotonic() - killed:.0f} s after the kill)"
        assert code == 2 and f"Flower run {first} is still running" in err, late
        stop_run(fed.site, first)  # as the refusal says: the SuperLink drops the round's messages
        assert (run_status(fed.site, first) or "").startswith("finished")
        _wait_until_idle([c.proc.pid for c in fed.children[1:]], timeout=300)  # loaded machines

        code, err = _fedrec(capsys, "server", "resume", str(out), *site_flags, "--timeout", "300")
        assert code == 0, err
        assert f"resumes {out} after round {after} of 3 (was Flower run {first})" in err
    finally:
        fed.close()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["resumes"][0]["after_round"] == after
    assert not (out / "INCOMPLETE").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["task"]) for r in rows] == [(k, "recall") for k in (1, 2, 3)]
    assert json.loads((out / HOLDER).read_text())["flower_run_id"] != first
    assert summary["registered_users"] == {str(acme): 1}
    lowered = {(e["round"], e["node"]) for e in summary.get("rescaled_updates", [])
               if "lowered to 1 (the users registered for it)" in e["reason"]}  # fmt: skip
    assert {(k, acme) for k in range(after + 1, 4)} <= lowered, summary.get("rescaled_updates")
    assert {node for _, node in lowered} == {acme}
    for i, name in enumerate(names):
        assert verify_chain(ledgers[name], run_id=out.name).ok  # fedrec's run id, not Flower's
        releases = Counter((e["client"], e["task"], e["round"]) for e in read_ledger(ledgers[name]))
        # each round's release once, and the DP fusion fit's (made by the resumed ServerApp)
        assert releases == {
            **{(f"client-{i}", "recall", k): 1 for k in (1, 2, 3)}, (f"client-{i}", "fusion", 3): 1
        }
    assert summary["fusion"]["fitted_on"].startswith("DP: each of 3 sites released")


def _wait_for_checkpoint(out: Path, round_: int, *, timeout: float) -> None:
    manifest = out / "checkpoint" / "checkpoint.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if json.loads(manifest.read_text())["round"] >= round_:
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.25)
    raise AssertionError(f"no checkpoint of round {round_} within {timeout} s")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _kill_serverapp(superlink_pid: int) -> None:
    from fedrec.deploy.process import descendants

    apps = [p for p in descendants(superlink_pid) if "flwr-serverapp" in _cmdline(p)]
    assert apps, "no ServerApp process under the SuperLink"
    for pid in apps:
        os.kill(pid, signal.SIGKILL)


def _cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of a process (None once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_until_idle(supernode_pids: list[int], *, timeout: float) -> None:
    """Until no ClientApp of the stopped run still works (trains, writes its ledger).

    A ClientApp whose run was stopped may linger after its work, retrying to push its reply
    to the SuperNode (Flower's HTTP retry), sometimes for minutes: such a process uses no CPU.
    So a ClientApp counts as working while its CPU time still grows over a 2 s window."""
    from fedrec.deploy.process import descendants

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        apps = [  # Flower's ClientApp, or fedrec's guard running one (fedrec.deploy.guard)
            p for s in supernode_pids for p in descendants(s)
            if "flwr-clientapp" in (cmd := _cmdline(p)) or "fedrec.deploy.guard" in cmd
        ]
        before = {p: _cpu_seconds(p) for p in apps}
        time.sleep(2.0)
        working = [p for p in apps if _cpu_seconds(p) not in (None, before[p])]
        if not working:
            return
    raise AssertionError(f"ClientApps {working} still working after {timeout} s")
