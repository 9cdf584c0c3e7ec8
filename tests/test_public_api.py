"""The public face that users import: pinned, so a refactoring cannot move it by accident.

``orchestrator.__all__`` and every import path the README documents must keep working;
changing one is a decision, taken by changing this file.
"""

from __future__ import annotations

import importlib

import orchestrator

PUBLIC = [
    "Client",
    "DefinitionError",
    "Deployed",
    "ExpressionError",
    "Flow",
    "FlowStopped",
    "Forbidden",
    "IdempotencyConflict",
    "InputError",
    "InvalidState",
    "LimitExceeded",
    "NotFound",
    "OrchestratorError",
    "Run",
    "RunFailed",
    "Settings",
    "StepContext",
    "StepError",
    "StepState",
    "current_step",
    "for_each",
    "parallel",
    "sequence",
    "step",
    "switch",
    "try_",
]

#: ``module: names`` the README tells users to import (or to name in a command).
DOCUMENTED = {
    "orchestrator.api": ["create_api"],
    "orchestrator.dashboard": ["mount_dashboard"],
    "orchestrator.webhooks": ["sign"],
    "orchestrator.testing": [],
    "orchestrator.worker": ["app"],
    "orchestrator.scheduler": ["Scheduler"],
    "orchestrator.cli": ["main"],
    "orchestrator.errors": ["InputError", "RunFailed", "LimitExceeded", "IdempotencyConflict"],
    "orchestrator.settings": ["Settings", "get_settings"],
}


def test_all_is_pinned_and_every_name_resolves() -> None:
    assert sorted(orchestrator.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        assert getattr(orchestrator, name) is not None, name


def test_documented_import_paths_work() -> None:
    for module, names in DOCUMENTED.items():
        mod = importlib.import_module(module)
        for name in names:
            assert hasattr(mod, name), f"{module}.{name}"


def test_task_names_are_pinned() -> None:
    """Messages already in queues name these tasks: a rolling deploy must find them."""
    from orchestrator import worker

    app = worker.app
    for name in ("orchestrator.step", "orchestrator.tick", "orchestrator.event"):
        assert name in app.tasks, name
