"""Run the app with uvicorn: in the foreground (``serve``) or in a background thread
(``running``, for tests and notebooks)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI

from fedrec.serve.app import create_app

STARTUP_TIMEOUT = 30.0  # seconds to wait for a background server to accept connections


def serve(
    run_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    torch_threads: int = 1,
    recall_index: str = "auto",
) -> None:
    """Serve the run directory's recommender until interrupted (Ctrl-C).

    Requests run concurrently in uvicorn's thread pool, so each uses ``torch_threads`` intra-op
    threads (one by default: several requests per core beat one request on several cores, and
    OpenMP threads spinning against each other inflate the tail latency).
    """
    if torch_threads < 1:
        raise ValueError(f"torch_threads must be at least 1, got {torch_threads}")
    torch.set_num_threads(torch_threads)
    app = create_app(run_dir, recall_index=recall_index)
    uvicorn.run(app, host=host, port=port, log_level="info")


@contextlib.contextmanager
def running(app: FastAPI, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve ``app`` on a free port in a daemon thread; yield its base URL, stop on exit.

    The socket is bound before the server starts, so there is no race for the port.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        _wait_started(server, thread)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=STARTUP_TIMEOUT)
        sock.close()


def _wait_started(server: uvicorn.Server, thread: threading.Thread) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the background server did not start; see its log")
        time.sleep(0.01)
