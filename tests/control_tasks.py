"""Celery tasks for the control-flow tests; side effects go to Redis so tests can see them."""

from __future__ import annotations

import time

import redis
from celery import shared_task

from orchestrator import current_step
from orchestrator.settings import get_settings

_client: redis.Redis | None = None
#: How often ``ctl.hold`` looks at its release key (a bounded poll, not a fixed wait).
POLL_S = 0.05


def _r() -> redis.Redis:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(get_settings().redis_url, decode_responses=True)
    return _client


@shared_task(name="ctl.double")
def double(x: int) -> int:
    return x * 2


@shared_task(name="ctl.add")
def add(a: int, b: int) -> int:
    return a + b


@shared_task(name="ctl.total")
def total(values: list) -> int:
    return sum(v for v in values if v is not None)


@shared_task(name="ctl.fail")
def fail(message: str = "boom") -> None:
    raise RuntimeError(message)


@shared_task(name="ctl.fail_when")
def fail_when(x: int, bad: int) -> int:
    if x == bad:
        raise ValueError(f"item {x} is bad")
    return x


@shared_task(name="ctl.record")
def record(log: str, entry: str, fail_first: int = 0) -> str:
    """Append ``entry`` to the Redis list ``log``; fail the first ``fail_first`` attempts."""
    ctx = current_step()
    if ctx is not None and ctx.attempt <= fail_first:
        raise ConnectionError(f"{entry}: transient failure on attempt {ctx.attempt}")
    _r().rpush(log, entry)
    return entry


@shared_task(name="ctl.fail_while")
def fail_while(flag: str, log: str = "") -> str:
    """Fail while the Redis key ``flag`` exists (a cause the test can fix)."""
    if _r().exists(flag):
        raise RuntimeError(f"{flag} is set")
    if log:
        _r().rpush(log, "fixed")
    return "ok"


@shared_task(name="ctl.count")
def count(counter: str, value: object = None) -> object:
    _r().incr(counter)
    return value


@shared_task(name="ctl.hold")
def hold(counter: str, release: str, limit: float = 30.0) -> str:
    """Count a start, then wait (bounded) until ``release`` is set; for cancel tests."""
    _r().incr(counter)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and not _r().exists(release):
        time.sleep(POLL_S)
    return "released"
