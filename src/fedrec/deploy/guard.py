"""A partner site runs fedrec's own ClientApp, never code a run ships.

A Flower app bundle (FAB) may carry Python files, and Flower 1.42's ``flwr-clientapp`` unzips a
run's FAB, puts it first on ``sys.path`` and imports the module its ``pyproject.toml`` names
(``flwr/supernode/runtime/run_clientapp.py``; ``flwr/supercore/object_ref.py`` load_app). So
whoever controls the SuperLink could make every site run code that reads the site's data (its
path is in the node config). Flower's own answer, ``flower-supernode --trusted-entities``,
verifies signatures that only Flower Hub attaches to a FAB: with a local ``flwr run`` the FAB
carries none and the SuperNode refuses every run (``start_client_internal.py``), so it cannot be
used offline.

``fedrec client start`` (unless ``--no-guard``) therefore puts this module in front of Flower's
task processes: the SuperNode's SuperExec starts its task processes by name (``flwr-clientapp``,
``flwr-agentapp``, ...: ``flwr/supercore/constant.py`` TASK_TYPE_TO_COMMAND), and the
SuperNode is given a ``PATH`` whose first folder holds scripts of those names that run
``python -I -m fedrec.deploy.guard KIND`` (``-I``: nothing from the working folder or the
environment on ``sys.path``). The guard pulls the task like ``flwr-clientapp`` (Flower's own
``pull_task_input``, ``push_message`` and ``push_task_output``, with its task heartbeat) and

- refuses, with an error reply the server records, any task that is not a ClientApp, and any
  FAB that is not fedrec's: exactly one file, ``pyproject.toml`` (beside Flower's
  ``.info/CONTENT`` manifest), naming ``fedrec.server.app:app`` and ``fedrec.client.app:app``
  and no dependencies (``check_fab``);
- otherwise runs the ClientApp of the fedrec installed at the site, imported as any package,
  never from the FAB, which it does not unzip.

A run's config still comes from the server; what a site refuses whatever it says is in
``fedrec.client.app`` (``_site_refusal``) and docs/partner-site.md.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Callable
from pathlib import Path

APP_COMPONENTS = {"serverapp": "fedrec.server.app:app", "clientapp": "fedrec.client.app:app"}
MANIFEST = ".info/CONTENT"  # Flower's list of the FAB's files and their hashes
CLIENT_KIND = "clientapp"
MAX_PYPROJECT_BYTES = 1 << 20  # fedrec's is a few kB (its config inline); nothing to inflate
# the task processes a SuperNode's SuperExec may start, by the name it starts them with
KINDS = {
    "clientapp": "flwr-clientapp",
    "agentapp": "flwr-agentapp",
    "connector": "flwr-connector",
    "model": "flwr-model",
    "serverapp": "flwr-serverapp",
    "simulation": "flwr-simulation",
}

log = logging.getLogger("fedrec.guard")


def check_fab(content: bytes) -> str:
    """Why a site must not run this FAB, or "" if it is fedrec's: one ``pyproject.toml`` naming
    fedrec's apps, no dependencies, nothing else (so no code of the run's own). Anything it
    cannot read is a refusal, never an exception."""
    try:
        return _fab_problem(content)
    except Exception as err:  # noqa: BLE001 - a hostile zip or TOML is refused, whatever it raises
        return f"the app bundle cannot be read ({type(err).__name__}: {err})"


def _fab_problem(content: bytes) -> str:
    with zipfile.ZipFile(io.BytesIO(content)) as fab:
        names = set(fab.namelist())
        others = sorted(names - {"pyproject.toml", MANIFEST})
        if others:
            return f"the app bundle carries files besides its pyproject.toml: {others[:5]}"
        if "pyproject.toml" not in names:
            return "the app bundle has no pyproject.toml"
        size = fab.getinfo("pyproject.toml").file_size
        if size > MAX_PYPROJECT_BYTES:
            return f"the app bundle's pyproject.toml is {size} bytes (at most {MAX_PYPROJECT_BYTES})"
        project = tomllib.loads(fab.read("pyproject.toml").decode("utf-8"))
    tool = project.get("tool")
    flwr = tool.get("flwr") if isinstance(tool, dict) else None
    app = flwr.get("app") if isinstance(flwr, dict) else None
    components = app.get("components") if isinstance(app, dict) else None
    if components != APP_COMPONENTS:
        return f"the app bundle names the apps {components!r}, not fedrec's {APP_COMPONENTS!r}"
    meta = project.get("project")
    deps = meta.get("dependencies", []) if isinstance(meta, dict) else None
    if deps != []:
        return f"the app bundle asks for dependencies {deps!r}; fedrec's asks for none"
    return ""


def run(kind: str, runtime_api_address: str, token: str, *, insecure: bool,
        certificates: bytes | None, parent_pid: int | None) -> int:
    """One task, as Flower's ``run_clientapp`` runs it, but the app is fedrec's (module doc).
    Returns the process's exit code."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.run import RunNotRunningException
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import (
        pull_task_input,
        push_message,
        push_task_output,
    )

    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    # stopped (a run stopped, the SuperNode shutting down): tell the SuperNode the task ended,
    # as flwr-clientapp's exit handler does, through the ``finally`` below
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    retry = make_simple_http_retry_invoker()
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=insecure,
        root_certificates=certificates,
        interceptors=[
            RuntimeVersionHttpInterceptor(component_name=KINDS.get(kind, "flwr-clientapp")),
            RuntimeTokenHttpInterceptor(token),
        ],
        retry_invoker=retry,
    )
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message, context, reply, pushing = None, None, None, False
    status, details, code = SubStatus.FAILED, "the task ended before it was pulled", 1
    try:
        try:
            message, context, run_info, fab = pull_task_input(client)
            refusal = (f"this site runs only fedrec's ClientApp, not a {kind} task"
                       if kind != CLIENT_KIND else check_fab(fab.content))  # fmt: skip
            if refusal:
                log.error("refused run %d (%r): %s", run_info.run_id, run_info.fab_id, refusal)
                reply = Message(Error(code=ErrorCode.INVALID_FAB, reason=refusal), reply_to=message)
                details = refusal
            else:
                from fedrec.client.app import app  # the site's installed fedrec, not the FAB's

                reply = app(message=message, context=context)
                status, details, code = SubStatus.COMPLETED, "", 0
        except Exception as err:  # noqa: BLE001 - reported to the SuperNode, as flwr-clientapp does
            log.exception("the task failed")
            details, status, code = f"{type(err).__name__}: {err}", SubStatus.FAILED, 1
            if message is not None:  # without a reply the SuperNode waits for one forever
                error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details)
                reply = Message(error, reply_to=message)
        # One push per task, never a second after a failed one (as flwr-clientapp): the push
        # stores the reply at the SuperNode before its objects follow, and the SuperNode sends
        # one reply per message it pulled, so a second reply to a message of a stopped run would
        # be sent in place of the next run's, which then would never leave the site.
        if reply is not None and context is not None:
            pushing = True
            try:
                push_message(client, reply, context)
            except (Exception, RunNotRunningException) as err:  # noqa: BLE001 - SuperNode/run gone
                log.exception("could not push the reply")
                status, code = SubStatus.FAILED, 1
                details = "; ".join(filter(None, (details, f"{type(err).__name__}: {err}")))
    except BaseException as stop:  # SIGTERM (SystemExit), SIGINT (KeyboardInterrupt), ...
        # A task stopped after its message was pulled, before any reply: answer once, or the
        # SuperNode, which revokes the task's token when it ends, waits for a reply forever and
        # pulls no other message (flwr-clientapp has this gap; a stop of the whole SuperNode
        # does not hit it, a stopped task whose SuperNode lives on does).
        status, code, details = SubStatus.FAILED, 1, f"the task was stopped ({type(stop).__name__})"
        if message is not None and context is not None and not pushing:
            retry.max_tries = 1
            error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details)
            _quietly(lambda: push_message(client, Message(error, reply_to=message), context))
        raise
    finally:
        retry.max_tries = 1
        _quietly(lambda: push_task_output(client=client, context=context, sub_status=status,
                                          details=details))  # fmt: skip
        if heartbeat.is_running:  # its thread ends itself on an error (a 401 once stopped)
            _quietly(heartbeat.stop)
        _quietly(client.close)
    return code


def _quietly(step: Callable[[], object]) -> None:
    """A clean-up step whose failure is logged, never raised: the steps after it still run."""
    from flwr.supercore.run import RunNotRunningException  # a BaseException (Flower's retry)

    try:
        step()
    except (Exception, RunNotRunningException):  # noqa: BLE001 - the SuperNode or run is gone
        log.exception("clean-up step failed")


def write_shims(folder: Path, python: str = sys.executable) -> Path:
    """Scripts named as Flower's task processes that start this guard instead (module doc),
    each replaced whole (a task starting meanwhile sees the old script or the new one)."""
    folder.mkdir(parents=True, exist_ok=True)
    for kind, name in KINDS.items():
        text = f"#!/bin/sh\nexec {shlex.quote(python)} -I -m fedrec.deploy.guard {kind} \"$@\"\n"
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o755)
        os.replace(tmp, folder / name)
    return folder


def check_importable(python: str = sys.executable) -> str:
    """Why the shims' ``python -I`` cannot run the guard and fedrec's ClientApp, or "" (``-I``
    ignores ``PYTHONPATH`` and the user's site-packages: fedrec must be installed in ``python``'s
    environment)."""
    out = subprocess.run(
        [python, "-I", "-c", "import importlib.util as u, fedrec.deploy.guard; "
         "assert u.find_spec('fedrec.client.app'), 'no fedrec.client.app'"],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    if out.returncode == 0:
        return ""
    last = (out.stderr.strip().splitlines() or ["no output"])[-1]
    return f"{python} -I cannot import fedrec's ClientApp ({last}); install fedrec in its environment"


def main(argv: list[str] | None = None) -> int:
    from flwr.common.args import add_args_flwr_app_common, try_obtain_flwr_app_token
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    parser = argparse.ArgumentParser(description="fedrec's guard in front of a Flower task")
    parser.add_argument("kind", choices=sorted(KINDS))
    parser.add_argument("--runtime-api-address", required=True)
    add_args_flwr_app_common(parser)
    args, _ = parser.parse_known_args(argv)  # flags a later Flower adds are not ours to refuse
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per Runtime API request
    return run(
        args.kind,
        args.runtime_api_address,
        try_obtain_flwr_app_token(args),
        insecure=args.insecure,
        certificates=validate_and_resolve_root_certificates(args.root_certificates, args.insecure),
        parent_pid=args.parent_pid,
    )


if __name__ == "__main__":
    sys.exit(main())
