"""Celery tasks used by the tests (imported by workers via ORCHESTRATOR_TASK_MODULES).

Plain shared tasks, as a user would write them. The few that need the orchestrator
read only its public surface: :func:`orchestrator.current_step` (which attempt this is,
the idempotency key) and the settings (to reach the test's private Redis for side
effects the test can observe and for gates the test controls).
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

import redis
from celery import shared_task

from orchestrator import current_step
from orchestrator.settings import get_settings


@lru_cache(maxsize=1)
def _redis() -> redis.Redis:
    return redis.Redis.from_url(get_settings().redis_url, decode_responses=True)


@shared_task(name="tests.noop")
def noop() -> None:
    return None


@shared_task(name="tests.echo")
def echo(**kwargs: Any) -> dict[str, Any]:
    return kwargs


@shared_task(name="tests.add")
def add(a: float, b: float) -> float:
    return a + b


@shared_task(name="tests.fail")
def fail(message: str = "boom") -> None:
    raise ValueError(message)


@shared_task(name="tests.flaky")
def flaky(succeed_on: int) -> dict[str, int]:
    """Fail every attempt before ``succeed_on`` (by attempt number, so any worker agrees)."""
    ctx = current_step()
    attempt = ctx.attempt if ctx is not None else 1
    if attempt < succeed_on:
        raise ConnectionError(f"flaky: attempt {attempt} fails")
    return {"attempt": attempt}


@shared_task(name="tests.count")
def count(key: str, value: Any = None) -> Any:
    """A side effect the test can count: INCR ``key``; returns ``value``."""
    _redis().incr(key)
    return value


@shared_task(name="tests.gate")
def gate(key: str, value: Any = None, timeout: float = 30.0) -> Any:
    """Block until the test pushes to the list ``key`` (at most ``timeout`` s); return ``value``."""
    if _redis().blpop([key], timeout=timeout) is None:
        raise TimeoutError(f"gate {key!r} was not opened within {timeout}s")
    return value


@shared_task(name="tests.context")
def context() -> dict[str, Any] | None:
    """What ``current_step()`` says inside a task."""
    ctx = current_step()
    if ctx is None:
        return None
    return {
        "run_id": ctx.run_id,
        "flow": ctx.flow,
        "step": ctx.step,
        "attempt": ctx.attempt,
        "worker": ctx.worker,
        "idempotency_key": ctx.idempotency_key,
    }


@shared_task(name="tests.not_json")
def not_json() -> Any:
    return {1, 2, 3}


@shared_task(name="tests.log")
def log_message(message: str) -> str:
    """Write ``message`` to the worker's log (the secret-leak test checks it is masked)."""
    logging.getLogger("tests.tasks").warning("task says: %s", message)
    return "logged"
