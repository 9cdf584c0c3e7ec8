"""Celery tasks that end in the ways the hardening tests attack: each counts its executions.

Every task increments ``<key>`` in the test's Redis before it does anything else, so a test
can tell how many times its body ran (a step redelivered for ever, a retry outside the flow).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from functools import lru_cache

import redis
from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded

from orchestrator.settings import get_settings


@lru_cache(maxsize=1)
def _redis() -> redis.Redis:
    return redis.Redis.from_url(get_settings().redis_url, decode_responses=True)


def _count(key: str) -> int:
    return int(_redis().incr(key))


@shared_task(name="hard.die")
def die(key: str, how: str) -> str:
    """Kill this task's own process: ``sigkill``, ``exit`` (sys.exit) or ``os_exit``."""
    _count(key)
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif how == "exit":
        sys.exit(3)
    else:
        os._exit(3)
    return "unreachable"


@shared_task(name="hard.stubborn")
def stubborn(key: str, seconds: float) -> str:
    """Ignore the soft time limit and keep going, so only the hard limit can stop it."""
    _count(key)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            time.sleep(0.05)
        except SoftTimeLimitExceeded:
            continue
    return "finished"


@shared_task(name="hard.output")
def output(key: str, kind: str, size: int = 0) -> object:
    """Return something a step output must not be: ``big`` bytes, a ``deep`` list, a
    ``huge_int`` (over Python's 4,300-digit str limit), or a ``nan``."""
    _count(key)
    if kind == "big":
        return "x" * size
    if kind == "deep":
        value: list = []
        for _ in range(size):
            value = [value]
        return value
    if kind == "huge_int":
        return 10**5000
    return float("nan")


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise ValueError("no message for you")


@shared_task(name="hard.unprintable")
def unprintable(key: str) -> None:
    """Raise an exception whose message cannot even be read."""
    _count(key)
    raise _Unprintable()


@shared_task(name="hard.memory")
def memory(key: str) -> None:
    _count(key)
    raise MemoryError("cannot allocate 10 GiB")
