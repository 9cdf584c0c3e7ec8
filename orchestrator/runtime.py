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

import contextvars
import logging
import os
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from celery import Celery, Task, shared_task
from celery._state import _task_stack
from celery.exceptions import Ignore, SoftTimeLimitExceeded

from . import expressions
from .compiler import STEP_TASK, CanvasBuilder, Node, Plan, node_key, retry_countdown
from .errors import ExpressionError, StepError
from .model import FlowResource
from .settings import Settings
from .store import NO_OUTPUT, RedisStore

log = logging.getLogger("orchestrator.runtime")


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


class Engine:
    """Per worker process: the store and a cache of plans by flow version."""

    def __init__(self, app: Celery, settings: Settings):
        self.app, self.settings = app, settings
        self.store = RedisStore(settings)
        self._plans: dict[tuple[str, str], Plan] = {}

    def plan(self, flow: str, version: str) -> Plan:
        plan = self._plans.get((flow, version))
        if plan is None:
            doc = self.store.get_definition(flow, version)
            if doc is None:
                raise PermanentError(f"flow {flow!r} version {version} is not deployed")
            plan = Plan(FlowResource.model_validate(doc), version, self.settings)
            self._plans[(flow, version)] = plan
        return plan


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


@shared_task(name=STEP_TASK, bind=True)
def step_task(
    self: Task,
    run_id: str,
    flow: str,
    version: str,
    node_id: str,
    path: list[int],
    tail: bool,
    deferred: int = 0,
) -> None:
    """Execute one step of a run (see the module docstring)."""
    eng = engine_for(self.app)
    plan = eng.plan(flow, version)
    Execution(eng, self, plan, plan.nodes[node_id], run_id, tuple(path), tail, deferred).run()


class Execution:
    """One delivery of one step message."""

    def __init__(
        self,
        eng: Engine,
        task: Task,
        plan: Plan,
        node: Node,
        run_id: str,
        path: tuple[int, ...],
        tail: bool,
        deferred: int,
    ):
        self.eng, self.store, self.task, self.plan = eng, eng.store, task, plan
        self.node, self.run_id, self.path, self.tail = node, run_id, path, tail
        self.key = node_key(node.id, path)
        self.deferred = deferred
        req = task.request
        self.attempt = (req.retries or 0) + 1 - deferred
        self.task_id = req.id or ""
        self.worker = f"{req.hostname or 'local'}:{os.getpid()}"
        self.started_at = time.time()
        self.values: dict[str, Any] = {}

    # -- entry ----------------------------------------------------------------------------

    def run(self) -> None:
        kind = self.node.kind
        if kind == "task":
            self._run_task()
        elif kind == "parallel":
            self._run_parallel()
        elif kind == "sequence":
            self._run_sequence()
        else:
            self._fail(PermanentError(f"step kind {kind!r} is not supported by this worker"))

    # -- reading state --------------------------------------------------------------------

    def _ref_key(self, step_id: str) -> str:
        ref = self.plan.nodes[step_id]
        return node_key(step_id, self.path[: ref.foreach_depth])

    def _fields(self, refs: set[str], final: bool) -> list[str]:
        fields = ["inputs"]
        names = set(refs)
        if final:
            names |= self.plan.output_refs
        for sid in sorted(names):
            if sid in self.plan.nodes:
                k = self._ref_key(sid)
                fields += [f"s:{k}", f"o:{k}"]
        return fields

    def _begin(self, mark: bool, fields: list[str]) -> str:
        rec = self._running_record() if mark else None
        event = self._event("step.started") if mark else None
        verdict, _status, _rec, values = self.store.begin_step(
            self.run_id, self.key, self.task_id, mark, rec, event, fields
        )
        self.values.update(zip(fields, values, strict=True))
        return verdict

    def _context(self) -> dict[str, Any]:
        import json

        v = self.values
        steps: dict[str, Any] = {}
        for sid, ref in self.plan.nodes.items():
            k = node_key(sid, self.path[: ref.foreach_depth])
            rec_raw, out_raw = v.get(f"s:{k}"), v.get(f"o:{k}")
            if f"s:{k}" not in v:
                continue
            rec = json.loads(rec_raw) if rec_raw else {}
            steps[sid] = {
                "output": json.loads(out_raw) if out_raw else None,
                "status": rec.get("status"),
                "error": rec.get("error"),
                "attempts": rec.get("attempts", 0),
            }
        return {
            "inputs": json.loads(v["inputs"]) if v.get("inputs") else {},
            "steps": _Steps(steps),
            "run": {"id": self.run_id, "flow": self.plan.name},
            "vars": {},
        }

    # -- records --------------------------------------------------------------------------

    def _running_record(self) -> dict[str, Any]:
        return {
            "status": "running",
            "attempts": self.attempt,
            "started_at": self.started_at,
            "worker": self.worker,
            "task_id": self.task_id,
        }

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

    # -- kinds ----------------------------------------------------------------------------

    def _run_task(self) -> None:
        node, step = self.node, self.node.step
        if not self._rate_ok():
            return
        final = self.tail and self.plan.is_final(node)
        fields = self._fields(node.refs, final)
        verdict = self._begin(mark=step.when is None, fields=fields)
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
            kwargs = expressions.render(step.with_, ctx)
        except ExpressionError as exc:
            self._failed(PermanentError(str(exc)), None, ctx)
            return
        try:
            output = self._call(step.task, kwargs)
        except Exception as exc:  # noqa: BLE001 - any failure of user code is the step's failure
            self._failed(exc, kwargs, ctx)
            return
        self._finish("succeeded", output, ctx, input=kwargs)

    def _run_parallel(self) -> None:
        node = self.node
        branches = [b.id for b in node.step.parallel]  # type: ignore[union-attr]
        if node.static:  # the chord's body: every branch has ended, collect their outputs
            final = self.tail and self.plan.is_final(node)
            fields = self._fields(set(branches), final)
            if self._stop(self._begin(mark=True, fields=fields)):
                return
            ctx = self._context()
            self._finish("succeeded", self._branch_outputs(ctx), ctx)
            return
        if not self._gate():
            return
        builder = CanvasBuilder(self.task.app, self.plan, self.run_id)
        sigs = [builder.from_node(self.plan.nodes[b], self.path) for b in branches]
        self._publish(sigs)

    def _run_sequence(self) -> None:
        if not self._gate():
            return
        body = self.plan.blocks[f"{self.node.id}/body"]
        builder = CanvasBuilder(self.task.app, self.plan, self.run_id)
        self._publish([builder.from_node(self.plan.first(body), self.path)])

    def _gate(self) -> bool:
        """Start a step group with ``when``: True to go on, False when skipped or stopped."""
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
            skipped = [
                (node_key(d.id, self.path), self._record("skipped"), NO_OUTPUT)
                for d in self.plan.descendants(self.node)
            ]
            self._finish("skipped", None, ctx, extra=skipped)
            return False
        return not self._stop(self._begin(mark=True, fields=[]))

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
        try:
            import json

            json.dumps(output)
        except (TypeError, ValueError) as exc:
            raise PermanentError(f"output of step {self.key!r} is not JSON: {exc}") from exc
        return output

    def _rate_ok(self) -> bool:
        """Hold a step back (without spending an attempt) while its rate limit is used up."""
        rate = self.node.options.get("rate_limit")
        if not rate:
            return True
        wait = self.store_rate(rate)
        if wait <= 0:
            return True
        raise self.task.retry(
            countdown=wait, max_retries=None, kwargs={"deferred": self.deferred + 1}
        )

    def store_rate(self, rate: str) -> float:
        count, unit = rate.split("/")
        per = {"s": 1.0, "m": 60.0, "h": 3600.0}[unit]
        n = float(count)
        window, limit = (per, int(n)) if n >= 1 else (per / n, 1)
        now = time.time()
        slot = int(now // window)
        key = f"{self.store.p}rate:{self.plan.name}:{self.node.id}:{slot}"
        pipe = self.store.r.pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, int(window) + 1)
        used = pipe.execute()[0]
        return 0.0 if used <= limit else round((slot + 1) * window - now, 3) + 0.001

    # -- endings --------------------------------------------------------------------------

    def _stop(self, verdict: str) -> bool:
        """Handle a verdict that means "do not execute"; True when the caller must return."""
        if verdict == "run":
            return False
        if verdict == "done" and self.tail:
            # A redelivered message whose step had ended: the run may not have moved on
            # (the worker died between recording and publishing), so continue again.
            self._advance()
        if verdict in ("busy", "inactive", "missing"):
            raise Ignore()
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
        if self.tail and self.plan.is_final(node):
            final = self._final(ctx, node.id, status, output)
            events.append(self._event(f"run.{final['status']}", key="", error=final.get("error")))
        res = self.store.complete_step(self.run_id, records, events, final)
        if res == "ok" and self.tail and final is None:
            self._advance()

    def _final(
        self, ctx: dict[str, Any] | None, last: str, status: str, output: Any
    ) -> dict[str, Any]:
        """The run's outcome once its last step ended: outputs rendered from step outputs."""
        if ctx is None or any(
            f"s:{self._ref_key(s)}" not in self.values for s in self.plan.output_refs
        ):
            fields = self._fields(set(), final=True)
            self.values.update(
                zip(fields, self.store.read_fields(self.run_id, fields), strict=True)
            )
            ctx = self._context()
        steps = ctx["steps"]
        prev = steps.get(last, {})
        steps[last] = {**prev, "output": output, "status": status}
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

    def _failed(self, exc: BaseException, kwargs: Any, ctx: dict[str, Any] | None) -> None:
        """A step raised: retry it under its policy, or let it fail (the run or just itself)."""
        error = error_info(exc, self.key)
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
            )
            if res != "ok":
                raise Ignore()
            raise self.task.retry(
                countdown=delay, max_retries=None, exc=exc, kwargs={"deferred": self.deferred}
            )
        if self.node.on_error == "continue":
            self._finish("failed", None, ctx, error=error, input=kwargs)
            return
        self._fail(exc, kwargs)

    def _fail(self, exc: BaseException, kwargs: Any = None) -> None:
        error = error_info(exc, self.key)
        final = {"status": "failed", "error": error, "finished_at": time.time()}
        self.store.complete_step(
            self.run_id,
            [(self.key, self._record("failed", error=error, input=kwargs), None)],
            [
                self._event("step.failed", error=error),
                self._event("run.failed", key="", error=error),
            ],
            final,
        )
        raise StepError(f"{error['type']}: {error['message']}")

    # -- continuing the run ---------------------------------------------------------------

    def _advance(self) -> None:
        """After a canvas' last step: publish what follows, or count a fan-in arrival."""
        node, path = self.node, self.path
        while True:
            nxt = self.plan.successor(node)
            if nxt is not None:
                builder = CanvasBuilder(self.task.app, self.plan, self.run_id)
                self._publish([builder.from_node(nxt, path)])
                return
            end, block = self.plan.scope_end(node)
            if block.owner is None:
                return  # the run's end was recorded with the last step
            owner = self.plan.nodes[block.owner]
            if owner.kind != "parallel":
                return
            branches = owner.step.parallel  # type: ignore[union-attr]
            if not self.store.fanin(self.run_id, node_key(owner.id, path), end.id, len(branches)):
                return
            # This was the last branch: end the parallel step, then continue after it.
            self.__class__(
                self.eng, self.task, self.plan, owner, self.run_id, path, True, self.deferred
            )._join_runtime()
            return

    def _join_runtime(self) -> None:
        branches = {b.id for b in self.node.step.parallel}  # type: ignore[union-attr]
        fields = self._fields(branches, self.plan.is_final(self.node))
        self.values.update(zip(fields, self.store.read_fields(self.run_id, fields), strict=True))
        ctx = self._context()
        self._finish("succeeded", self._branch_outputs(ctx), ctx)

    def _publish(self, sigs: list) -> None:
        with self.task.app.producer_or_acquire() as producer:
            for sig in sigs:
                sig.apply_async(producer=producer)


class _Steps(dict):
    """``steps`` in expressions: a step that has not run reads as output null, no status."""

    def __missing__(self, key: str) -> dict[str, Any]:
        return {"output": None, "status": None, "error": None, "attempts": 0}


def error_info(exc: BaseException, step: str | None) -> dict[str, Any]:
    """An error as run state records it: type, message and the failed step."""
    if isinstance(exc, SoftTimeLimitExceeded):
        return {"type": "Timeout", "message": "the step ran past its timeout", "step": step}
    message = str(exc) or exc.__class__.__name__
    info = {"type": exc.__class__.__name__, "message": message, "step": step}
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
