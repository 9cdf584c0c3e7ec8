"""One delivery of one step message, as a state machine: read what the step needs and
begin it (one round trip), do its kind's work (:mod:`.kinds`, :mod:`.waits`), record its
end with whatever ends with it (enclosing sequences, the run) in one more round trip, and
continue the run: publish what follows, count a fan-in arrival, join a step group, or
climb from a failure to the ``try`` that catches it (else :mod:`.compensation`).

Celery may deliver a message twice (late acks, a worker lost, the visibility
timeout). Every transition is compare-and-set in Lua, so a step that ended is never
run or recorded again; a duplicate only re-publishes the continuation, which is
itself deduplicated downstream.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from typing import TYPE_CHECKING, Any, cast

from celery import Task
from celery.exceptions import Ignore, SoftTimeLimitExceeded

from .. import expressions
from ..compiler import CanvasBuilder
from ..counters import Counts, run_counts, step_counts
from ..errors import ExpressionError, StepError
from ..plan import Node, Plan, StepAddress, node_key
from ..policy import retry_countdown
from ..publishing import publish
from ..store import NO_OUTPUT
from ..variables import VariableMap, mask, mask_exception
from .compensation import CompensationMixin
from .dispatch import run_ended
from .engine import Engine, PermanentError, WorkerLost
from .kinds import KindsMixin
from .ratelimit import RateLimitMixin
from .waits import WaitsMixin

if TYPE_CHECKING:
    from ..model import TryStep

log = logging.getLogger("orchestrator.runtime")

_READ = object()  # "the output is not at hand: read it from the store"


class Execution(KindsMixin, WaitsMixin, CompensationMixin, RateLimitMixin):
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
        self.deferred, self.rindex, self.join = 0, 0, False
        self.phase: str | None = None
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
    def compensating(self) -> bool:
        """In a failed run's saga phase (``recovery`` on the wire, as stored runs say)."""
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
            self.run_id, self.key, self.task_id, mark, rec, event, fields, self.compensating
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
        if self.tail and not self.compensating and self.plan.is_final(node):
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
            recovery=self.compensating,
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
                recovery=self.compensating,
                counts=self._counts("retrying", retried=True),
            )
            if res != "ok":
                raise Ignore()
            raise self.task.retry(countdown=delay, max_retries=None, exc=exc, kwargs=self._kwargs())
        if self.node.on_error == "continue" or self.compensating:
            # Compensations and onFailure steps never stop the compensation phase that runs them.
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
            recovery=self.compensating,
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
                    self._start_compensation(error)
                return
            owner = self.plan.nodes[block.owner]
            opath = path[: owner.foreach_depth]
            okey = node_key(owner.id, opath)
            if owner.kind == "try" and block.role in ("try", "catch"):
                step = cast("TryStep", owner.step)
                if block.role == "try" and step.catch:
                    self.store.set_fields(self.run_id, {f"e:{okey}": error})
                    self._start_block(self.plan.blocks[f"{owner.id}/catch"], opath)
                    return
                if step.finally_:
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
                recovery=self.compensating,
            )
            if res != "ok":
                return  # another failure got here first, or the run has ended
            node, path = owner, opath

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
                self._end_compensation(self._compensation_order())
            return  # top level: the run's end was recorded with its last step
        if block.role == "compensate":
            self._compensation_step(self._compensation_order(), self.rindex + 1)
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
            step = cast("TryStep", owner.step)
            if block.role in ("try", "catch") and step.finally_:
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
        step = cast("TryStep", self.node.step)
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
            recovery=self.compensating,
        )
        if res == "ok":
            self._propagate(error)

    def _notify_parent(self) -> None:
        """The run ended: wake its parent's subflow step and steps waiting on it."""
        run_ended(self.store, self.task.app, self.eng.plan, self.run_id)

    def _publish(self, sigs: list) -> None:
        publish(self.task.app, sigs)


def _text(exc: BaseException) -> str:
    """An exception's message, even when its ``__str__`` raises; at most 2,000 characters."""
    try:
        return str(exc)[:2000] or type(exc).__name__
    except Exception:  # noqa: BLE001 - a broken __str__ must not stop the recording
        return f"{type(exc).__name__} (its message could not be read)"


class _Steps(dict):
    """``steps`` in expressions: a step that has not run reads as output null, no status."""

    def __missing__(self, key: str) -> dict[str, Any]:
        return {"output": None, "status": None, "error": None, "attempts": 0}


def error_info(exc: BaseException, step: str | None) -> dict[str, Any]:
    """An error as run state records it: type, message and the failed step.

    The exception's known secrets are masked in place first (``mask_exception``), so
    whatever formats it later (Celery's retry message and traceback, a log) shows
    ``***``; the store masks what it records of it in any case."""
    mask_exception(exc)
    if isinstance(exc, SoftTimeLimitExceeded):
        return {"type": "Timeout", "message": "the step ran past its timeout", "step": step}
    info = {"type": exc.__class__.__name__, "message": _text(exc), "step": step}
    if not isinstance(exc, PermanentError | StepError):
        info["traceback"] = "".join(traceback.format_exception(exc, limit=-3))[-2000:]
    return info
