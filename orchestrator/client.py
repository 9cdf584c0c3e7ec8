"""The Python producer API: deploy definitions, trigger runs, read and wait for them."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import redis
from celery import Celery
from pydantic import ValidationError

from . import events
from .app import create_app
from .compiler import CanvasBuilder
from .dsl import Flow
from .errors import (
    DefinitionError,
    Forbidden,
    InputError,
    InvalidState,
    NotFound,
    Problem,
    RunFailed,
)
from .inputs import validate_inputs
from .loader import (
    Loaded,
    find_subflow_cycle,
    load,
    load_string,
    subflow_calls,
    subflow_cycle_message,
    validate_flow,
    version_of,
)
from .model import (
    EventSubscriptionResource,
    FlowResource,
    ScheduleResource,
    ServiceResource,
    VariableResource,
)
from .plan import Block, Plan, PlanCache, StepAddress, node_key, parse_key
from .runtime import publish, run_ended, trigger_flow, wake_step
from .scheduler import next_fire
from .settings import Settings
from .status import ACTIVE, ENDED
from .store import RedisStore
from .variables import shown
from .yamlsource import format_path

#: Resources stored by name only (no versions, no state of their own).
_NAMED_KINDS = (VariableResource, ServiceResource, EventSubscriptionResource)


@dataclass
class StepState:
    """One step instance of a run, as recorded."""

    status: str
    attempts: int = 0
    output: Any = None
    error: dict[str, Any] | None = None
    started_at: float | None = None
    finished_at: float | None = None
    worker: str | None = None
    input: Any = None

    @property
    def duration(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at


@dataclass
class Run:
    """A run's state when it was read; ``refresh``/``wait`` read it again."""

    id: str
    flow: str
    version: str
    status: str
    inputs: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    idempotency_key: str | None = None
    steps: dict[str, StepState] = field(default_factory=dict)
    #: Why the run is not moving, when the orchestrator noticed (e.g. its first step's
    #: queue has no live consumer): set by the sweep, None otherwise.
    reason: str | None = None
    _client: Client | None = field(default=None, repr=False, compare=False)

    @property
    def done(self) -> bool:
        return self.status in ENDED

    def refresh(self) -> Run:
        assert self._client is not None
        fresh = self._client.get(self.id)
        self.__dict__.update({k: v for k, v in fresh.__dict__.items() if k != "_client"})
        return self

    def wait(self, timeout: float | None = 60.0, poll: float = 0.2) -> dict[str, Any]:
        """The run's outputs once it succeeds; RunFailed if it ends otherwise."""
        assert self._client is not None
        return self._client.wait(self.id, timeout=timeout, poll=poll, run=self)

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k not in ("_client", "steps")}
        d["steps"] = {k: dict(s.__dict__) for k, s in self.steps.items()}
        return d


@dataclass
class Deployed:
    name: str
    version: str
    created: bool  # True when the flow (or schedule) was new
    kind: str = "Flow"


class Client:
    """Talks to Redis (state) and the broker (to start runs); safe to share across threads."""

    def __init__(self, settings: Settings | None = None, app: Celery | None = None):
        self.settings = settings or Settings()
        self.store = RedisStore(self.settings)
        self.app = app or create_app(self.settings, set_as_current=False)
        self._plans = PlanCache(self.settings, self.store.get_definition)

    @classmethod
    def from_env(cls) -> Client:
        """A client configured from ``ORCHESTRATOR_*`` environment variables."""
        return cls(Settings())

    def close(self) -> None:
        self.store.close()
        self.app.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- definitions ----------------------------------------------------------------------

    def deploy(
        self, *sources: str | os.PathLike | Flow | FlowResource | Iterable[Any]
    ) -> list[Deployed]:
        """Store definitions (files, folders, YAML text, DSL flows); running runs keep theirs."""
        resources = [loaded.resource for loaded in self._load(sources)]
        flows = [r for r in resources if isinstance(r, FlowResource)]
        schedules = [r for r in resources if isinstance(r, ScheduleResource)]
        named = [r for r in resources if isinstance(r, _NAMED_KINDS)]
        batch = {f.name: f for f in flows}
        # Check everything before storing anything.
        for sched in schedules:
            self._check_schedule(sched, batch)
        variables = {r.name: r for r in named if isinstance(r, VariableResource)}
        for res in flows:
            if res.spec.webhook is not None:
                self._check_webhook(res, variables)
        for resource in named:
            if isinstance(resource, EventSubscriptionResource):
                self._check_subscription(resource, batch)
        self._check_subflow_cycles(batch)
        out = []
        for resource in named:  # variables and services first: flows deployed with them use them
            spec = resource.spec.model_dump(mode="json", by_alias=True, exclude_none=True)
            created = self.store.save_resource(resource.kind, resource.name, spec)
            out.append(Deployed(resource.name, version_of(resource), created, resource.kind))
        for res in flows:
            version = version_of(res)
            created = self.store.save_definition(
                res.name, version, res.document(), res.spec.initial_state
            )
            out.append(Deployed(res.name, version, created))
        for sched in schedules:
            spec = sched.spec.model_dump(mode="json", by_alias=True)
            old = self.store.schedules().get(sched.name)
            # A new or re-timed schedule counts from now; an unchanged one keeps its place.
            moved = old is None or (old["cron"], old["timezone"]) != (
                spec["cron"],
                spec["timezone"],
            )
            self.store.save_schedule(sched.name, spec, next_fire(sched.spec, time.time()), moved)
            out.append(Deployed(sched.name, version_of(sched), old is None, "Schedule"))
        return out

    def _check_subflow_cycles(self, batch: dict[str, FlowResource]) -> None:
        """No flow of this deploy may start itself as a subflow, directly or through others.

        The call graph is the deployed flows' (read from Redis, only those reachable from
        this deploy) with this deploy's flows replacing theirs.
        """
        calls = {name: subflow_calls(flow) for name, flow in batch.items()}
        graph: dict[str, set[str]] = {name: set(c) for name, c in calls.items()}
        todo = [n for names in graph.values() for n in names]
        while todo:
            name = todo.pop()
            if name not in graph:
                graph[name] = self._deployed_subflows(name)
                todo += graph[name]
        cycle = find_subflow_cycle(graph, through=batch)
        if cycle is not None:
            path = calls[cycle[0]][cycle[1]]
            raise DefinitionError(
                [
                    Problem(
                        f"flow {cycle[0]!r}: {subflow_cycle_message(cycle)}",
                        None,
                        None,
                        format_path(path),
                    )
                ]
            )

    def _deployed_subflows(self, name: str) -> set[str]:
        """The flows the deployed version of ``name`` starts as subflows (none if not deployed)."""
        info = self.store.flow_info(name)
        doc = self.store.get_definition(name, info["version"]) if info else None
        if doc is None:
            return set()
        try:
            flow = FlowResource.model_validate(doc)
        except ValidationError:  # stored under older rules: its runs still meet the depth limit
            return set()
        return set(subflow_calls(flow))

    def _load(self, sources: Iterable[Any]) -> list[Loaded]:
        out: list[Loaded] = []
        for src in sources:
            if isinstance(src, Flow):
                src = src.resource
            if isinstance(src, FlowResource):
                validate_flow(src, self.settings)
                out.append(Loaded(src, None))
            elif isinstance(src, (ScheduleResource, *_NAMED_KINDS)):
                out.append(Loaded(src, None))
            elif isinstance(src, str) and "\n" in src:
                out.extend(load_string(src, settings=self.settings))
            elif isinstance(src, str | os.PathLike):
                out.extend(load(src, self.settings))
            else:
                out.extend(self._load(src))
        return out

    def _check_schedule(self, sched: ScheduleResource, batch: dict[str, FlowResource]) -> None:
        """A schedule must name a flow (deployed, or in the same deploy) it can start."""
        flow = self._flow_for(sched.spec.flow, batch, f"schedule {sched.name!r}")
        try:
            validate_inputs(flow.spec.inputs, sched.spec.inputs)
        except InputError as exc:
            raise DefinitionError(
                [Problem(f"schedule {sched.name!r}: {exc}", None, None, f"spec.inputs.{exc.field}")]
            ) from None

    def _flow_for(self, name: str, batch: dict[str, FlowResource], who: str) -> FlowResource:
        """A flow named by ``who``: from this deploy, or deployed before."""
        flow = batch.get(name)
        if flow is not None:
            return flow
        info = self.store.flow_info(name)
        if info is None:
            raise DefinitionError(
                [
                    Problem(
                        f"{who} names flow {name!r}, which is not deployed (deploy it first "
                        "or in the same command)",
                        None,
                        None,
                        "spec.flow",
                    )
                ]
            )
        return self.plan(name, info["version"]).resource

    def _check_subscription(
        self, sub: EventSubscriptionResource, batch: dict[str, FlowResource]
    ) -> None:
        """A subscription's inputs must be inputs of the flow it starts."""
        flow = self._flow_for(sub.spec.flow, batch, f"event subscription {sub.name!r}")
        unknown = sorted(set(sub.spec.inputs) - set(flow.spec.inputs))
        if unknown:
            raise DefinitionError(
                [
                    Problem(
                        f"event subscription {sub.name!r}: {unknown[0]!r} is not an input of "
                        f"flow {flow.name!r} (inputs: {', '.join(flow.spec.inputs) or 'none'})",
                        None,
                        None,
                        f"spec.inputs.{unknown[0]}",
                    )
                ]
            )

    def _check_webhook(self, flow: FlowResource, batch: dict[str, VariableResource]) -> None:
        """A webhook's secret must be a secret Variable (deployed, or in this deploy)."""
        name = flow.spec.webhook.secret  # type: ignore[union-attr]
        var = batch.get(name)
        spec = var.spec.model_dump() if var else self.store.resource("Variable", name)
        if spec is None or not spec.get("secret"):
            why = "is not deployed" if spec is None else "is not a secret"
            raise DefinitionError(
                [
                    Problem(
                        f"flow {flow.name!r}: webhook secret variable {name!r} {why} (deploy a "
                        "Variable with secret: true and value: ${env.NAME})",
                        None,
                        None,
                        "spec.webhook.secret",
                    )
                ]
            )

    def variables(self) -> list[dict[str, Any]]:
        """Deployed Variables as shown to people: a secret's value is ``***``."""
        return [
            {"name": n, "value": shown(spec), "secret": bool(spec.get("secret"))}
            for n, spec in sorted(self.store.resources("Variable").items())
        ]

    def services(self) -> dict[str, dict[str, Any]]:
        return self.store.resources("Service")

    def subscriptions(self, channel: str | None = None) -> dict[str, dict[str, Any]]:
        subs = self.store.resources("EventSubscription")
        return {n: s for n, s in subs.items() if channel is None or s["channel"] == channel}

    def schedules(self) -> list[dict[str, Any]]:
        """Deployed schedules with their next fire time and last run."""
        out = []
        for name, spec in sorted(self.store.schedules().items()):
            state = self.store.schedule_state(name)
            out.append(
                {
                    "name": name,
                    **spec,
                    "next": float(state["next"]) if state.get("next") else None,
                    "last_run": state.get("last_run"),
                    "error": state.get("error"),
                }
            )
        return out

    def flow(self, name: str) -> tuple[dict[str, str], FlowResource]:
        """The flow's record (version, state) and current definition."""
        info = self.store.flow_info(name)
        if info is None:
            raise NotFound(f"flow {name!r} is not deployed")
        return info, self.plan(name, info["version"]).resource

    def flows(self) -> list[dict[str, str]]:
        return [{"name": n, **(self.store.flow_info(n) or {})} for n in self.store.flow_names()]

    def start_flow(self, name: str) -> None:
        self.flow(name)
        self.store.set_flow_state(name, "started")

    def stop_flow(self, name: str) -> None:
        self.flow(name)
        self.store.set_flow_state(name, "stopped")

    def plan(self, name: str, version: str) -> Plan:
        return self._plans.get(name, version)

    # -- runs -----------------------------------------------------------------------------

    def trigger(
        self, flow: str, inputs: dict[str, Any] | None = None, idempotency_key: str | None = None
    ) -> Run:
        """Start a run; with an idempotency key, a second trigger returns the same run."""
        now = time.time()
        run_id, created, plan, values = trigger_flow(
            self.store, self.app, self.plan, flow, inputs, idempotency_key
        )
        if not created:
            return self.get(run_id)
        return Run(
            run_id,
            flow,
            plan.version,
            "pending",
            values,
            created_at=now,
            idempotency_key=idempotency_key,
            _client=self,
        )

    def cancel(self, run_id: str) -> Run:
        """Stop a run: no new step starts, running step tasks are revoked, children cancelled.

        The tree of subflow runs below it is walked with a stack, not by recursion, so a
        tree of any depth is cancelled whole; children that ended already are passed over.
        """
        try:
            pending = self._cancel_one(run_id, root=True)
        except redis.ResponseError as exc:
            raise self._state_error(run_id, exc, "cancel") from None
        while pending:
            child = pending.pop()
            with contextlib.suppress(redis.ResponseError):  # it ended: so did its subtree
                pending.extend(self._cancel_one(child, root=False))
        return self.get(run_id)

    def _cancel_one(self, run_id: str, root: bool) -> list[str]:
        """Cancel one run (raises ResponseError when it is not active); its child runs.

        Only the root's parent hears of it: below the root, the parent is being cancelled."""
        now = time.time()
        self.store.move_run(
            run_id,
            ACTIVE,
            "cancelled",
            {"ts": now, "type": "run.cancelled", "step": ""},
            {"finished_at": now},
        )
        records = self.store.step_records(run_id)
        running = {
            k: r
            for k, r in records.items()
            if r.get("status") in ("running", "retrying", "waiting")
        }
        task_ids = [r["task_id"] for r in running.values() if r.get("task_id")]
        if task_ids:
            self.app.control.revoke(task_ids, terminate=True, signal="SIGTERM")
        for rec in running.values():
            rec.update(status="cancelled", finished_at=now)
        if running:
            self.store.set_fields(run_id, {f"s:{k}": r for k, r in running.items()})
        raw = self.store.run_hash(run_id)
        run_ended(self.store, self.app, self.plan, run_id, parent_too=root)
        # ``c:<step>`` holds a subflow's child run id. A forEach's started count is
        # ``fc:<step>`` now, but runs started before that change keep it in ``c:<step>``
        # (a number, never a run id), so digits are still skipped.
        return [v for k, v in raw.items() if k.startswith("c:") and not v.isdigit()]

    # -- waits: signals and approvals ---------------------------------------------------

    def signal(self, run_id: str, name: str, payload: Any = None) -> str:
        """Send a named signal to a run: ``resumed`` a waiting step, or ``kept`` for a later one."""
        event = {"ts": time.time(), "type": "signal.received", "step": "", "signal": name}
        res = self.store.signal(run_id, name, payload, event)
        if res[0] == "inactive":
            if res[1] == "missing":
                raise NotFound(f"run {run_id!r} does not exist")
            raise InvalidState(f"run {run_id} is {res[1]}: it takes no more signals")
        if res[0] == "resume":
            self._wake(run_id, res[1])
            return "resumed"
        return "kept"

    def approve(self, run_id: str, step: str, by: str, comment: str | None = None) -> None:
        """Approve a waiting approval step (only a listed approver may, when some are listed)."""
        self._decide(run_id, step, "approved", by, comment)

    def reject(self, run_id: str, step: str, by: str, comment: str | None = None) -> None:
        """Reject a waiting approval step; the flow reads the decision from its output."""
        self._decide(run_id, step, "rejected", by, comment)

    def _decide(self, run_id: str, step: str, decision: str, by: str, comment: str | None) -> None:
        now = time.time()
        value = {
            "decision": decision,
            "by": by,
            "comment": comment,
            "at": dt.datetime.fromtimestamp(now, dt.UTC).isoformat(),
        }
        event = {"ts": now, "type": f"step.{decision}", "step": step, "by": by, "comment": comment}
        res = self.store.decide(run_id, step, by, value, event)
        if res[0] == "forbidden":
            raise Forbidden(
                f"{by!r} may not decide step {step!r} of run {run_id}: its "
                f"approvers are {', '.join(json.loads(res[1]))}"
            )
        if res[0] == "inactive":
            if res[1] == "missing":
                raise NotFound(f"run {run_id!r} does not exist")
            raise InvalidState(f"run {run_id} is {res[1]}")
        if res[0] == "not_waiting":
            raise InvalidState(f"step {step!r} of run {run_id} is not waiting for a decision")
        if res[0] == "decided":
            raise InvalidState(f"step {step!r} of run {run_id} is already decided")
        self._wake(run_id, step)

    def _wake(self, run_id: str, key: str) -> None:
        # the run exists (its wait was just decided or signalled): both fields are there
        flow, version = cast(list[str], self.store.read_fields(run_id, ["flow", "version"]))
        step, path = parse_key(key)
        wake_step(self.app, self.plan, StepAddress(run_id, flow, version, step, path))

    def retry(self, run_id: str) -> Run:
        """Restart a failed run from its failed step, reusing what had succeeded."""
        run = self.get(run_id)
        if run.status != "failed":
            raise InvalidState(f"run {run_id} is {run.status}; only a failed run can be retried")
        plan = self.plan(run.flow, run.version)
        raw = self.store.run_hash(run_id)
        recovery = json.loads(raw.get("recovery") or "[]")
        comp_keys = [
            f"s:{node_key(plan.first(plan.blocks[f'{s}/compensate']).id, tuple(p))}"
            for s, p in recovery
        ]
        if any(raw.get(k) and json.loads(raw[k]).get("status") == "succeeded" for k in comp_keys):
            raise InvalidState(f"run {run_id} was compensated; trigger a new run instead")
        redo = [k for k, st in run.steps.items() if st.status not in ("succeeded", "skipped")]
        redo += [k[2:] for k in comp_keys if raw.get(k)]
        if plan.on_failure is not None:
            redo += [k for k in run.steps if k.split("[")[0] in _block_ids(plan, plan.on_failure)]
        start = next(
            (plan.nodes[i] for i in plan.top.items if i in redo or i not in run.steps), None
        )
        if start is None:
            raise InvalidState(f"run {run_id} has no failed step to restart from")
        fields = ["recovery", "phase", "error", "outputs", "finished_at"]
        for key in set(redo):
            fields += [f"{p}:{key}" for p in ("s", "o", "f", "n", "c", "fc", "e", "pe")]
        self.store.reset_joins(run_id, sorted(set(redo)))
        self.store.delete_fields(run_id, fields)
        self.store.move_run(
            run_id,
            ("failed",),
            "running",
            {"ts": time.time(), "type": "run.retried", "step": start.id},
        )
        publish(self.app, [CanvasBuilder(self.app, plan, run_id).from_node(start)])
        return self.get(run_id)

    def _state_error(self, run_id: str, exc: Exception, what: str) -> Exception:
        msg = str(exc)
        if msg == "missing":
            return NotFound(f"run {run_id!r} does not exist")
        return InvalidState(f"cannot {what} run {run_id}: it is {msg.removeprefix('status:')}")

    def get(self, run_id: str) -> Run:
        raw = self.store.run_hash(run_id)
        if not raw:
            raise NotFound(f"run {run_id!r} does not exist (or has passed its retention)")
        return self._run_from_hash(raw)

    def _run_from_hash(self, raw: dict[str, str]) -> Run:
        def j(name: str) -> Any:
            v = raw.get(name)
            return json.loads(v) if v else None

        def f(name: str) -> float | None:
            v = raw.get(name)
            return float(v) if v else None

        steps: dict[str, StepState] = {}
        for k, v in raw.items():
            if k.startswith("s:"):
                rec = json.loads(v)
                key = k[2:]
                out = raw.get(f"o:{key}")
                steps[key] = StepState(
                    status=rec.get("status"),
                    attempts=rec.get("attempts", 0),
                    output=json.loads(out) if out else None,
                    error=rec.get("error"),
                    started_at=rec.get("started_at"),
                    finished_at=rec.get("finished_at"),
                    worker=rec.get("worker"),
                    input=rec.get("input"),
                )
        return Run(
            id=raw["id"],
            flow=raw["flow"],
            version=raw["version"],
            status=raw["status"],
            inputs=j("inputs") or {},
            outputs=j("outputs"),
            error=j("error"),
            created_at=f("created_at"),
            started_at=f("started_at"),
            finished_at=f("finished_at"),
            idempotency_key=raw.get("idempotency_key"),
            steps=steps,
            reason=raw.get("reason") if raw["status"] == "pending" else None,
            _client=self,
        )

    def runs(
        self, flow: str | None = None, status: str | None = None, limit: int = 50
    ) -> list[Run]:
        """Runs, newest first, filtered by flow and status."""
        out = []
        for rid in self.store.run_ids(flow=flow, status=status, limit=limit):
            try:
                out.append(self.get(rid))
            except NotFound:
                continue
        return out

    def events(self, run_id: str, after: str = "-") -> list[dict[str, Any]]:
        """The run's event log (its audit trail), oldest first, each with its stream ``id``."""
        return [{"id": eid, **e} for eid, e in self.store.events(run_id, after)]

    def flow_events(self, flow: str, runs: int = 20, limit: int = 200) -> list[dict[str, Any]]:
        """The event logs of the flow's ``runs`` newest runs, merged oldest first.

        Each event carries its ``run``; at most the ``limit`` newest are returned.
        """
        if self.store.flow_info(flow) is None:
            raise NotFound(f"flow {flow!r} is not deployed")
        merged = []
        for rid in self.store.run_ids(flow=flow, limit=runs):
            merged += [{"run": rid, "id": eid, **e} for eid, e in self.store.events(rid)]
        merged.sort(key=lambda e: (e.get("ts") or 0, e["id"]))
        return merged[-limit:]

    # -- events ---------------------------------------------------------------------------

    def publish(self, channel: str, data: Any = None, id: str | None = None) -> dict[str, Any]:
        """Publish an event: each matching EventSubscription starts one run (once per id)."""
        return events.publish(self.store, self.app, channel, data, id)

    def channel_events(self, channel: str, limit: int = 50) -> list[dict[str, Any]]:
        """The newest events of a channel, oldest first, each with its ``stream_id``."""
        events.check_channel(channel)
        return [{"stream_id": i, **e} for i, e in self.store.channel_entries(channel, count=limit)]

    def dead_events(self, channel: str, limit: int = 50) -> list[dict[str, Any]]:
        """Dead-lettered deliveries of a channel: ``entry``, event, subscription, reason."""
        events.check_channel(channel)
        return [
            {"entry": i, **e}
            for i, e in self.store.channel_entries(channel, count=limit, dead=True)
        ]

    def replay(self, channel: str, ids: list[str] | None = None) -> list[dict[str, Any]]:
        """Deliver dead-lettered events again (all, or ``ids``); see :func:`events.replay`."""
        return events.replay(self.store, self.app, self.plan, channel, ids)

    def wait(
        self, run_id: str, timeout: float | None = 60.0, poll: float = 0.2, run: Run | None = None
    ) -> dict[str, Any]:
        """Block until the run ends: its outputs, or RunFailed; TimeoutError past ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.005
        while True:
            (status,) = self.store.read_fields(run_id, ["status"])
            if status is None:
                raise NotFound(f"run {run_id!r} does not exist")
            if status in ENDED:
                fresh = self.get(run_id)
                if run is not None:
                    run.__dict__.update({k: v for k, v in fresh.__dict__.items() if k != "_client"})
                if fresh.status == "succeeded":
                    return fresh.outputs or {}
                raise RunFailed(fresh)
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"run {run_id} still {status} after {timeout}s")
            time.sleep(delay)
            delay = min(delay * 2, poll)


def _block_ids(plan: Plan, block: Block) -> set[str]:
    out = set()
    for i in block.items:
        out.add(i)
        out |= {d.id for d in plan.descendants(plan.nodes[i])}
    return out
