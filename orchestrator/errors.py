"""The orchestrator's exceptions: one small hierarchy, one line of docstring each."""

from __future__ import annotations

from typing import Any, Protocol


class EndedRun(Protocol):
    """What :class:`RunFailed` reads of a run (``orchestrator.client.Run`` is one)."""

    id: str
    flow: str
    status: str
    error: Any


class OrchestratorError(Exception):
    """Base class of every error this package raises on purpose."""


class DefinitionError(OrchestratorError):
    """A definition is invalid; ``problems`` lists each (file, line, path, message)."""

    def __init__(self, problems: list[Problem] | str):
        if isinstance(problems, str):
            problems = [Problem(message=problems)]
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class Problem:
    """One thing wrong in a definition, with where it is."""

    __slots__ = ("file", "line", "path", "message")

    def __init__(
        self, message: str, file: str | None = None, line: int | None = None, path: str = ""
    ):
        self.file, self.line, self.path, self.message = file, line, path, message

    def __str__(self) -> str:
        where = self.file or "<definition>"
        if self.line:
            where += f":{self.line}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "path": self.path, "message": self.message}


class ExpressionError(OrchestratorError):
    """An expression is malformed, or failed while being evaluated."""


class InputError(OrchestratorError):
    """Trigger inputs do not match the flow's input schema; ``field`` names the culprit."""

    def __init__(self, field: str, message: str):
        self.field, self.reason = field, message
        super().__init__(f"input {field!r}: {message}")


class LimitExceeded(InputError):
    """A value is over a documented limit (``limit`` names its setting) or not encodable."""

    def __init__(self, field: str, message: str, limit: str | None = None):
        self.limit = limit
        suffix = f" (limit: ORCHESTRATOR_{limit.upper()})" if limit else ""
        super().__init__(field, message + suffix)


class IdempotencyConflict(OrchestratorError):
    """An idempotency key was used again with other inputs; ``key`` and ``run`` name them."""

    def __init__(self, flow: str, key: str, run_id: str):
        self.flow, self.key, self.run_id = flow, key, run_id
        super().__init__(
            f"idempotency key {key!r} of flow {flow!r} belongs to run {run_id}, "
            "which was triggered with other inputs"
        )


class NotFound(OrchestratorError):
    """A flow, run or step that was asked for does not exist."""


class FlowStopped(OrchestratorError):
    """The flow is stopped and refuses triggers until it is started."""


class Forbidden(OrchestratorError):
    """The caller may not do this (e.g. decide an approval it is not an approver of)."""


class InvalidState(OrchestratorError):
    """The operation does not apply to the run in its current status."""


class StepError(OrchestratorError):
    """A step failed; raised inside the worker with the failure's type and message."""


class RunFailed(OrchestratorError):
    """A run ended failed, compensated or cancelled; ``run`` holds its final state."""

    def __init__(self, run: EndedRun):
        self.run = run
        err = run.error or {}
        msg = err.get("message") if isinstance(err, dict) else str(err)
        super().__init__(f"run {run.id} of {run.flow} ended {run.status}: {msg}")


class PoolsFileError(OrchestratorError):
    """The worker-pools file is missing, not YAML, or a pool in it is malformed."""


class PermanentError(Exception):
    """A step error that retrying cannot fix (bad expression, unknown task, non-JSON output)."""


class WorkerLost(Exception):
    """The process running a step died, as many times as ``max_deliveries`` allows."""


class HttpError(OrchestratorError):
    """An HTTP call failed; ``retryable`` says whether trying again may help."""

    def __init__(self, message: str, retryable: bool, status: int | None = None):
        super().__init__(message)
        self.retryable, self.status = retryable, status


class SignatureError(Exception):
    """The request's signature is missing, malformed, wrong or too old."""


class DemoError(Exception):
    """The demo could not set itself up; the message says what to do."""


class DevError(Exception):
    """The stack could not start or stopped on its own; the message says why."""
