"""The generic step task: what a worker does with one ``orchestrator.step`` message.

A message names a run, a flow version, a step and its forEach index path. The
worker reads what the step needs from Redis and marks it running (one round trip),
does the step's work (calls the user's Celery task in-process, joins a parallel,
or publishes the children of a runtime structure), and records the outcome together
with whatever ends with it (enclosing sequences, the run) in one more round trip.
When the message ends a canvas (``tail``), the worker continues the run: it publishes
the next segment or counts a fan-in arrival.

Celery may deliver a message twice (late acks, a worker lost, the visibility
timeout). Every transition is compare-and-set in Lua, so a step that ended is never
run or recorded again; a duplicate only re-publishes the continuation, which is
itself deduplicated downstream.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import json
import logging
import os
import secrets
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis
from billiard.einfo import ExceptionWithTraceback
from celery import Celery, Task, shared_task, signals
from celery._state import _task_stack
from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded
from kombu.exceptions import OperationalError

from . import expressions, httpcalls, procgroup
from .compiler import STEP_TASK, CanvasBuilder
from .counters import Counts, run_counts, step_counts
from .errors import (
    ExpressionError,
    FlowStopped,
    IdempotencyConflict,
    LimitExceeded,
    NotFound,
    OrchestratorError,
    StepError,
)
from .inputs import validate_inputs
from .limits import check_value
from .model import ServiceSpec
from .plan import Node, Plan, PlanCache, StepAddress, node_key
from .policy import retry_countdown
from .publishing import publish
from .settings import Settings
from .status import ENDED
from .store import NO_OUTPUT, RedisStore
from .variables import (
    VariableMap,
    install_log_filter,
    known_secrets,
    mask,
    mask_exception,
    safe_text,
)

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


class PermanentError(Exception):
    """A step error that retrying cannot fix (bad expression, unknown task, non-JSON output)."""


class WorkerLost(Exception):
    """The process running a step died, as many times as ``max_deliveries`` allows."""


class Engine:
    """Per worker process: the store and a cache of plans by flow version."""

    def __init__(self, app: Celery, settings: Settings):
        self.app, self.settings = app, settings
        self.store = RedisStore(settings)
        self._plans = PlanCache(settings, self.store.get_definition)
        expressions.configure(settings.expression_max_work, settings.expression_max_seconds)

    def plan(self, flow: str, version: str) -> Plan:
        try:
            return self._plans.get(flow, version)
        except NotFound as exc:
            raise PermanentError(str(exc)) from exc


_engines: dict[tuple[int, int], Engine] = {}


def engine_for(app: Celery) -> Engine:
    """The process's engine for ``app`` (one per process: connections do not cross a fork)."""
    key = (os.getpid(), id(app))
    eng = _engines.get(key)
    if eng is None:
        settings = getattr(app.conf, "orchestrator_settings", None)
        if settings is None:
            from .settings import get_settings

            settings = get_settings()
        eng = _engines[key] = Engine(app, settings)
    return eng


def drop_engine(app: Celery) -> None:
    """Forget and close this process's engine for ``app``, an app being thrown away.

    The cache is keyed by ``id(app)``, which a later app may reuse; the in-process
    test worker (:mod:`orchestrator.testing`) calls this when its app is done.
    """
    eng = _engines.pop((os.getpid(), id(app)), None)
    if eng is not None:
        eng.store.close()


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
            x.run()
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


def _text(exc: BaseException) -> str:
    """An exception's message, even when its ``__str__`` raises; at most 2,000 characters."""
    try:
        return str(exc)[:2000] or type(exc).__name__
    except Exception:  # noqa: BLE001 - a broken __str__ must not stop the recording
        return f"{type(exc).__name__} (its message could not be read)"


_READ = object()  # "the output is not at hand: read it from the store"


class Execution:
    """One delivery of one step message (or the end of a step group it completes)."""

    def __init__(
        self,
        eng: Engine,
        task: Task,
        plan: Plan,
        node: Node,
        run_id: str,
        path: tuple[int, ...],
        tail: bool,
    ):
        self.eng, self.store, self.task, self.plan = eng, eng.store, task, plan
        self.node, self.run_id, self.path, self.tail = node, run_id, path, tail
        self.key = node_key(node.id, path)
        self.deferred, self.phase, self.rindex, self.join = 0, None, 0, False
        req = task.request
        self.attempt = (req.retries or 0) + 1
        self.task_id = req.id or ""
        self.worker = f"{req.hostname or 'local'}:{os.getpid()}"
        self.started_at = time.time()
        self.values: dict[str, Any] = {}

    def _for(self, node: Node, path: tuple[int, ...]) -> Execution:
        """The execution that ends ``node`` (a step group) from within this message."""
        x = Execution(self.eng, self.task, self.plan, node, self.run_id, path, True)
        x.phase, x.rindex = self.phase, self.rindex
        return x

    @property
    def recovery(self) -> bool:
        return self.phase == "recovery"

    @property
    def address(self) -> StepAddress:
        """This step instance, as timers, watchers and a child run's ``parent`` name it."""
        return StepAddress(self.run_id, self.plan.name, self.plan.version, self.node.id, self.path)

    def _kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"deferred": self.deferred}
        if self.phase:
            kw.update(phase=self.phase, rindex=self.rindex)
        return kw

    def _builder(self) -> CanvasBuilder:
        kw = {"phase": self.phase, "rindex": self.rindex} if self.phase else None
        return CanvasBuilder(self.task.app, self.plan, self.run_id, kw)

    # -- entry ----------------------------------------------------------------------------

    def run(self) -> None:
        handler = {
            "task": self._run_task,
            "service": self._run_task,
            "http": self._run_task,
            "parallel": self._run_parallel,
            "sequence": self._run_sequence,
            "forEach": self._run_foreach,
            "switch": self._run_switch,
            "try": self._run_try,
            "subflow": self._run_subflow,
            "approval": self._run_approval,
            "sleep": self._run_sleep,
            "wait": self._run_wait,
        }.get(self.node.kind)
        if handler is None:
            self._fail(PermanentError(f"step kind {self.node.kind!r} is not supported"))
        else:
            handler()

    # -- reading state --------------------------------------------------------------------

    def _ref_key(self, step_id: str) -> str:
        ref = self.plan.nodes[step_id]
        return node_key(step_id, self.path[: ref.foreach_depth])

    def _fields(self, refs: set[str], final: bool) -> list[str]:
        node = self.node
        reads_inputs = "inputs" in node.names or (final and self.plan.outputs_read_inputs)
        fields = ["inputs"] if reads_inputs else []
        names = set(refs)
        if final:
            names |= self.plan.output_refs
            fields.append("created_at")  # the run's duration, for /metrics
        for sid in sorted(names):
            if sid in self.plan.nodes:
                k = self._ref_key(sid)
                fields += [f"s:{k}", f"o:{k}"]
        if node.foreach_owner is not None and "item" in node.names:
            fe = self.plan.nodes[node.foreach_owner]
            fields.append(f"i:{node_key(fe.id, self.path[: fe.foreach_depth + 1])}")
        if node.catch_owner is not None:
            fields.append(f"e:{self._ref_key(node.catch_owner)}")
        return fields

    def _read(self, fields: list[str]) -> None:
        fields = [f for f in fields if f not in self.values]
        self.values.update(zip(fields, self.store.read_fields(self.run_id, fields), strict=True))

    def _begin(self, mark: bool, fields: list[str]) -> str:
        rec = self._running_record() if mark else None
        event = self._event("step.started") if mark else None
        verdict, _status, rec, values = self.store.begin_step(
            self.run_id, self.key, self.task_id, mark, rec, event, fields, self.recovery
        )
        self.values.update(zip(fields, values, strict=True))
        if verdict == "lost":
            return self._lost(rec or {})
        return verdict

    def _lost(self, rec: dict[str, Any]) -> str:
        """This message again after the execution it started died: run the step again,
        unless the hard time limit killed it (a failed attempt: retried under the step's
        policy) or its worker died ``max_deliveries`` times (the attempt failed)."""
        deaths, why = rec.get("lost", 1), rec.get("lost_why", "died")
        limit = self.eng.settings.max_deliveries
        if why == "timeout":
            self._failed(SoftTimeLimitExceeded(), None, None)
            return "settled"
        if deaths >= limit:
            self._failed(
                WorkerLost(
                    f"the worker running step {self.key!r} died {deaths} times (killed, "
                    f"exited or out of memory); limit ORCHESTRATOR_MAX_DELIVERIES={limit}"
                ),
                None,
                None,
            )
            return "settled"
        log.warning(
            "step %s of run %s: its worker died (%d); running it again",
            self.key,
            self.run_id,
            deaths,
        )
        return "run"

    def _context(self) -> dict[str, Any]:
        v = self.values
        steps: dict[str, Any] = {}
        for field, raw in v.items():
            if not field.startswith("s:"):
                continue
            k = field[2:]
            sid = k.split("[", 1)[0]
            rec = json.loads(raw) if raw else {}
            out_raw = v.get(f"o:{k}")
            steps[sid] = {
                "output": json.loads(out_raw) if out_raw else None,
                "status": rec.get("status"),
                "error": rec.get("error"),
                "attempts": rec.get("attempts", 0),
            }
        ctx: dict[str, Any] = {
            "inputs": json.loads(v["inputs"]) if v.get("inputs") else {},
            "steps": _Steps(steps),
            "run": {"id": self.run_id, "flow": self.plan.name},
            "vars": VariableMap(lambda: self.store.resources("Variable")),
        }
        node = self.node
        if node.foreach_owner is not None:
            fe = self.plan.nodes[node.foreach_owner]
            raw = v.get(f"i:{node_key(fe.id, self.path[: fe.foreach_depth + 1])}")
            ctx["item"] = json.loads(raw) if raw else None
            ctx["index"] = self.path[fe.foreach_depth]
        if node.catch_owner is not None:
            raw = v.get(f"e:{self._ref_key(node.catch_owner)}")
            ctx["error"] = json.loads(raw) if raw else None
        return ctx

    def _output_of(self, key: str) -> Any:
        raw = self.store.read_fields(self.run_id, [f"o:{key}"])[0]
        return json.loads(raw) if raw else None

    # -- records --------------------------------------------------------------------------

    def _running_record(self) -> dict[str, Any]:
        rec = {
            "status": "running",
            "attempts": self.attempt,
            "started_at": self.started_at,
            "worker": self.worker,
            "task_id": self.task_id,
        }
        if self.eng.settings.heartbeat_s > 0:  # alive this long before its first heartbeat
            rec["lease"] = self.eng.settings.lease_s
        return rec

    def _adopt(self) -> None:
        """Keep the start of a step group that this message ends (it started elsewhere)."""
        raw = self.values.get(f"s:{self.key}")
        if raw is None:
            self._read([f"s:{self.key}"])
            raw = self.values.get(f"s:{self.key}")
        if raw:
            rec = json.loads(raw)
            self.started_at = rec.get("started_at", self.started_at)
            self.attempt = rec.get("attempts", self.attempt)
            self.worker = rec.get("worker", self.worker)
            self.task_id = rec.get("task_id", self.task_id)

    def _event(self, type_: str, key: str | None = None, **data: Any) -> dict[str, Any]:
        e = {"ts": time.time(), "type": type_, "step": self.key if key is None else key}
        if type_ == "step.started":
            e.update(attempt=self.attempt, worker=self.worker)
        e.update({k: v for k, v in data.items() if v is not None})
        return e

    def _record(self, status: str, **extra: Any) -> dict[str, Any]:
        rec = {
            "status": status,
            "attempts": self.attempt,
            "started_at": self.started_at,
            "finished_at": time.time(),
            "worker": self.worker,
            "task_id": self.task_id,
        }
        rec.update({k: v for k, v in extra.items() if v is not None})
        return rec

    def _counts(self, status: str, retried: bool = False) -> Counts:
        """What ``/metrics`` counts for this step's end: an attempt's duration when the
        step did work here (not a skip, a wait or a step group), and a retry."""
        worked = self.node.kind in ("task", "service", "http") and status != "skipped"
        seconds = time.time() - self.started_at if worked else None
        return step_counts(self.plan.name, seconds, retried)

    def _skip_records(self, nodes: list[Node], path: tuple[int, ...]) -> list[tuple]:
        now = time.time()
        rec = {"status": "skipped", "attempts": 0, "started_at": now, "finished_at": now}
        return [(node_key(n.id, path), rec, NO_OUTPUT) for n in nodes]

    # -- kinds ----------------------------------------------------------------------------

    def _run_task(self) -> None:
        node, step = self.node, self.node.step
        if not self._rate_ok():
            return
        final = self.tail and self.plan.is_final(node)
        verdict = self._begin(mark=step.when is None, fields=self._fields(node.refs, final))
        if self._stop(verdict):
            return
        ctx = self._context()
        try:
            if step.when is not None:
                if not expressions.evaluate_condition(step.when, ctx):
                    self._finish("skipped", None, ctx)
                    return
                if self._stop(self._begin(mark=True, fields=[])):
                    return
            kwargs = expressions.render(
                step.http.model_dump(by_alias=True, exclude_none=True)  # type: ignore[union-attr]
                if node.kind == "http"
                else step.with_,  # type: ignore[union-attr]
                ctx,
            )
        except ExpressionError as exc:
            self._failed(PermanentError(str(exc)), None, ctx)
            return
        try:
            if node.kind == "task":
                output = self._call(step.task, kwargs)  # type: ignore[union-attr]
            else:
                output = self._checked_output(self._call_http(kwargs, ctx))
        except Exception as exc:  # noqa: BLE001 - any failure of user code is the step's failure
            if isinstance(exc, SoftTimeLimitExceeded):
                procgroup.kill_descendants()  # the step's subprocesses end with it
            self._failed(exc, kwargs, ctx)
            return
        self._finish("succeeded", output, ctx, input=kwargs)

    def _call_http(self, rendered: dict[str, Any], ctx: dict[str, Any]) -> Any:
        """An ``http`` or ``service`` step's call; HttpError that cannot heal is permanent."""
        step = self.node.step
        defaults = self.plan.resource.spec.defaults
        timeout = step.timeout if step.timeout is not None else (defaults and defaults.timeout)
        try:
            if self.node.kind == "http":
                return httpcalls.request(rendered, timeout or None)
            name = step.service  # type: ignore[union-attr]
            raw = self.store.resource("Service", name)
            if raw is None:
                raise PermanentError(f"service {name!r} is not deployed")
            spec = ServiceSpec.model_validate(raw)
            address = expressions.render(spec.address, ctx)
            headers = expressions.render(spec.headers, ctx)
            return httpcalls.call_service(name, spec, rendered, address, headers, timeout or None)
        except httpcalls.HttpError as exc:
            if exc.retryable:
                raise
            raise PermanentError(str(exc)) from None
        except ExpressionError as exc:
            raise PermanentError(str(exc)) from None

    def _run_parallel(self) -> None:
        node = self.node
        branches = [b.id for b in node.step.parallel]  # type: ignore[union-attr]
        if self.join:  # the chord's body: every branch has ended, collect their outputs
            final = self.tail and self.plan.is_final(node)
            fields = self._fields(set(branches), final)
            if self._stop(self._begin(mark=True, fields=fields)):
                return
            ctx = self._context()
            self._finish("succeeded", self._branch_outputs(ctx), ctx)
            return
        if not self._gate():
            return
        builder = self._builder()
        self._publish([builder.from_node(self.plan.nodes[b], self.path) for b in branches])

    def _run_sequence(self) -> None:
        if not self._gate():
            return
        self._start_block(self.plan.blocks[f"{self.node.id}/body"], self.path)

    def _run_foreach(self) -> None:
        if not self._gate():
            return
        step = self.node.step
        ctx = self._context()
        try:
            items = expressions.parse_condition(step.for_each).evaluate(ctx)  # type: ignore
        except ExpressionError as exc:
            self._failed(PermanentError(str(exc)), None, ctx)
            return
        if not isinstance(items, list):
            self._failed(
                PermanentError(
                    f"forEach of step {self.key!r} expected a list, got {type(items).__name__}"
                ),
                None,
                ctx,
            )
            return
        if len(items) > self.eng.settings.max_foreach_items:
            self._failed(
                PermanentError(
                    f"forEach of step {self.key!r} has {len(items):,} items, over the limit of "
                    f"{self.eng.settings.max_foreach_items:,} (ORCHESTRATOR_MAX_FOREACH_ITEMS)"
                ),
                None,
                ctx,
            )
            return
        if not items:  # nothing to fan out: the step still ends and the run goes on (#3597)
            self._finish("succeeded", [], ctx)
            return
        limit = step.concurrency or len(items)  # type: ignore[union-attr]
        first = min(limit, len(items))
        self.store.foreach_start(self.run_id, self.key, items, first)
        self._dispatch_items(range(first))

    def _dispatch_items(self, indexes: Any) -> None:
        body = self.plan.blocks[f"{self.node.id}/body"]
        head = self.plan.first(body)
        builder = self._builder()
        batch = self.eng.settings.dispatch_batch
        sigs = []
        for i in indexes:
            sigs.append(builder.from_node(head, (*self.path, i)))
            if len(sigs) >= batch:
                self._publish(sigs)
                sigs = []
        if sigs:
            self._publish(sigs)

    def _run_switch(self) -> None:
        if not self._gate():
            return
        ctx = self._context()
        chosen = None
        try:
            for i, case in enumerate(self.node.step.switch):  # type: ignore[union-attr]
                if case.default is not None or expressions.evaluate_condition(case.when, ctx):
                    chosen = i
                    break
        except ExpressionError as exc:
            self._failed(PermanentError(str(exc)), None, ctx)
            return
        skipped: list[Node] = []
        for i in range(len(self.node.step.switch)):  # type: ignore[union-attr]
            if i != chosen:
                for nid in self.plan.blocks[f"{self.node.id}/case{i}"].items:
                    skipped += [self.plan.nodes[nid], *self.plan.descendants(self.plan.nodes[nid])]
        if chosen is None:
            self._finish("succeeded", None, ctx, extra=self._skip_records(skipped, self.path))
            return
        if skipped:
            self.store.complete_step(
                self.run_id, self._skip_records(skipped, self.path), [], recovery=self.recovery
            )
        self._start_block(self.plan.blocks[f"{self.node.id}/case{chosen}"], self.path)

    def _run_try(self) -> None:
        if self._gate():
            self._start_block(self.plan.blocks[f"{self.node.id}/try"], self.path)

    def _run_subflow(self) -> None:
        if not self._gate():
            return
        step = self.node.step
        name: str = step.flow  # type: ignore[union-attr]
        ctx = self._context()
        try:
            inputs = expressions.render(step.with_, ctx)  # type: ignore[union-attr]
            info = self.store.flow_info(name)
            if info is None:
                raise PermanentError(f"flow {name!r} is not deployed")
            if info.get("state") == "stopped":
                raise PermanentError(
                    f"flow {name!r} is stopped: its subflow runs do not start "
                    f"(`orchestrator flows start {name}`)"
                )
            depth = self._depth() + 1
            limit = self.eng.settings.max_subflow_depth
            if depth > limit:
                raise PermanentError(
                    f"subflow {name!r} would be {depth} runs deep, over the limit of {limit} "
                    "(ORCHESTRATOR_MAX_SUBFLOW_DEPTH): does the flow call itself?"
                )
            child_plan = self.eng.plan(name, info["version"])
            values = validate_inputs(child_plan.resource.spec.inputs, inputs)
            parent = self.address.parent(depth)
            child, _ = start_run(
                self.store,
                self.task.app,
                child_plan,
                values,
                idempotency_key=f"{self.run_id}:{self.key}",
                parent=parent,
            )
        except (ExpressionError, OrchestratorError, PermanentError) as exc:
            self._failed(PermanentError(str(exc)), None, ctx)
            return
        self.store.set_fields(self.run_id, {f"c:{self.key}": child})
        self.store.complete_step(
            self.run_id, [], [self._event("subflow.started", child=child)], recovery=self.recovery
        )

    def _depth(self) -> int:
        """How many runs deep this run is: 0 at the top, its parent's depth + 1 below."""
        raw = self.store.read_fields(self.run_id, ["parent"])[0]
        parent = json.loads(raw) if raw else None
        return int(parent.get("depth", 1)) if parent else 0

    # -- durable waits: park the step, free the worker, resume on a signal or a timer --------

    def _park(self, wait: dict[str, Any], ctx: dict[str, Any]) -> None:
        """Mark the step waiting; a signal, decision, watched run or the timer tick wakes it."""
        rec = self._running_record()
        rec["status"] = "waiting"
        event = self._event(
            "step.waiting", wait={k: v for k, v in wait.items() if k not in ("kind",)}
        )
        verdict, payload = self.store.park(self.run_id, self.key, rec, wait, event, self.address)
        if verdict == "signalled":  # the signal came first and was kept for this wait
            self._finish("succeeded", payload, ctx)

    def _run_sleep(self) -> None:
        if not self._gate():
            return
        step, ctx = self.node.step, self._context()
        now = time.time()
        try:
            if step.sleep is not None:  # type: ignore[union-attr]
                due = now + step.sleep  # type: ignore[union-attr]
            else:
                due = to_epoch(expressions.render(step.until, ctx))  # type: ignore[union-attr]
        except (ExpressionError, ValueError) as exc:
            self._failed(PermanentError(f"until: {exc}"), None, ctx)
            return
        if due <= now:
            self._finish("succeeded", {"until": iso(due)}, ctx)
            return
        self._park({"kind": "sleep", "deadline": due}, ctx)

    def _run_wait(self) -> None:
        if not self._gate():
            return
        spec, ctx = self.node.step.wait, self._context()  # type: ignore[union-attr]
        deadline = time.time() + spec.timeout if spec.timeout is not None else None
        if spec.signal is not None:
            self._park({"kind": "signal", "signal": spec.signal, "deadline": deadline}, ctx)
            return
        try:
            target = str(expressions.render(spec.run, ctx))
        except ExpressionError as exc:
            self._failed(PermanentError(str(exc)), None, ctx)
            return
        wait = {
            "kind": "run",
            "run": target,
            "flow": spec.flow,
            "status": spec.status,
            "deadline": deadline,
        }
        outcome = self._run_outcome(wait)
        if outcome is not None:
            self._conclude(outcome, ctx)
            return
        self._park(wait, ctx)
        self.store.add_watcher(target, self.address)
        if self._run_outcome(wait) is not None:  # it ended while we registered: wake now
            self.wake()

    def _run_approval(self) -> None:
        if not self._gate():
            return
        spec, ctx = self.node.step.approval, self._context()  # type: ignore[union-attr]
        try:
            approvers = [str(a) for a in expressions.render(spec.approvers, ctx)]
            escalate = [str(a) for a in expressions.render(spec.escalate_to or [], ctx)]
            message = expressions.render(spec.message, ctx) if spec.message else None
        except ExpressionError as exc:
            self._failed(PermanentError(str(exc)), None, ctx)
            return
        deadline = time.time() + spec.timeout if spec.timeout is not None else None
        self._park(
            {
                "kind": "approval",
                "approvers": approvers,
                "escalateTo": escalate,
                "onTimeout": spec.on_timeout,
                "timeout": spec.timeout,
                "deadline": deadline,
                "message": message,
            },
            ctx,
        )

    def wake(self) -> None:
        """Something woke a parked step: end it if its wait is over, else leave it parked."""
        raw, decision, payload = self.store.read_fields(
            self.run_id, [f"w:{self.key}", f"d:{self.key}", f"sp:{self.key}"]
        )
        if raw is None:
            return  # not waiting (already resumed, or the run moved on)
        wait = json.loads(raw)
        now = time.time()
        due = wait.get("deadline")
        expired = due is not None and now >= due - 0.001
        kind = wait["kind"]
        outcome: tuple[str, Any] | None = None
        if kind == "sleep":
            outcome = ("succeeded", {"until": iso(due)}) if expired else None
        elif kind == "signal":
            if payload is not None:
                outcome = ("succeeded", json.loads(payload))
            elif expired:
                outcome = ("timeout", f"signal {wait['signal']!r} did not arrive in time")
        elif kind == "run":
            outcome = self._run_outcome(wait)
            if outcome is None and expired:
                outcome = ("timeout", f"run {wait['run']} did not reach {wait['status']} in time")
        elif kind == "approval":
            if decision is not None:
                outcome = ("succeeded", json.loads(decision))
            elif expired:
                if wait["onTimeout"] == "escalate" and not wait.get("escalated"):
                    self._escalate(wait, now)
                    return
                verdict = "approved" if wait["onTimeout"] == "approve" else "rejected"
                outcome = (
                    "succeeded",
                    {
                        "decision": verdict,
                        "by": None,
                        "comment": "no decision before the timeout",
                        "at": iso(now),
                        "timedOut": True,
                    },
                )
        if outcome is None:
            if due is not None and not expired:  # woken early: keep the timer
                self.store.add_timer(self.address, due)
            return
        if not self.store.unpark(self.run_id, self.key):
            return  # someone else resumed it
        self._read(
            [
                *self._fields(self.node.refs, self.tail and self.plan.is_final(self.node)),
                f"s:{self.key}",
            ]
        )
        self._adopt()
        self._conclude(outcome, self._context())

    def _conclude(self, outcome: tuple[str, Any], ctx: dict[str, Any]) -> None:
        status, value = outcome
        if status == "succeeded":
            self._finish("succeeded", value, ctx)
        else:
            self._failed(
                PermanentError(value),
                None,
                ctx,
                error_type="Timeout" if status == "timeout" else "WaitFailed",
            )

    def _run_outcome(self, wait: dict[str, Any]) -> tuple[str, Any] | None:
        """How a wait on another run ends now, or None while that run goes on."""
        flow, status, outputs = self.store.read_fields(wait["run"], ["flow", "status", "outputs"])
        if status is None:
            return ("failed", f"run {wait['run']} does not exist")
        if wait.get("flow") and flow != wait["flow"]:
            return ("failed", f"run {wait['run']} is a run of {flow}, not {wait['flow']}")
        if status == wait["status"]:
            return (
                "succeeded",
                {
                    "run": wait["run"],
                    "status": status,
                    "outputs": json.loads(outputs) if outputs else None,
                },
            )
        if status in ENDED:
            return ("failed", f"run {wait['run']} ended {status}, not {wait['status']}")
        return None

    def _escalate(self, wait: dict[str, Any], now: float) -> None:
        """No decision in time: the escalation approvers take over and the wait goes on."""
        wait.update(
            approvers=wait["escalateTo"], escalated=True, deadline=now + (wait.get("timeout") or 0)
        )
        self.store.set_fields(self.run_id, {f"w:{self.key}": wait})
        self.store.complete_step(
            self.run_id,
            [],
            [self._event("step.escalated", approvers=wait["approvers"])],
            recovery=self.recovery,
        )
        self.store.add_timer(self.address, wait["deadline"])

    def resume_subflow(self, child_id: str) -> None:
        """The child run ended: end this step with its outputs, or fail with its error."""
        status, outputs, error = self.store.read_fields(child_id, ["status", "outputs", "error"])
        self._read(
            [*self._fields(set(), self.tail and self.plan.is_final(self.node)), f"s:{self.key}"]
        )
        self._adopt()
        ctx = self._context()
        if status == "succeeded":
            self._finish("succeeded", json.loads(outputs) if outputs else {}, ctx)
            return
        err = json.loads(error) if error else {}
        message = f"child run {child_id} ended {status}: {err.get('message', '')}"
        self._failed(PermanentError(message), None, ctx, error_type="SubflowFailed")

    def _gate(self) -> bool:
        """Start a step group: True to go on, False when skipped, stopped or failed."""
        when = self.node.step.when
        verdict = self._begin(mark=when is None, fields=self._fields(self.node.refs, False))
        if self._stop(verdict):
            return False
        if when is None:
            return True
        ctx = self._context()
        try:
            go = expressions.evaluate_condition(when, ctx)
        except ExpressionError as exc:
            self._failed(PermanentError(str(exc)), None, ctx)
            return False
        if not go:
            skipped = self._skip_records(self.plan.descendants(self.node), self.path)
            self._finish("skipped", None, ctx, extra=skipped)
            return False
        return not self._stop(self._begin(mark=True, fields=[]))

    def _start_block(self, block: Any, path: tuple[int, ...]) -> None:
        self._publish([self._builder().from_node(self.plan.first(block), path)])

    def _branch_outputs(self, ctx: dict[str, Any]) -> dict[str, Any]:
        steps = ctx["steps"]
        return {b.id: steps.get(b.id, {}).get("output") for b in self.node.step.parallel}  # type: ignore[union-attr]

    # -- calling the user's task ----------------------------------------------------------

    def _call(self, name: str, kwargs: dict[str, Any]) -> Any:
        task = self.task.app.tasks.get(name)
        if task is None:
            raise PermanentError(
                f"task {name!r} is not registered on worker {self.worker}: add its module to "
                "ORCHESTRATOR_TASK_MODULES (or --include)"
            )
        ctx = StepContext(self.run_id, self.plan.name, self.key, self.attempt, self.worker)
        with _step_context(ctx):
            if type(task).__call__ is Task.__call__:
                # Run it as Celery would, with a request that says which step it serves.
                _task_stack.push(task)
                task.push_request(
                    id=ctx.idempotency_key,
                    args=[],
                    kwargs=kwargs,
                    retries=self.attempt - 1,
                    hostname=self.task.request.hostname,
                    is_eager=False,
                    delivery_info=self.task.request.delivery_info,
                    headers={"orchestrator": {"run_id": self.run_id, "step": self.key}},
                )
                try:
                    output = task.run(**kwargs)
                finally:
                    task.pop_request()
                    _task_stack.pop()
            else:
                output = task(**kwargs)
        return self._checked_output(output)

    def _checked_output(self, output: Any) -> Any:
        """The step's output, refused (permanently) when JSON cannot carry it or it is over
        the output size or nesting limits: it would break every reader of the run."""
        limits = self.eng.settings
        try:
            check_value(
                output,
                f"output of step {self.key!r}",
                max_bytes=limits.max_output_bytes,
                max_nesting=limits.max_nesting,
                size_limit="max_output_bytes",
            )
        except LimitExceeded as exc:
            raise PermanentError(f"{exc.field} {exc.reason}") from None
        return output

    def _rate_ok(self) -> bool:
        """Hold a step back (without spending an attempt) while its rate limit is used up."""
        rate = self.node.options.get("rate_limit")
        if not rate:
            return True
        count, unit = rate.split("/")
        per = {"s": 1.0, "m": 60.0, "h": 3600.0}[unit]
        n = float(count)
        window, limit = (per, int(n)) if n >= 1 else (per / n, 1)
        now = time.time()
        slot = int(now // window)
        if self.store.rate_hit(self.plan.name, self.node.id, slot, window) <= limit:
            return True
        self.deferred += 1
        raise self.task.retry(
            countdown=round((slot + 1) * window - now, 3) + 0.001,
            max_retries=None,
            kwargs=self._kwargs(),
        )

    # -- endings --------------------------------------------------------------------------

    def _stop(self, verdict: str) -> bool:
        """Handle a verdict that means "do not execute"; True when the caller must return."""
        if verdict == "run":
            return False
        if verdict == "settled":  # a lost delivery, recorded as the attempt's end
            return True
        if verdict == "done" and self.tail:
            # A redelivered message whose step had ended: the run may not have moved on
            # (the worker died between recording and publishing), so continue again.
            self._advance(_READ)
        if verdict in ("busy", "inactive", "missing"):
            raise Ignore()
        if verdict == "held":
            # This message again while the delivery that runs the step still holds its
            # lease (recovery.py): look again after a heartbeat rather than run the step
            # twice at once, or drop the one message that recovers it if that delivery dies.
            self.deferred += 1
            kwargs = {**self._kwargs(), "join": True} if self.join else self._kwargs()
            raise self.task.retry(
                countdown=self.eng.settings.heartbeat_s or 1.0, max_retries=None, kwargs=kwargs
            )
        return True

    def _finish(
        self,
        status: str,
        output: Any,
        ctx: dict[str, Any] | None = None,
        error: dict | None = None,
        extra: list | None = None,
        input: Any = None,
    ) -> None:
        """Record the step's end, the sequences it closes and maybe the run's; then continue."""
        node, path = self.node, self.path
        records = [
            (
                self.key,
                self._record(status, error=error, input=input),
                output if status != "skipped" else NO_OUTPUT,
            )
        ]
        records += extra or []
        events = [self._event(f"step.{status}", error=error)]
        for seq in self.plan.completed_sequences(node):
            k = node_key(seq.id, path[: seq.foreach_depth])
            records.append((k, self._record("succeeded"), output))
            events.append(self._event("step.succeeded", key=k))
        final = None
        final_counts: Counts = ()
        if self.tail and not self.recovery and self.plan.is_final(node):
            final = self._final(ctx, node.id, status, output, error)
            events.append(self._event(f"run.{final['status']}", key="", error=final.get("error")))
            at = (self.values.get("created_at"), final["finished_at"])
            final_counts = run_counts(self.plan.name, final["status"], *at)
        compensable = (
            [json.dumps([node.id, list(path)])]
            if status == "succeeded" and node.id in self.plan.compensable
            else []
        )
        res = self.store.complete_step(
            self.run_id,
            records,
            events,
            final,
            compensable=compensable,
            recovery=self.recovery,
            counts=self._counts(status),
            final_counts=final_counts,
        )
        if res != "ok":
            return
        if final is not None:
            self._notify_parent()
        elif self.tail:
            self._advance(output)

    def _final(
        self,
        ctx: dict[str, Any] | None,
        last: str,
        status: str,
        output: Any,
        error: dict | None = None,
    ) -> dict[str, Any]:
        """The run's outcome once its last step ended: outputs rendered from step outputs."""
        self._read(self._fields(set(), final=True))
        ctx = self._context()
        steps = ctx["steps"]
        steps[last] = {
            **steps.get(last, {}),
            "output": output,
            "status": status,
            "error": error,
            "attempts": self.attempt,
        }
        for seq in self.plan.completed_sequences(self.node):
            steps[seq.id] = {"output": output, "status": "succeeded"}
        now = time.time()
        try:
            outputs = expressions.render(self.plan.resource.spec.outputs, ctx)
        except ExpressionError as exc:
            return {
                "status": "failed",
                "finished_at": now,
                "error": {"type": "OutputError", "message": f"outputs: {exc}", "step": None},
            }
        return {"status": "succeeded", "outputs": outputs, "finished_at": now}

    def _failed(
        self,
        exc: BaseException,
        kwargs: Any,
        ctx: dict[str, Any] | None,
        error_type: str | None = None,
    ) -> None:
        """A step raised: retry it under its policy, or let it fail (the run or just itself)."""
        error = error_info(exc, self.key)
        if error_type:
            error["type"] = error_type
        policy = self.node.retry
        retryable = not isinstance(exc, PermanentError)
        if retryable and self.attempt < (policy.max_attempts or 1):
            delay = retry_countdown(policy, self.attempt)
            # A countdown is held unacked by a worker: it must end before the visibility
            # timeout, or the broker would deliver the message again meanwhile (celery#4766).
            delay = min(delay, self.eng.settings.visibility_timeout_s * 0.5)
            rec = self._record("retrying", error=error, input=kwargs)
            rec.pop("finished_at", None)
            res = self.store.complete_step(
                self.run_id,
                [(self.key, rec, NO_OUTPUT)],
                [self._event("step.retrying", error=error, delay=delay)],
                recovery=self.recovery,
                counts=self._counts("retrying", retried=True),
            )
            if res != "ok":
                raise Ignore()
            raise self.task.retry(countdown=delay, max_retries=None, exc=exc, kwargs=self._kwargs())
        if self.node.on_error == "continue" or self.recovery:
            # Compensations and onFailure steps never stop the recovery that runs them.
            self._finish("failed", None, ctx, error=error, input=kwargs)
            return
        self._fail(exc, kwargs, error)

    def _fail(self, exc: BaseException, kwargs: Any = None, error: dict | None = None) -> None:
        """Record the step failed and hand the failure to whatever encloses it."""
        error = error or error_info(exc, self.key)
        res = self.store.complete_step(
            self.run_id,
            [(self.key, self._record("failed", error=error, input=kwargs), None)],
            [self._event("step.failed", error=error)],
            recovery=self.recovery,
            counts=self._counts("failed"),
        )
        if res == "ok":
            self._propagate(error)
        raise StepError(mask(f"{error['type']}: {error['message']}")) from None

    def _propagate(self, error: dict[str, Any]) -> None:
        """Climb from a failed step to the try that catches it, or fail the run."""
        node, path = self.node, self.path
        while True:
            block = node.block
            if block.owner is None:
                if block.role == "top":
                    self._start_recovery(error)
                return
            owner = self.plan.nodes[block.owner]
            opath = path[: owner.foreach_depth]
            okey = node_key(owner.id, opath)
            if owner.kind == "try" and block.role in ("try", "catch"):
                step = owner.step
                if block.role == "try" and step.catch:  # type: ignore[union-attr]
                    self.store.set_fields(self.run_id, {f"e:{okey}": error})
                    self._start_block(self.plan.blocks[f"{owner.id}/catch"], opath)
                    return
                if step.finally_:  # type: ignore[union-attr]
                    self.store.set_fields(self.run_id, {f"pe:{okey}": error})
                    self._start_block(self.plan.blocks[f"{owner.id}/finally"], opath)
                    return
            up = self._for(owner, opath)
            up._adopt()
            if owner.on_error == "continue":
                up._finish("failed", None, error=error)
                return
            res = self.store.complete_step(
                self.run_id,
                [(okey, up._record("failed", error=error), None)],
                [up._event("step.failed", error=error)],
                recovery=self.recovery,
            )
            if res != "ok":
                return  # another failure got here first, or the run has ended
            node, path = owner, opath

    # -- recovery: saga compensation, then onFailure ---------------------------------------

    def _start_recovery(self, error: dict[str, Any]) -> None:
        done = self.store.begin_recovery(
            self.run_id, error, self._event("run.failing", key="", error=error)
        )
        if done is None:
            return
        order = [json.loads(e) for e in reversed(done)]  # undo in reverse completion order
        self.store.set_fields(self.run_id, {"recovery": order})
        self.phase = "recovery"
        self._recovery_step(order, 0)

    def _recovery_step(self, order: list, i: int) -> None:
        self.phase = "recovery"
        if i < len(order):
            step_id, path = order[i]
            comp = self.plan.first(self.plan.blocks[f"{step_id}/compensate"])
            self.rindex = i
            self._publish([self._builder().from_node(comp, tuple(path))])
        elif self.plan.on_failure is not None and self.node.block.role != "onFailure":
            self.rindex = len(order)
            self._publish([self._builder().from_node(self.plan.first(self.plan.on_failure))])
        else:
            self._end_recovery(order)

    def _end_recovery(self, order: list) -> None:
        keys = [
            node_key(self.plan.first(self.plan.blocks[f"{sid}/compensate"]).id, tuple(p))
            for sid, p in order
        ]
        raw = self.store.read_fields(self.run_id, [f"s:{k}" for k in keys]) if keys else []
        ok = bool(keys) and all(r and json.loads(r).get("status") == "succeeded" for r in raw)
        status = "compensated" if ok else "failed"
        try:
            self.store.move_run(
                self.run_id,
                ("running", "pending", "waiting"),
                status,
                self._event(f"run.{status}", key=""),
                {"finished_at": time.time()},
            )
        except redis.ResponseError:
            return  # cancelled meanwhile
        self._notify_parent()

    def _recovery_order(self) -> list:
        raw = self.store.read_fields(self.run_id, ["recovery"])[0]
        return json.loads(raw) if raw else []

    # -- continuing the run ---------------------------------------------------------------

    def _advance(self, output: Any) -> None:
        """After a canvas' last step: publish what follows, or end the group that holds it."""
        node, path = self.node, self.path
        nxt = self.plan.successor(node)
        if nxt is not None:
            self._publish([self._builder().from_node(nxt, path)])
            return
        end, block = self.plan.scope_end(node)
        if block.owner is None:
            if block.role == "onFailure":
                self._end_recovery(self._recovery_order())
            return  # top level: the run's end was recorded with its last step
        if block.role == "compensate":
            self._recovery_step(self._recovery_order(), self.rindex + 1)
            return
        owner = self.plan.nodes[block.owner]
        opath = path[: owner.foreach_depth]
        okey = node_key(owner.id, opath)
        up = self._for(owner, opath)
        if owner.kind == "parallel":
            branches = owner.step.parallel  # type: ignore[union-attr]
            if self.store.fanin(self.run_id, okey, end.id, len(branches)):
                up._join_parallel()
        elif owner.kind == "forEach":
            fired, nxt_index = self.store.foreach_arrive(
                self.run_id, okey, path[owner.foreach_depth]
            )
            if nxt_index is not None:
                up._dispatch_items([nxt_index])
            if fired:
                up._join_foreach()
        elif owner.kind == "switch":
            up._end_group(self._output_of(self.key) if output is _READ else output)
        elif owner.kind == "try":
            step = owner.step
            if block.role in ("try", "catch") and step.finally_:  # type: ignore[union-attr]
                self._start_block(self.plan.blocks[f"{owner.id}/finally"], opath)
                return
            up._end_try()

    def _end_group(self, output: Any) -> None:
        self._read([*self._fields(set(), self.plan.is_final(self.node)), f"s:{self.key}"])
        self._adopt()
        self._finish("succeeded", output, self._context())

    def _join_parallel(self) -> None:
        branches = {b.id for b in self.node.step.parallel}  # type: ignore[union-attr]
        self._read([*self._fields(branches, self.plan.is_final(self.node)), f"s:{self.key}"])
        self._adopt()
        ctx = self._context()
        self._finish("succeeded", self._branch_outputs(ctx), ctx)

    def _join_foreach(self) -> None:
        n = int(self.store.read_fields(self.run_id, [f"n:{self.key}"])[0] or 0)
        body = self.plan.blocks[f"{self.node.id}/body"]
        last = self.plan.nodes[body.items[-1]]
        keys = [f"o:{node_key(last.id, (*self.path, i))}" for i in range(n)]
        raw = self.store.read_fields(self.run_id, keys)
        output = [json.loads(v) if v else None for v in raw]
        self._read([*self._fields(set(), self.plan.is_final(self.node)), f"s:{self.key}"])
        self._adopt()
        self._finish("succeeded", output, self._context())
        # Items are needed to start bodies and, in a saga, to compensate them; a finished
        # forEach of a flow without compensations lets them go.
        if not self.plan.compensable:
            self.store.delete_fields(self.run_id, [f"i:{self.key}[{i}]" for i in range(n)])

    def _end_try(self) -> None:
        step = self.node.step
        okey = self.key
        pending, caught = self.store.read_fields(self.run_id, [f"pe:{okey}", f"e:{okey}"])
        if pending:
            self._adopt()
            self._fail_group(json.loads(pending))
            return
        block = f"{self.node.id}/catch" if caught and step.catch else f"{self.node.id}/try"
        last = self.plan.nodes[self.plan.blocks[block].items[-1]]
        self._end_group(self._output_of(node_key(last.id, self.path)))

    def _fail_group(self, error: dict[str, Any]) -> None:
        """A step group fails after its finally block ran with an error still pending."""
        if self.node.on_error == "continue":
            self._finish("failed", None, error=error)
            return
        res = self.store.complete_step(
            self.run_id,
            [(self.key, self._record("failed", error=error), None)],
            [self._event("step.failed", error=error)],
            recovery=self.recovery,
        )
        if res == "ok":
            self._propagate(error)

    def _notify_parent(self) -> None:
        """The run ended: wake its parent's subflow step and steps waiting on it."""
        run_ended(self.store, self.task.app, self.eng.plan, self.run_id)

    def _publish(self, sigs: list) -> None:
        publish(self.task.app, sigs)


PlanFor = Callable[[str, str], Plan]


def run_ended(
    store: RedisStore, app: Celery, plan_for: PlanFor, run_id: str, parent_too: bool = True
) -> None:
    """Tell whoever waits on a run that it ended: its parent run (unless ``parent_too`` is
    False: the parent ended first, as when a cancel walks down a tree), and watching steps."""
    parent, watchers = store.end_listeners(run_id)
    if parent and parent_too:
        notify_parent(app, plan_for, parent, run_id)
    for address in watchers:
        wake_step(app, plan_for, address)


def _step_queue(plan_for: PlanFor, flow: str, version: str, step: str) -> str | None:
    """The queue a step's messages go to (its own, not the sender's default)."""
    try:
        return plan_for(flow, version).nodes[step].options.get("queue")
    except (KeyError, NotFound):
        return None


def wake_step(app: Celery, plan_for: PlanFor, address: StepAddress) -> None:
    """Send a parked step the message that makes it look at its wait again."""
    sig = app.signature(
        STEP_TASK,
        args=address.message_args(True),
        kwargs={"wake": True},
        immutable=True,
        shadow=f"{address.flow}.{address.key}",
        ignore_result=True,
    )
    queue = _step_queue(plan_for, address.flow, address.version, address.step)
    if queue:
        sig.set(queue=queue)
    publish(app, [sig])


def notify_parent(app: Celery, plan_for: PlanFor, parent: dict[str, Any], child_id: str) -> None:
    """Send the parent's subflow step the message that resumes it."""
    address = StepAddress.from_parent(parent)
    sig = app.signature(
        STEP_TASK,
        args=address.message_args(True),
        kwargs={"resume": child_id},
        immutable=True,
        shadow=f"{address.flow}.{address.key}",
        ignore_result=True,
    )
    queue = _step_queue(plan_for, address.flow, address.version, address.step)
    if queue:
        sig.set(queue=queue)
    publish(app, [sig])


def start_run(
    store: RedisStore,
    app: Celery,
    plan: Plan,
    inputs: dict[str, Any],
    idempotency_key: str | None = None,
    parent: dict[str, Any] | None = None,
    run_id: str | None = None,
    conflicts: bool = False,
) -> tuple[str, bool]:
    """Create a run record (once per idempotency key) and publish its first canvas.

    Returns the run id and whether this call created it (False: the key's run existed).
    Raises LimitExceeded for inputs over the size or nesting limits and, with
    ``conflicts``, IdempotencyConflict when the key's run was started with other inputs.
    Once the canvas is out the run says so (``published``): a run that stays pending
    without it (its producer died in between) is published again by the sweep.
    """
    limits = store.settings
    check_value(
        inputs,
        "inputs",
        max_bytes=limits.max_input_bytes,
        max_nesting=limits.max_nesting,
        size_limit="max_input_bytes",
    )
    run_id = run_id or new_run_id()
    if idempotency_key is not None:
        owner = store.claim_idempotency(plan.name, idempotency_key, run_id)
        if owner != run_id:
            status, stored = store.read_fields(owner, ["status", "inputs"])
            if status is not None:
                if conflicts and _differ(stored, inputs):
                    raise IdempotencyConflict(plan.name, idempotency_key, owner)
                return owner, False
        run_id = owner
    now = time.time()
    record = {
        "id": run_id,
        "flow": plan.name,
        "version": plan.version,
        "status": "pending",
        "inputs": inputs,
        "created_at": now,
        "idempotency_key": idempotency_key,
        "parent": parent,
    }
    event = {"ts": now, "type": "run.created", "step": "", "version": plan.version}
    if parent:
        event["parent"] = parent["run"]
    if not store.create_run(record, event):
        return run_id, False
    canvas = CanvasBuilder(app, plan, run_id).from_node(plan.first(plan.top))
    try:
        publish(app, [canvas])
    except Exception as exc:
        error = {"type": type(exc).__name__, "message": f"could not publish: {exc}", "step": None}
        store.move_run(
            run_id,
            ("pending",),
            "failed",
            {"ts": time.time(), "type": "run.failed", "step": "", "error": error},
            {"error": error, "finished_at": time.time()},
        )
        raise
    store.set_fields(run_id, {"published": time.time()})
    return run_id, True


def _differ(stored: str | None, inputs: dict[str, Any]) -> bool:
    """Whether a run's stored inputs are not ``inputs`` (as JSON carries them)."""
    return (json.loads(stored) if stored else {}) != json.loads(json.dumps(inputs))


def trigger_flow(
    store: RedisStore,
    app: Celery,
    plan_for: Callable[[str, str], Plan],
    flow: str,
    inputs: dict[str, Any] | None,
    idempotency_key: str | None = None,
) -> tuple[str, bool, Plan, dict[str, Any]]:
    """Start a run of the flow's current version: (run id, created, plan, inputs).

    Raises NotFound (not deployed), FlowStopped, InputError naming the field (its
    LimitExceeded kind for inputs over a limit), or IdempotencyConflict.
    """
    info = store.flow_info(flow)
    if info is None:
        raise NotFound(f"flow {flow!r} is not deployed")
    if info.get("state") == "stopped":
        raise FlowStopped(
            f"flow {flow!r} is stopped: start it with `orchestrator flows start {flow}`"
        )
    plan = plan_for(flow, info["version"])
    values = validate_inputs(plan.resource.spec.inputs, inputs)
    run_id, created = start_run(store, app, plan, values, idempotency_key, conflicts=True)
    return run_id, created, plan, values


def to_epoch(value: Any) -> float:
    """A time given as epoch seconds or ISO 8601 (UTC when it names no zone)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a time, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        return when.timestamp()
    raise ValueError(f"expected a time (ISO 8601 or epoch seconds), got {value!r}")


def iso(ts: float | None) -> str | None:
    return None if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC).isoformat()


def new_run_id() -> str:
    """Sortable by creation time (millisecond hex prefix), 64 random bits after it."""
    return f"{int(time.time() * 1000):011x}{secrets.token_hex(8)}"


class _Steps(dict):
    """``steps`` in expressions: a step that has not run reads as output null, no status."""

    def __missing__(self, key: str) -> dict[str, Any]:
        return {"output": None, "status": None, "error": None, "attempts": 0}


def error_info(exc: BaseException, step: str | None) -> dict[str, Any]:
    """An error as run state records it: type, message and the failed step.

    The exception's known secrets are masked in place first (``mask_exception``), so
    whatever formats it later (Celery's retry message and traceback, a log) shows
    ``***``; the store masks what it records of it in any case."""
    from .variables import mask_exception

    mask_exception(exc)
    if isinstance(exc, SoftTimeLimitExceeded):
        return {"type": "Timeout", "message": "the step ran past its timeout", "step": step}
    info = {"type": exc.__class__.__name__, "message": _text(exc), "step": step}
    if not isinstance(exc, PermanentError | StepError):
        info["traceback"] = "".join(traceback.format_exception(exc, limit=-3))[-2000:]
    return info


@contextmanager
def _step_context(ctx: StepContext) -> Iterator[None]:
    token = _current.set(ctx)
    try:
        yield
    finally:
        _current.reset(token)
