"""The tasks both sides of every benchmark call (``ORCHESTRATOR_TASK_MODULES=benchmarks.tasks``).

Plain shared tasks, so the plain-Celery canvas and the orchestrator's steps run the very
same code on the very same worker processes.
"""

from __future__ import annotations

import time
from functools import lru_cache
from typing import Any

import redis
from celery import shared_task

from orchestrator.settings import get_settings


@lru_cache(maxsize=1)
def _redis() -> redis.Redis:
    return redis.Redis.from_url(get_settings().redis_url)


def _fib(n: int) -> int:
    return n if n < 2 else _fib(n - 1) + _fib(n - 2)


@shared_task(name="bench.noop")
def noop(**_: Any) -> None:
    return None


@shared_task(name="bench.fibo")
def fibo(n: int, key: str | None = None) -> int:
    """CPU-bound work of a chosen size: recursive Fibonacci (fibo(30) is ~0.2 s).

    With ``key``, appends "start end" (wall clock) to that list, so the gap between one
    step's end and the next one's start can be measured the same way on both sides.
    """
    start = time.time()
    value = _fib(n)
    if key:
        _redis().rpush(key, f"{start!r} {time.time()!r}")
    return value


@shared_task(name="bench.stamp")
def stamp(key: str) -> None:
    """Push the wall-clock time this task started at onto list ``key`` (latency probes)."""
    now = time.time()
    _redis().rpush(key, repr(now))
