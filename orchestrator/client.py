"""The Python producer API: deploy definitions, trigger runs, read and wait for them."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis
from celery import Celery

from .app import create_app
from .compiler import Block, CanvasBuilder, Plan, PlanCache, node_key
from .errors import (
    DefinitionError,
    FlowStopped,
    Forbidden,
    InputError,
    InvalidState,
    NotFound,
    Problem,
    RunFailed,
)
from .inputs import validate_inputs
from .loader import Loaded, load, load_string, validate_flow, version_of
from .model import FlowResource, ScheduleResource
from .runtime import publish, run_ended, start_run, wake_step
from .scheduler import next_fire
from .settings import Settings
from .store import ACTIVE, ENDED, RedisStore

if TYPE_CHECKING:
    from .dsl import Flow


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
        for sched in schedules:  # check before storing anything
            self._check_schedule(sched, {f.name: f for f in flows})
        out = []
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

    def _load(self, sources: Iterable[Any]) -> list[Loaded]:
        from .dsl import Flow

        out: list[Loaded] = []
        for src in sources:
            if isinstance(src, Flow):
                src = src.resource
            if isinstance(src, FlowResource):
                validate_flow(src, self.settings)
                out.append(Loaded(src, None))
            elif isinstance(src, ScheduleResource):
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
        flow = batch.get(sched.spec.flow)
        if flow is None:
            info = self.store.flow_info(sched.spec.flow)
            if info is None:
                raise DefinitionError(
                    [
                        Problem(
                            f"schedule {sched.name!r} names flow {sched.spec.flow!r}, which is not "
                            "deployed (deploy it first or in the same command)",
                            None,
                            None,
                            "spec.flow",
                        )
                    ]
                )
            flow = self.plan(sched.spec.flow, info["version"]).resource
        try:
            validate_inputs(flow.spec.inputs, sched.spec.inputs)
        except InputError as exc:
            raise DefinitionError(
                [Problem(f"schedule {sched.name!r}: {exc}", None, None, f"spec.inputs.{exc.field}")]
            ) from None

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
        info = self.store.flow_info(flow)
        if info is None:
            raise NotFound(f"flow {flow!r} is not deployed")
        if info.get("state") == "stopped":
            raise FlowStopped(
                f"flow {flow!r} is stopped: start it with `orchestrator flows start {flow}`"
            )
        plan = self.plan(flow, info["version"])
        values = validate_inputs(plan.resource.spec.inputs, inputs)
        now = time.time()
        run_id, created = start_run(self.store, self.app, plan, values, idempotency_key)
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
        """Stop a run: no new step starts, running step tasks are revoked, children cancelled."""
        now = time.time()
        try:
            self.store.move_run(
                run_id,
                ACTIVE,
                "cancelled",
                {"ts": now, "type": "run.cancelled", "step": ""},
                {"finished_at": now},
            )
        except redis.ResponseError as exc:
            raise self._state_error(run_id, exc, "cancel") from None
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
        for name, child in raw.items():
            if name.startswith("c:"):
                with contextlib.suppress(InvalidState, NotFound):
                    self.cancel(child)
        run_ended(self.store, self.app, run_id)
        return self.get(run_id)

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
        flow, version = self.store.r.hmget(self.store.run_key(run_id), ["flow", "version"])
        step, _, rest = key.partition("[")
        path = [int(i) for i in rest.rstrip("]").split("][")] if rest else []
        wake_step(self.app, run_id, flow, version, step, path)

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
            fields += [f"{p}:{key}" for p in ("s", "o", "f", "n", "c", "e", "pe")]
            self.store.r.delete(self.store.fanin_key(run_id, key))
        self.store.delete_fields(run_id, fields)
        self.store.r.delete(self.store.comp_key(run_id))
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

    def wait(
        self, run_id: str, timeout: float | None = 60.0, poll: float = 0.2, run: Run | None = None
    ) -> dict[str, Any]:
        """Block until the run ends: its outputs, or RunFailed; TimeoutError past ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.005
        while True:
            status = self.store.r.hget(self.store.run_key(run_id), "status")
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
