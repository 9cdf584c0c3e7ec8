"""Celery tasks used by the tests (imported by workers via ORCHESTRATOR_TASK_MODULES).

Plain shared tasks: this module does not import ``orchestrator``.
"""

from __future__ import annotations

from typing import Any

from celery import shared_task


@shared_task(name="tests.noop")
def noop() -> None:
    return None


@shared_task(name="tests.echo")
def echo(**kwargs: Any) -> dict[str, Any]:
    return kwargs
