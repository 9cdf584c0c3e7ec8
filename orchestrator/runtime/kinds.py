"""The step kinds that do work or start a step group: ``task``, ``http`` and ``service``
(the user's code or an HTTP call, in this process), ``parallel``, ``sequence``, ``forEach``,
``switch``, ``try`` and ``subflow`` (publish what runs inside them)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from celery import Task
from celery._state import _task_stack
from celery.exceptions import SoftTimeLimitExceeded

from .. import expressions, httpcalls, procgroup
from ..errors import ExpressionError, LimitExceeded, OrchestratorError
from ..inputs import validate_inputs
from ..limits import check_value
from ..model import ServiceSpec
from ..plan import Node
from .context import StepContext, _step_context
from .dispatch import start_run
from .engine import PermanentError

if TYPE_CHECKING:
    from .host import Host
else:
    Host = object  # the mixins' typed base while type checking (.host)


class KindsMixin(Host):
    """:class:`~.execution.Execution`'s handlers of the working and structural kinds."""

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
                self.run_id, self._skip_records(skipped, self.path), [], recovery=self.compensating
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
            self.run_id,
            [],
            [self._event("subflow.started", child=child)],
            recovery=self.compensating,
        )

    def _depth(self) -> int:
        """How many runs deep this run is: 0 at the top, its parent's depth + 1 below."""
        raw = self.store.read_fields(self.run_id, ["parent"])[0]
        parent = json.loads(raw) if raw else None
        return int(parent.get("depth", 1)) if parent else 0

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
