"""Test infrastructure shared by the test suite and the benchmarks.

The process helpers live in the package (:mod:`orchestrator.devstack.processes`, which the
users' pytest plugin :mod:`orchestrator.testing` uses too); this module re-exports
them with this repository's defaults: workers and beat run from the repository root,
with it on ``PYTHONPATH``, so ``tests.tasks`` and ``workers.*`` import in them.

* :class:`RedisServer` -- a throw-away ``redis-server`` on a free port with its own
  data directory (never the shared Redis on 6379).
* :class:`WorkerProcess` -- a real ``celery worker`` subprocess in its own process
  group, with its output in a log file; :class:`BeatProcess` for ``celery beat``.
* :func:`wait_for` -- the one way to wait for something: a bounded poll.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx

from orchestrator.devstack import processes
from orchestrator.devstack.processes import REDIS_SERVER_BIN, RedisServer, free_port, wait_for

__all__ = [
    "REPO_ROOT",
    "REDIS_SERVER_BIN",
    "BeatProcess",
    "RedisServer",
    "WorkerProcess",
    "free_port",
    "wait_for",
]

#: The repository root (``tests/..``); workers run from here so ``tests.tasks`` and
#: ``workers.*`` are importable in them.
REPO_ROOT = Path(__file__).resolve().parent.parent


def _repo_defaults(kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs.setdefault("cwd", REPO_ROOT)
    kwargs.setdefault("pythonpath", [REPO_ROOT])
    return kwargs


class WorkerProcess(processes.WorkerProcess):
    """:class:`orchestrator.devstack.processes.WorkerProcess` run from the repository root."""

    def __init__(self, queues: str | Iterable[str], **kwargs: Any) -> None:
        super().__init__(queues, **_repo_defaults(kwargs))


class BeatProcess(processes.BeatProcess):
    """:class:`orchestrator.devstack.processes.BeatProcess` run from the repository root."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**_repo_defaults(kwargs))


@contextlib.contextmanager
def flower_process(env: dict[str, str], log: Path) -> Iterator[tuple[str, int]]:
    """``orchestrator flower`` on a free port with ``env``, logging to ``log``; yields its
    base URL and pid once its health check answers, and stops it afterwards."""
    port = free_port()
    cmd = [sys.executable, "-m", "orchestrator", "flower", "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, f"flower exited {proc.returncode}:\n{log.read_text()}"
        try:
            return httpx.get(f"{base}/healthcheck", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(up, timeout=30, interval=0.1, message=lambda: f"no Flower:\n{log.read_text()}")
        yield base, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
