"""Celery entry point for workers: ``celery -A orchestrator.worker worker``.

Imports the task modules named in ``ORCHESTRATOR_TASK_MODULES`` so the steps'
Celery tasks are registered in the worker.
"""

from __future__ import annotations

from .app import create_app, import_task_modules
from .health import LivenessFile
from .settings import get_settings

settings = get_settings()
app = create_app(settings)
app.steps["consumer"].add(LivenessFile)  # touches ORCHESTRATOR_LIVENESS_FILE, when set
import_task_modules(settings)
