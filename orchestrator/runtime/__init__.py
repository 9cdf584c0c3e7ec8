"""The step runtime: what workers do with ``orchestrator.step`` messages, and the producer
side that sends them.

Importing it registers the step task (:mod:`.task`) and its signal handlers, as
``orchestrator.app.create_app`` does. Modules:

- :mod:`.task`: the Celery entry point, the kind -> handler table, ``settle``
- :mod:`.engine`: the per-process store and plan cache
- :mod:`.context`: :class:`StepContext` and :func:`current_step` for user tasks
- :mod:`.execution`: one delivery's state machine (read, begin, record, finish, fail, advance)
- :mod:`.kinds`, :mod:`.waits`, :mod:`.compensation`, :mod:`.ratelimit`: its step kinds,
  durable waits, saga phase and rate limits
- :mod:`.dispatch`: start a run, wake a step, resume a parent, announce a run's end
"""

from __future__ import annotations

from ..publishing import publish
from .context import StepContext, current_step
from .dispatch import (
    PlanFor,
    new_run_id,
    notify_parent,
    run_ended,
    start_run,
    trigger_flow,
    wake_step,
)
from .engine import Engine, PermanentError, WorkerLost, drop_engine, engine_for
from .execution import Execution, error_info
from .task import HANDLERS, mask_task_report, settle, step_task
from .waits import iso, to_epoch

__all__ = [
    "HANDLERS",
    "Engine",
    "Execution",
    "PermanentError",
    "PlanFor",
    "StepContext",
    "WorkerLost",
    "current_step",
    "drop_engine",
    "engine_for",
    "error_info",
    "iso",
    "mask_task_report",
    "new_run_id",
    "notify_parent",
    "publish",
    "run_ended",
    "settle",
    "start_run",
    "step_task",
    "to_epoch",
    "trigger_flow",
    "wake_step",
]
