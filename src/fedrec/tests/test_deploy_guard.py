"""A partner site runs fedrec's own ClientApp, never code a run's app bundle ships (issue 5).

The bundles here are built by Flower's own ``flwr build`` code from real app folders.
"""

from __future__ import annotations

import io
import os
import subprocess
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import tomli_w
from flwr.cli.build import build_fab_from_disk

from fedrec.config import load_config
from fedrec.deploy import launch
from fedrec.deploy.client import Partner, guard_dir
from fedrec.deploy.guard import KINDS, check_fab, check_importable, write_shims


def _fab(tmp_path: Path, pyproject: dict, files: dict[str, str] | None = None) -> bytes:
    app = tmp_path / "app"
    app.mkdir(parents=True)
    (app / "pyproject.toml").write_text(tomli_w.dumps(pyproject))
    for name, text in (files or {}).items():
        (app / name).parent.mkdir(parents=True, exist_ok=True)
        (app / name).write_text(text)
    return build_fab_from_disk(app)


def _fedrecs() -> dict:
    return launch.app_pyproject(load_config(None, {"rounds": 2}))


def test_fedrecs_own_bundle_passes(tmp_path):
    content = _fab(tmp_path, _fedrecs())
    assert set(zipfile.ZipFile(io.BytesIO(content)).namelist()) == {
        "pyproject.toml", ".info/CONTENT"
    }
    assert check_fab(content) == ""


@pytest.mark.parametrize(
    ("change", "files", "problem"),
    [
        # code beside the real references: it would be first on sys.path and shadow fedrec
        (None, {"fedrec/client/app.py": "import os\napp = None\n"}, "files besides"),
        (None, {"evil.py": "app = None\n"}, "files besides"),
        ({"clientapp": "evil:app"}, {"evil.py": "app = None\n"}, "files besides"),
        ({"clientapp": "os:system"}, None, "names the apps"),  # no file, another module
        ({"serverapp": "fedrec.server.app:app"}, None, ""),  # unchanged: passes
    ],
)
def test_a_bundle_with_code_or_other_apps_is_refused(tmp_path, change, files, problem):
    pyproject = _fedrecs()
    pyproject["tool"]["flwr"]["app"]["components"].update(change or {})
    reason = check_fab(_fab(tmp_path, pyproject, files))
    assert (problem in reason and reason) if problem else reason == ""


def test_a_bundle_asking_for_dependencies_or_not_a_zip_is_refused(tmp_path):
    pyproject = _fedrecs()
    pyproject["project"]["dependencies"] = ["evil-package"]
    assert "dependencies" in check_fab(_fab(tmp_path, pyproject))
    assert "cannot be read" in check_fab(b"not a zip")
    only_manifest = io.BytesIO()
    with zipfile.ZipFile(only_manifest, "w") as z:
        z.writestr(".info/CONTENT", "")
    assert "no pyproject.toml" in check_fab(only_manifest.getvalue())


def test_the_supernode_finds_the_guard_before_flowers_task_processes(tmp_path):
    partner = Partner("127.0.0.1:9092", tmp_path / "d", None, None, 0, flwr_home=tmp_path / "h")
    shims = guard_dir(partner)
    assert shims.parent == tmp_path / "h" and shims.name.startswith("fedrec-guard-")
    env = launch.child_env(os.environ, flwr_home=partner.flwr_home, bins=launch.bin_dir(),
                           guard=shims)  # fmt: skip
    for name in KINDS.values():  # what Flower's SuperExec starts, resolved as it resolves it
        found = subprocess.run(["sh", "-c", f"command -v {name}"], env=env, capture_output=True,
                               text=True, check=True).stdout.strip()  # fmt: skip
        assert found == str(shims / name) and os.access(found, os.X_OK)
    # a shim runs the guard module in isolated mode, whatever the working folder holds
    (tmp_path / "fedrec").mkdir()
    (tmp_path / "fedrec" / "__init__.py").write_text("raise SystemExit('shadowed')\n")
    out = subprocess.run([str(shims / "flwr-clientapp"), "--help"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0 and "guard" in out.stdout, out.stderr[-500:]


def test_shims_are_rewritten_for_this_python(tmp_path):
    folder = write_shims(tmp_path / "g", python="/opt/my py/bin/python3")  # quoted for sh
    text = (folder / "flwr-agentapp").read_text()
    assert text.startswith("#!/bin/sh\n") and "'/opt/my py/bin/python3' -I -m fedrec.deploy.guard " \
        "agentapp" in text


def test_the_guard_covers_every_task_process_flower_starts():
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND

    assert set(KINDS.values()) == set(TASK_TYPE_TO_COMMAND.values())


class _Runtime:
    """Stands in for the SuperNode's Runtime API (a real one is in test_deploy_e2e.py): what the
    guard pulls, and what it pushes back."""

    def __init__(self, monkeypatch, message, fab: bytes, *, pull_fails=False,
                 push_fails: BaseException | None = None, heartbeat_died=False):
        import flwr.supercore.heartbeat as heartbeat
        import flwr.supernode.runtime.run_clientapp as rc
        from flwr.app import Context, RecordDict
        from flwr.supercore.runtime import RuntimeHttpClient

        self.replies, self.outputs = [], []
        context = Context(run_id=1, node_id=1, node_config={"partition-id": 0},
                          state=RecordDict(), run_config={})  # fmt: skip
        run_info = SimpleNamespace(run_id=7, fab_id="evil\nINFO forged line")

        def pull(_client):
            if pull_fails:
                raise ConnectionError("the SuperNode went away")
            return message, context, run_info, SimpleNamespace(content=fab)

        def push(_client, reply, _context):
            self.replies.append(reply)  # the SuperNode has stored it once the push began
            if push_fails is not None:
                raise push_fails

        monkeypatch.setattr(rc, "pull_task_input", pull)
        monkeypatch.setattr(rc, "push_message", push)
        monkeypatch.setattr(rc, "push_task_output", lambda **kw: self.outputs.append(kw))
        monkeypatch.setattr(RuntimeHttpClient, "from_server_address",
                            classmethod(lambda cls, **kw: SimpleNamespace(close=lambda: None)))
        def stop():  # as Flower's: a sender whose thread died (a 401 once stopped) raises
            if heartbeat_died:
                raise RuntimeError("Heartbeat sender is not running.")

        monkeypatch.setattr(heartbeat, "HeartbeatSender", lambda fn: SimpleNamespace(
            start=lambda: None, stop=stop, is_running=not heartbeat_died))


def _message(message_type: str):
    from flwr.app import Message, RecordDict

    return Message(RecordDict(), dst_node_id=1, message_type=message_type)


@pytest.fixture
def _task_identity(monkeypatch):
    import signal

    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):  # Message() outside a running app needs them
        monkeypatch.setattr(TaskIdentity, attr, 1)
    handler = signal.getsignal(signal.SIGTERM)
    yield
    assert signal.getsignal(signal.SIGTERM) is not handler  # the guard's: a stop is reported
    signal.signal(signal.SIGTERM, handler)  # this test process's own again


def _run(kind="clientapp") -> int:
    from fedrec.deploy.guard import run

    return run(kind, "127.0.0.1:1", "token", insecure=True, certificates=None, parent_pid=None)


@pytest.mark.usefixtures("_task_identity")
def test_the_guard_answers_every_task_it_pulls(monkeypatch, tmp_path, caplog):
    from flwr.common.constant import ErrorCode, SubStatus

    fedrecs = _fab(tmp_path / "a", _fedrecs())
    # fedrec's bundle, but a message fedrec's ClientApp has no function for: it raises, and the
    # guard answers with an error reply (without one the SuperNode would wait forever)
    runtime = _Runtime(monkeypatch, _message("query.other"), fedrecs)
    assert _run() == 1
    (reply,) = runtime.replies
    assert reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert runtime.outputs[-1]["sub_status"] == SubStatus.FAILED
    # a bundle of the run's own, or another kind of task: refused with INVALID_FAB
    evil = _fab(tmp_path / "b", _fedrecs(), {"evil.py": "app = None\n"})
    for kind, fab in (("clientapp", evil), ("agentapp", fedrecs)):
        runtime = _Runtime(monkeypatch, _message("train"), fab)
        assert _run(kind) == 1
        (reply,) = runtime.replies
        assert reply.error.code == ErrorCode.INVALID_FAB and runtime.outputs[-1]["details"]
    assert "'evil\\nINFO forged line'" in caplog.text  # the server's text, quoted in the log
    # nothing pulled: nothing to answer, the SuperNode is told the task failed
    runtime = _Runtime(monkeypatch, None, fedrecs, pull_fails=True)
    assert _run() == 1 and runtime.replies == []
    assert "ConnectionError" in runtime.outputs[-1]["details"]


@pytest.mark.usefixtures("_task_identity")
@pytest.mark.parametrize("failure", ["connection", "run stopped"])
def test_a_reply_whose_push_fails_is_not_followed_by_a_second(monkeypatch, tmp_path, failure):
    """The SuperNode sends one reply per message it pulled. A second reply to a stopped run's
    message (an error after the real reply's push failed) was sent in place of the next run's
    reply, which then never left the site: a resumed deployed run hung at guarded sites."""
    from flwr.app import Message, RecordDict
    from flwr.common.constant import SubStatus

    import fedrec.client.app

    # the ClientApp answers (its training is tested elsewhere); pushing its reply fails
    monkeypatch.setattr(fedrec.client.app, "app",
                        lambda message, context: Message(RecordDict(), reply_to=message))
    from flwr.supercore.run import RunNotRunningException  # a BaseException

    error = (ConnectionError("the SuperNode went away") if failure == "connection"
             else RunNotRunningException())  # fmt: skip
    runtime = _Runtime(monkeypatch, _message("train"), _fab(tmp_path, _fedrecs()),
                       push_fails=error)  # fmt: skip
    assert _run() == 1
    (reply,) = runtime.replies  # the app's reply, pushed once, and no error reply after it
    assert not reply.has_error()
    assert runtime.outputs[-1]["sub_status"] == SubStatus.FAILED
    assert type(error).__name__ in runtime.outputs[-1]["details"]


@pytest.mark.usefixtures("_task_identity")
@pytest.mark.parametrize("stop", [SystemExit(143), KeyboardInterrupt()])
def test_a_task_stopped_before_its_reply_answers_once(monkeypatch, tmp_path, stop):
    """SIGTERM (SystemExit) or SIGINT (KeyboardInterrupt) while the app trains: one error reply,
    else the SuperNode, which revokes the task's token when it ends, would wait for a reply
    forever. The heartbeat's thread had died too: clean-up goes on."""
    from flwr.common.constant import ErrorCode, SubStatus

    import fedrec.client.app

    def stopped(message, context):
        raise stop

    monkeypatch.setattr(fedrec.client.app, "app", stopped)
    runtime = _Runtime(monkeypatch, _message("train"), _fab(tmp_path, _fedrecs()),
                       heartbeat_died=True)  # fmt: skip
    with pytest.raises(type(stop)):
        _run()
    (reply,) = runtime.replies
    assert reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert f"stopped ({type(stop).__name__})" in reply.error.reason
    assert runtime.outputs[-1]["sub_status"] == SubStatus.FAILED


def test_a_deployed_site_ignores_a_ledger_path_the_server_names(tmp_path):
    from flwr.app import ConfigRecord, Context, RecordDict

    from fedrec.client.app import _ledger_path

    config = ConfigRecord({"ledger-path": str(tmp_path / ".bash_profile")})
    site = Context(run_id=1, node_id=1, node_config={"data-path": "d", "partition-id": 0},
                   state=RecordDict(), run_config={})  # fmt: skip
    assert _ledger_path(config, site) is None
    own = Context(run_id=1, node_id=1, node_config={"data-path": "d", "ledger-path": "mine"},
                  state=RecordDict(), run_config={})  # fmt: skip
    assert _ledger_path(config, own) == "mine"
    simulated = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(),
                        run_config={})  # fmt: skip
    assert _ledger_path(config, simulated) == str(tmp_path / ".bash_profile")


def test_a_python_that_cannot_import_fedrec_is_named_at_start(tmp_path):
    assert check_importable() == ""  # this environment's, in isolated mode
    bare = tmp_path / "python"
    bare.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'fedrec'\" >&2\nexit 1\n")
    bare.chmod(0o755)
    assert "No module named 'fedrec'" in check_importable(str(bare))


def test_a_site_is_guarded_unless_told_otherwise():
    from fedrec.cli import build_parser
    from fedrec.deploy.client import Partner

    argv = ["client", "start", "--data", "shop", "--superlink", "h:1", "--insecure"]
    assert build_parser().parse_args(argv).guard is True
    assert build_parser().parse_args([*argv, "--no-guard"]).guard is False
    assert Partner(superlink="h:1", data=Path("shop"), certs=None, name=None).guard is True
