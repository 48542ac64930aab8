"""Child processes of the launchers: started in their own session, watched, stopped as a tree.

Flower's SuperLink starts ``flower-superexec`` in a new session, which starts the ServerApp, so
stopping the SuperLink's process group alone leaves them running: :func:`stop` collects the
whole tree of descendants first and signals each process group.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fedrec.deploy.errors import DeployError

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_REASONS = (  # Flower's output line -> what the partner should do
    (
        "[code: 2004]",
        "the SuperLink refused this partner's key: not registered (ask the platform team to "
        "run 'fedrec server register'), removed, or a node with this key is still online (a "
        "SuperNode restarted right after a crash: wait about a minute for the SuperLink to "
        "mark the old one offline; or a second SuperNode started with the same key)",
    ),
    ("CERTIFICATE_VERIFY_FAILED", "the SuperLink's certificate is not trusted with this CA"),
    ("Unable to parse the private key", "the private key file is not one Flower can load"),
    ("address already in use", "the port is in use; choose another --address / --runtime-port"),
)


class Child:
    """A started command whose output is echoed (optionally) and kept for error messages."""

    def __init__(self, cmd: Sequence[str], env: dict[str, str], *, echo: bool = True) -> None:
        self.cmd = list(cmd)
        self._lines: collections.deque[str] = collections.deque(maxlen=200)
        self._lock = threading.Lock()  # the reader thread appends while callers read
        self.proc = subprocess.Popen(
            self.cmd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, args=(echo,), daemon=True)
        self._reader.start()

    def _read(self, echo: bool) -> None:
        for line in self.proc.stdout or ():
            with self._lock:
                self._lines.append(_ANSI.sub("", line.rstrip()))
            if echo:
                sys.stderr.write(line)

    @property
    def output(self) -> str:
        """The last 200 lines the child printed, colour codes removed."""
        with self._lock:
            return "\n".join(self._lines)

    def wait_until(self, ready: Callable[[], bool], *, timeout: float, what: str) -> None:
        """Wait for ``ready()``; raise with the child's reason if it exits or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            if self.proc.poll() is not None:
                self._reader.join(timeout=2)
                raise DeployError(
                    f"{what} exited (code {self.proc.returncode}): {failure_reason(self.output)}"
                )
            time.sleep(0.2)
        raise DeployError(f"{what} not ready within {timeout:.0f} s: {failure_reason(self.output)}")

    def stop(self, grace: float = 10.0) -> None:
        stop_tree(self.proc.pid, grace)
        self.proc.wait(timeout=grace)


def failure_reason(output: str) -> str:
    """One line saying why Flower's process failed, from its output."""
    for marker, reason in _REASONS:
        if marker.lower() in output.lower():
            return reason
    errors = [ln for ln in output.splitlines() if "ERROR" in ln or "Error" in ln]
    last = (errors or output.splitlines() or ["(no output)"])[-1]
    return " ".join(last.split())[:300]


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def descendants(pid: int) -> list[int]:
    """``pid``'s descendants (Linux /proc; elsewhere none are found)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children[int(fields[1])].append(int(entry.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop_tree(pid: int, grace: float = 10.0) -> None:
    """SIGTERM the process groups of ``pid`` and its descendants, SIGKILL what outlives ``grace``."""
    pids = [pid, *descendants(pid)]
    groups = {g for g in map(_pgid, pids) if g is not None}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for group in groups:
            _signal_group(group, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)
        if not any(_alive(p) for p in pids):
            return


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _signal_group(group: int, sig: signal.Signals) -> None:
    if group == os.getpgrp():  # never our own group
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, sig)


def _alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
