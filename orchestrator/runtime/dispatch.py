"""The producer side: the messages that start a run, wake a parked step or resume a parent.

The client, the API, the scheduler, the event triggers and the runtime itself (a subflow,
a run that ends) send through these, so a run starts and ends the same way from each."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from typing import Any

from celery import Celery

from ..compiler import STEP_TASK, CanvasBuilder
from ..errors import FlowStopped, IdempotencyConflict, NotFound
from ..inputs import validate_inputs
from ..limits import check_value
from ..plan import Plan, StepAddress
from ..publishing import publish
from ..store import RedisStore

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
    _send_to_step(app, plan_for, address, {"wake": True})


def notify_parent(app: Celery, plan_for: PlanFor, parent: dict[str, Any], child_id: str) -> None:
    """Send the parent's subflow step the message that resumes it."""
    _send_to_step(app, plan_for, StepAddress.from_parent(parent), {"resume": child_id})


def _send_to_step(
    app: Celery, plan_for: PlanFor, address: StepAddress, kwargs: dict[str, Any]
) -> None:
    """A step message for a step that continues the run, on that step's own queue."""
    sig = app.signature(
        STEP_TASK,
        args=address.message_args(True),
        kwargs=kwargs,
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


def new_run_id() -> str:
    """Sortable by creation time (millisecond hex prefix), 64 random bits after it."""
    return f"{int(time.time() * 1000):011x}{secrets.token_hex(8)}"
