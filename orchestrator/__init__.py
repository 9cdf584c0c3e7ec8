"""Declarative multi-step flows on Celery, with run state in Redis.

Public API: build or load flows, deploy and trigger them, read runs. Everything not
listed in ``__all__`` is internal.
"""

from .client import Client, Deployed, Run, StepState
from .dsl import Flow, for_each, parallel, sequence, step, switch, try_
from .errors import (
    DefinitionError,
    ExpressionError,
    FlowStopped,
    Forbidden,
    InputError,
    InvalidState,
    NotFound,
    OrchestratorError,
    RunFailed,
    StepError,
)
from .runtime import StepContext, current_step
from .settings import Settings

__all__ = [
    "Client",
    "DefinitionError",
    "Deployed",
    "ExpressionError",
    "Flow",
    "FlowStopped",
    "Forbidden",
    "InputError",
    "InvalidState",
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
