"""Celery tasks for the crash-recovery and chaos tests: every execution leaves a trace in Redis.

Each task records, under keys derived from its step's idempotency key (``<run>:<step>``),
when each execution started and on which worker, and whether two executions ever ran at
the same time, so the tests can count executions, measure how long a step waited for a
dead worker, and prove no step ran twice at once.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from functools import lru_cache
from typing import TypeVar

import redis
from celery import shared_task

from orchestrator import current_step
from orchestrator.settings import get_settings

#: How often ``rec.hold`` looks at its release key (a bounded poll).
POLL_S = 0.05

T = TypeVar("T")


@lru_cache(maxsize=1)
def _redis() -> redis.Redis:
    return redis.Redis.from_url(get_settings().redis_url, decode_responses=True)


def _persist(fn: Callable[[], T], limit: float = 30.0) -> T:
    """``fn()``, tried again while Redis is unreachable (restarting): the ledger loses nothing."""
    deadline = time.monotonic() + limit
    while True:
        try:
            return fn()
        except (redis.ConnectionError, redis.TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(POLL_S)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` (on this machine, as every test worker is) still runs."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _begin(ns: str) -> str:
    """Record an execution's start; the key prefix of this step instance's traces.

    ``<key>:runner`` names the process running the step; finding another live process
    there means two executions of one step overlap, which ``<key>:overlap`` counts.
    """
    ctx = current_step()
    step = ctx.idempotency_key if ctx else "none"
    key = f"{ns}:{step}"
    me = os.getpid()
    started = f"{time.time():.6f} {ctx.worker if ctx else me}"

    def record() -> list:
        pipe = _redis().pipeline(transaction=False)
        pipe.rpush(f"{key}:starts", started)
        pipe.set(f"{key}:runner", me, get=True)
        pipe.sadd(f"{ns}:effects", step)
        return pipe.execute()

    _, before, _ = _persist(record)
    if before and int(before) != me and _alive(int(before)):
        _persist(lambda: _redis().incr(f"{key}:overlap"))
    return key


def _end(key: str) -> None:
    r = _redis()
    if _persist(lambda: r.get(f"{key}:runner")) == str(os.getpid()):
        _persist(lambda: r.delete(f"{key}:runner"))


@shared_task(name="rec.effect")
def effect(ns: str, value: int = 0, seconds: float = 0.0) -> int:
    """A step with a side effect: record the execution, work ``seconds``, return ``value + 1``."""
    key = _begin(ns)
    try:
        if seconds:
            time.sleep(seconds)
        return value + 1
    finally:
        _end(key)


@shared_task(name="rec.hold")
def hold(ns: str, release: str, limit: float = 60.0) -> str:
    """Record the execution, then wait (bounded) until the key ``release`` exists."""
    key = _begin(ns)
    try:
        deadline = time.monotonic() + limit
        while not _persist(lambda: _redis().exists(release)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{release!r} was not set within {limit}s")
            time.sleep(POLL_S)
        return "released"
    finally:
        _end(key)


@shared_task(name="rec.work")
def work(ns: str, seconds: float) -> float:
    """Record the execution and keep busy for ``seconds`` (a long step)."""
    key = _begin(ns)
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(POLL_S)
        return seconds
    finally:
        _end(key)
