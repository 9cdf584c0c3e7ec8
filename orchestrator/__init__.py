"""Declarative multi-step flows on Celery, with run state in Redis.

Public API: build or load flows, deploy and trigger them, read runs. Everything not
listed in ``__all__`` is internal.

The names below are imported on first use (PEP 562), so importing one submodule (the
pytest plugin ``orchestrator.testing``, which pytest loads in every run) does not load
Celery, pydantic and the rest.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import Client, Deployed, Run, StepState
    from .dsl import Flow, for_each, parallel, sequence, step, switch, try_
    from .errors import (
        DefinitionError,
        ExpressionError,
        FlowStopped,
        Forbidden,
        IdempotencyConflict,
        InputError,
        InvalidState,
        LimitExceeded,
        NotFound,
        OrchestratorError,
        RunFailed,
        StepError,
    )
    from .runtime import StepContext, current_step
    from .settings import Settings

#: The module of each public name.
_EXPORTS = {
    "Client": "client",
    "Deployed": "client",
    "Run": "client",
    "StepState": "client",
    "Flow": "dsl",
    "for_each": "dsl",
    "parallel": "dsl",
    "sequence": "dsl",
    "step": "dsl",
    "switch": "dsl",
    "try_": "dsl",
    "DefinitionError": "errors",
    "ExpressionError": "errors",
    "FlowStopped": "errors",
    "Forbidden": "errors",
    "IdempotencyConflict": "errors",
    "InputError": "errors",
    "InvalidState": "errors",
    "LimitExceeded": "errors",
    "NotFound": "errors",
    "OrchestratorError": "errors",
    "RunFailed": "errors",
    "StepError": "errors",
    "StepContext": "runtime",
    "current_step": "runtime",
    "Settings": "settings",
}

__all__ = [
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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
