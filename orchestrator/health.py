"""Liveness of worker and beat processes, for exec probes (Kubernetes, compose).

A Celery worker answers ``celery inspect ping`` only through the broker: the probe
imports Celery, connects, broadcasts and waits for the reply, which costs seconds and
fails for every worker at once when Redis blips. Instead, with
``ORCHESTRATOR_LIVENESS_FILE`` set, a worker touches that file from its consumer's
event loop every :data:`TOUCH_INTERVAL_S` seconds while it consumes, and beat touches it
from its scheduling loop. ``orchestrator health`` then only compares the file's age with
``--max-age``: a wedged event loop, a consumer that stopped, or a beat loop that hangs
all stop the touching, and the probe fails once the file is older than that.

The REST API (``orchestrator api``) touches it too, from :func:`touch_while_serving`, a
task in the server's event loop that does each touch through the worker-thread pool the
request handlers run in. A blocked event loop stops it, and so does a pool whose threads
are all stuck (a deadlock, a Redis that hangs): the API stops answering in both cases,
and the probe says so.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from celery import bootsteps

#: How often a live process touches its liveness file, in seconds.
TOUCH_INTERVAL_S = 5.0


def touch(path: str | os.PathLike[str]) -> None:
    """Create ``path`` or set its modification time to now."""
    target = Path(path)
    try:
        os.utime(target)
    except FileNotFoundError:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch()


def check(path: str | os.PathLike[str], max_age: float) -> tuple[bool, str]:
    """Whether ``path`` was touched in the last ``max_age`` seconds, and a line saying so."""
    try:
        age = time.time() - Path(path).stat().st_mtime
    except FileNotFoundError:
        return False, f"{path} does not exist (not started yet, or the process never consumed)"
    if age > max_age:
        return False, f"{path} last touched {age:.1f}s ago (more than {max_age:g}s)"
    return True, f"{path} touched {age:.1f}s ago"


async def touch_while_serving(
    path: str | os.PathLike[str], interval: float = TOUCH_INTERVAL_S
) -> None:
    """Touch ``path`` every ``interval`` seconds, for as long as the loop and its threads work.

    Each touch is run by ``anyio.to_thread.run_sync`` under the default thread limiter,
    the one FastAPI runs every sync endpoint under: when all its threads are taken and
    none comes back, the touch waits in line with the requests and the file ages.
    Runs until cancelled.
    """
    while True:
        await anyio.to_thread.run_sync(touch, path)
        await anyio.sleep(interval)


class LivenessFile(bootsteps.StartStopStep):
    """Consumer bootstep: touch the liveness file while the worker consumes.

    It runs on the consumer's timer (the event loop of the worker's main process), the
    way Celery's own heartbeat does, so it stops when the consumer stops: on shutdown,
    or while the connection to the broker is being re-established.
    """

    label = "Liveness file"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        settings = getattr(c.app.conf, "orchestrator_settings", None)
        self.path = settings.liveness_file if settings is not None else ""
        self.enabled = bool(self.path)
        self.tref: Any = None
        super().__init__(c, **kwargs)

    def start(self, c: Any) -> None:
        touch(self.path)
        self.tref = c.timer.call_repeatedly(TOUCH_INTERVAL_S, touch, (self.path,))

    def stop(self, c: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None

    shutdown = stop


class BeatToucher:
    """Touches the liveness file from beat's loop, at most every TOUCH_INTERVAL_S."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._last = 0.0

    def __call__(self) -> None:
        if not self.path:
            return
        now = time.monotonic()
        if now - self._last >= TOUCH_INTERVAL_S:
            touch(self.path)
            self._last = now


__all__ = [
    "TOUCH_INTERVAL_S",
    "BeatToucher",
    "LivenessFile",
    "check",
    "touch",
    "touch_while_serving",
]
