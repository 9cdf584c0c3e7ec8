"""Celery tasks for the signal tests (``tests/integration/test_signals.py``).

``sig.spawn`` starts a grandchild of the worker (a ``sleep``), records its pid and its
pool process's pid in Redis, and then keeps running past its soft time limit, so only the
hard time limit ends it: the test checks that nothing it started outlives it.
"""

from __future__ import annotations

import os
import subprocess
import time
from functools import lru_cache

import redis
from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded

from orchestrator.settings import get_settings

#: How often ``sig.spawn`` wakes up while it waits to be killed.
POLL_S = 0.05


@lru_cache(maxsize=1)
def _redis() -> redis.Redis:
    return redis.Redis.from_url(get_settings().redis_url, decode_responses=True)


@shared_task(name="sig.spawn")
def spawn(key: str, limit: float = 60.0) -> str:
    """Start ``sleep 60`` (the grandchild), record ``<pool pid> <grandchild pid>`` under
    ``key``, then outlast the soft time limit (bounded by ``limit``)."""
    child = subprocess.Popen(["sleep", "60"])  # noqa: S607 - the test's own grandchild
    _redis().rpush(key, f"{os.getpid()} {child.pid}")
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            time.sleep(POLL_S)
        except SoftTimeLimitExceeded:
            _redis().rpush(f"{key}:soft", "1")  # and go on: the hard limit must end it
    return "outlived"


@shared_task(name="sig.spawn_and_clean")
def spawn_and_clean(key: str, limit: float = 60.0) -> str:
    """Start ``sleep 60``, record pids as ``sig.spawn`` does, and at the soft time limit
    kill what it started (:func:`orchestrator.procgroup.kill_descendants`, as the step
    runtime does) before the timeout fails the step."""
    from orchestrator.procgroup import kill_descendants

    child = subprocess.Popen(["sleep", "60"])  # noqa: S607 - the test's own grandchild
    _redis().rpush(key, f"{os.getpid()} {child.pid}")
    deadline = time.monotonic() + limit
    try:
        while time.monotonic() < deadline:
            time.sleep(POLL_S)
    except SoftTimeLimitExceeded:
        _redis().rpush(f"{key}:killed", *kill_descendants(grace=1.0))
        raise
    return "outlived"
