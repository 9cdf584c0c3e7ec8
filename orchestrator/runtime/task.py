"""The Celery entry point: what a worker does with one ``orchestrator.step`` message.

A message names a run, a flow version, a step and its forEach index path:
``step_task(run_id, flow, version, node_id, path, tail)``, where ``tail`` says the
message ends a canvas (the worker continues the run after it: it publishes the next
segment or counts a fan-in arrival). Keywords say why it came: ``deferred`` (retries
that spent no attempt: a rate limit, a held lease), ``phase`` and ``rindex`` (``"recovery"``
and the compensation's index, in a failed run's saga phase), ``join`` (a parallel's chord
body: every branch ended), ``wake`` (a parked step should look at its wait again) and
``resume`` (the child run of a subflow step ended). Names and positions are the wire
format: messages and timers of runs already stored carry them.

The worker reads what the step needs from Redis and marks it running (one round trip),
does the step's work (calls the user's Celery task in-process, joins a parallel,
or publishes the children of a runtime structure), and records the outcome together
with whatever ends with it in one more round trip (:mod:`.execution`).

Importing this module registers the task and the signal handlers that keep secrets out
of what Celery logs and reports.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import redis
from billiard.einfo import ExceptionWithTraceback
from celery import Task, shared_task, signals
from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded
from kombu.exceptions import OperationalError

from ..compiler import STEP_TASK
from ..errors import StepError
from ..plan import node_key
from ..variables import install_log_filter, known_secrets, mask, mask_exception, safe_text
from .engine import Engine, PermanentError, engine_for
from .execution import Execution, _text

log = logging.getLogger("orchestrator.runtime")


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _mask_secrets(logger: logging.Logger | None = None, **_: Any) -> None:
    """Secrets a worker resolves never reach its logs (see :mod:`.variables`)."""
    install_log_filter(*([logger] if logger is not None else []))


@signals.task_failure.connect(weak=False)
def _masked_failure(einfo: Any = None, **_: Any) -> None:
    """No secret in what Celery reports of a failed task (:func:`mask_task_report`)."""
    mask_task_report(einfo)


@signals.task_retry.connect(weak=False)
def _masked_retry(einfo: Any = None, **_: Any) -> None:
    """No secret in what Celery reports of a task it retries (:func:`mask_task_report`)."""
    mask_task_report(einfo)


def mask_task_report(einfo: Any) -> None:
    """Mask what Celery reports of a task that failed or will be retried: the exception
    (its repr goes to the task event) and the traceback text (the event and the log).

    ``einfo`` is the ``ExceptionInfo`` that the pool process hands back to the worker's
    main process, which sends the ``task-failed``/``task-retried`` event from it."""
    secrets = known_secrets()
    if einfo is None or not secrets:
        return
    if isinstance(getattr(einfo, "traceback", None), str):
        einfo.traceback = mask(einfo.traceback, secrets)
    exc = getattr(einfo, "exception", None)
    if isinstance(exc, BaseException):
        masked = _mask_reported(exc, secrets)
        if masked is not exc:
            einfo.exception, einfo.type = masked, type(masked)


def _mask_reported(exc: BaseException, secrets: frozenset[str]) -> BaseException:
    """:func:`mask_exception` through the wrappers Celery reports: billiard's
    ``ExceptionWithTraceback`` (an exception and its traceback text, both sent to the
    main process) and ``Retry`` (the error it retries after: ``task-retried`` shows it)."""
    if isinstance(exc, ExceptionWithTraceback):
        exc.tb = mask(exc.tb, secrets)
        if isinstance(exc.exc, BaseException):
            exc.exc = _mask_reported(exc.exc, secrets)
        return exc
    if isinstance(exc, Retry):
        if isinstance(exc.exc, BaseException):
            exc.exc = _mask_reported(exc.exc, secrets)
            exc.excs = safe_text(repr, exc.exc)
        elif isinstance(exc.excs, str):
            exc.excs = mask(exc.excs, secrets)
        if isinstance(exc.message, str):
            exc.message = mask(exc.message, secrets)
        return exc
    return mask_exception(exc, secrets)


HANDLERS: dict[str, Callable[[Execution], None]] = {
    "task": Execution._run_task,
    "service": Execution._run_task,
    "http": Execution._run_task,
    "parallel": Execution._run_parallel,
    "sequence": Execution._run_sequence,
    "forEach": Execution._run_foreach,
    "switch": Execution._run_switch,
    "try": Execution._run_try,
    "subflow": Execution._run_subflow,
    "approval": Execution._run_approval,
    "sleep": Execution._run_sleep,
    "wait": Execution._run_wait,
}
"""Which handler runs a step of each kind (a first delivery, not a wake or a resume)."""


def run_step(x: Execution) -> None:
    """Run the handler of the step's kind; a kind this worker does not know fails the step."""
    handler = HANDLERS.get(x.node.kind)
    if handler is None:
        x._fail(PermanentError(f"step kind {x.node.kind!r} is not supported"))
    else:
        handler(x)


# max_retries=None: attempts are counted by the orchestrator (retry policies, deferrals);
# Celery's default of 3 would end a step's fifth try, or its fourth deferral, in an error.
# acks_on_timeout=False: a step killed by its hard time limit gives its message back
# (Celery would acknowledge it, and nothing would ever record the step's end); the
# next delivery finds the timeout in the step's lease and records it (recovery.py).
@shared_task(
    name=STEP_TASK,
    bind=True,
    max_retries=None,
    acks_on_timeout=False,
    Request="orchestrator.recovery:TaskRequest",
)
def step_task(
    self: Task,
    run_id: str,
    flow: str,
    version: str,
    node_id: str,
    path: list[int],
    tail: bool,
    deferred: int = 0,
    phase: str | None = None,
    rindex: int = 0,
    resume: str | None = None,
    join: bool = False,
    wake: bool = False,
) -> None:
    """Execute one step of a run (see the module docstring)."""
    eng = engine_for(self.app)
    x: Execution | None = None
    try:
        plan = eng.plan(flow, version)
        x = Execution(eng, self, plan, plan.nodes[node_id], run_id, tuple(path), tail)
        x.deferred, x.phase, x.rindex, x.join = deferred, phase, rindex, join
        x.attempt = (self.request.retries or 0) + 1 - deferred
        if resume is not None:
            x.resume_subflow(resume)
        elif wake:
            x.wake()
        else:
            run_step(x)
    except (Retry, Ignore, Reject, StepError):
        raise  # the step's own ending, already recorded
    except (redis.ConnectionError, redis.TimeoutError, OperationalError) as exc:
        # Redis (state or broker) out of reach, e.g. restarting: give the message back
        # rather than let Celery acknowledge a failed task, losing the step.
        log.warning("step %s of run %s: Redis unreachable (%s), requeued", node_id, run_id, exc)
        raise Reject(exc, requeue=True) from exc
    except Exception as exc:  # noqa: BLE001 - whatever ends a step, it is recorded
        # Outside the narrow handling of user code: a soft time limit while rendering
        # ``with:``, MemoryError, a value the record cannot encode, a plan that is gone.
        # Celery would acknowledge the message and the run would stay running for ever.
        settle(eng, x, run_id, node_id, path, exc)


def settle(
    eng: Engine,
    x: Execution | None,
    run_id: str,
    node_id: str,
    path: list[int],
    exc: Exception,
) -> None:
    """End a step that raised outside its error handling: failed (or retried under its
    policy) and handed to what encloses it; the run itself fails when no plan is at hand."""
    text = _text(exc)
    log.error("step %s of run %s ended by %s: %s", node_id, run_id, type(exc).__name__, text)
    if x is not None:
        try:
            if isinstance(exc, SoftTimeLimitExceeded):
                x._failed(exc, None, None)
            else:
                x._failed(PermanentError(text), None, None, error_type=type(exc).__name__)
            return
        except (Retry, Ignore, Reject, StepError):
            raise
        except Exception as again:  # noqa: BLE001 - recording failed too: fail the run
            exc, text = again, _text(again)
    error = {
        "type": type(exc).__name__,
        "message": f"step {node_key(node_id, path)}: {text}"[:2000],
        "step": node_key(node_id, path),
    }
    with contextlib.suppress(redis.ResponseError):  # the run ended meanwhile
        eng.store.move_run(
            run_id,
            ("running", "pending", "waiting"),
            "failed",
            {"ts": time.time(), "type": "run.failed", "step": "", "error": error},
            {"error": error, "finished_at": time.time()},
        )
    raise StepError(mask(f"{error['type']}: {error['message']}")) from None
