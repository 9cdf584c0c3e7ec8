"""What a user's task may know about the step it runs for, while it runs."""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class StepContext:
    """What a running task may know about the step it serves."""

    run_id: str
    flow: str
    step: str  # the step instance key, e.g. ``load`` or ``load[3]``
    attempt: int
    worker: str

    @property
    def idempotency_key(self) -> str:
        """Stable across retries and redeliveries of this step instance: use it for side effects."""
        return f"{self.run_id}:{self.step}"


_current: contextvars.ContextVar[StepContext | None] = contextvars.ContextVar(
    "orchestrator_step", default=None
)


def current_step() -> StepContext | None:
    """The step the calling task runs for, or None outside a flow."""
    return _current.get()


@contextmanager
def _step_context(ctx: StepContext) -> Iterator[None]:
    """Make ``ctx`` what :func:`current_step` returns, for the user's task it wraps."""
    token = _current.set(ctx)
    try:
        yield
    finally:
        _current.reset(token)
