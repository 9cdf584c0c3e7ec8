"""Celery entry point for workers: ``celery -A orchestrator.worker worker``.

Imports the task modules named in ``ORCHESTRATOR_TASK_MODULES`` so the steps'
Celery tasks are registered in the worker. At start a worker (and beat) checks that no
Redis of the deployment evicts keys (``ORCHESTRATOR_REDIS_EVICTION``).
"""

from __future__ import annotations

import sys
from typing import Any

from celery import signals

from .app import create_app, import_task_modules
from .health import LivenessFile
from .redisconn import EvictingRedis, check_eviction_once, print_warning
from .settings import get_settings

settings = get_settings()
app = create_app(settings)
app.steps["consumer"].add(LivenessFile)  # touches ORCHESTRATOR_LIVENESS_FILE, when set
import_task_modules(settings)


@signals.worker_init.connect
def _worker_init(sender: Any = None, **_: Any) -> None:
    _check_redis(sender, "worker")


@signals.beat_init.connect
def _beat_init(sender: Any = None, **_: Any) -> None:
    _check_redis(sender, "beat")


def _check_redis(sender: Any, process: str) -> None:
    """``celery -A orchestrator.worker worker|beat`` checks, as ``orchestrator worker|beat``
    do, that no Redis of theirs evicts keys (``ORCHESTRATOR_REDIS_EVICTION``)."""
    if getattr(sender, "app", None) is not app:
        return  # an embedded worker of another app
    try:
        check_eviction_once(settings, process, print_warning)
    except EvictingRedis as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
