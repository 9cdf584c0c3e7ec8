"""The Python producer API: deploy definitions, trigger runs, read and wait for them."""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from celery import Celery

from .app import create_app
from .compiler import CanvasBuilder, Plan
from .errors import FlowStopped, NotFound, RunFailed
from .inputs import validate_inputs
from .loader import Loaded, load, load_string, validate_flow, version_of
from .model import FlowResource
from .settings import Settings
from .store import ENDED, RedisStore

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
    created: bool  # True when the flow was new


class Client:
    """Talks to Redis (state) and the broker (to start runs); safe to share across threads."""

    def __init__(self, settings: Settings | None = None, app: Celery | None = None):
        self.settings = settings or Settings()
        self.store = RedisStore(self.settings)
        self.app = app or create_app(self.settings, set_as_current=False)
        self._plans: dict[tuple[str, str], Plan] = {}

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
        out = []
        for res in resources:
            version = version_of(res)
            created = self.store.save_definition(
                res.name, version, res.document(), res.spec.initial_state
            )
            out.append(Deployed(res.name, version, created))
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
            elif isinstance(src, str) and "\n" in src:
                out.extend(load_string(src, settings=self.settings))
            elif isinstance(src, str | os.PathLike):
                out.extend(load(src, self.settings))
            else:
                out.extend(self._load(src))
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
        plan = self._plans.get((name, version))
        if plan is None:
            doc = self.store.get_definition(name, version)
            if doc is None:
                raise NotFound(f"flow {name!r} has no version {version}")
            plan = self._plans[(name, version)] = Plan(
                FlowResource.model_validate(doc), version, self.settings
            )
        return plan

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
        run_id = new_run_id()
        if idempotency_key is not None:
            owner = self.store.claim_idempotency(flow, idempotency_key, run_id)
            if owner != run_id:
                try:
                    return self.get(owner)
                except NotFound:
                    run_id = owner  # claimed, but its creator died before creating it
        now = time.time()
        record = {
            "id": run_id,
            "flow": flow,
            "version": plan.version,
            "status": "pending",
            "inputs": values,
            "created_at": now,
            "idempotency_key": idempotency_key,
        }
        event = {"ts": now, "type": "run.created", "step": "", "version": plan.version}
        if not self.store.create_run(record, event):
            return self.get(run_id)
        canvas = CanvasBuilder(self.app, plan, run_id).from_node(plan.first(plan.top))
        try:
            canvas.apply_async()
        except Exception as exc:
            error = {
                "type": type(exc).__name__,
                "message": f"could not publish: {exc}",
                "step": None,
            }
            self.store.move_run(
                run_id,
                ("pending",),
                "failed",
                {"ts": time.time(), "type": "run.failed", "step": "", "error": error},
                {"error": error, "finished_at": time.time()},
            )
            raise
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


def new_run_id() -> str:
    """Sortable by creation time (millisecond hex prefix), 64 random bits after it."""
    return f"{int(time.time() * 1000):011x}{secrets.token_hex(8)}"
