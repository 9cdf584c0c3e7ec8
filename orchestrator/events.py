"""Event channels: publish an event, start the runs its subscriptions ask for.

A channel is a Redis stream (``Pchannel:<name>``). :func:`publish` appends the event
``{id, channel, data, time}`` and sends one small task, ``orchestrator.event``, that a
worker runs: for each ``EventSubscription`` of the channel it evaluates ``filter`` and
``inputs`` (expressions over ``event``) and triggers the flow with the idempotency key
``event:<subscription>:<event id>``, so an event published twice with the same id, or
delivered twice by Celery, starts at most one run per subscription.

An event that matches but cannot start a run (an expression fails, the inputs do not
validate, the flow is stopped or gone) is appended to the channel's dead-letter stream
(``Pchannel:<name>:dead``) with the subscription and the reason; :func:`replay`
tries such entries again once the cause is fixed, and removes those that now start.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from celery import Celery, Task, shared_task

from . import expressions
from .errors import InputError, NotFound, OrchestratorError
from .model import CHANNEL_RE
from .plan import Plan
from .runtime import engine_for, trigger_flow
from .store import RedisStore

log = logging.getLogger("orchestrator.events")

EVENT_TASK = "orchestrator.event"
_CHANNEL = re.compile(CHANNEL_RE)
_EVENT_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")


def check_channel(channel: str) -> str:
    if not isinstance(channel, str) or not _CHANNEL.match(channel):
        raise InputError(
            "channel",
            "expected 1-100 letters, digits, '_', '.', ':' or '-' (starting with a letter "
            f"or digit); got {channel!r}",
        )
    return channel


def publish(
    store: RedisStore, app: Celery, channel: str, data: Any = None, event_id: str | None = None
) -> dict[str, Any]:
    """Append an event to ``channel`` and have a worker dispatch it; returns the event."""
    check_channel(channel)
    if event_id is None:
        event_id = uuid.uuid4().hex
    elif not isinstance(event_id, str) or not _EVENT_ID.match(event_id):
        raise InputError(
            "id", f"expected 1-200 letters, digits, '_', '.', ':' or '-'; got {event_id!r}"
        )
    event = {"id": event_id, "channel": channel, "data": data, "time": time.time()}
    stream_id = store.add_event(channel, event)
    app.send_task(
        EVENT_TASK,
        args=(channel, stream_id),
        queue=store.settings.default_queue,
        ignore_result=True,
    )
    return {**event, "stream_id": stream_id}


@shared_task(name=EVENT_TASK, bind=True, ignore_result=True)
def dispatch_task(self: Task, channel: str, stream_id: str) -> dict[str, int]:
    """Start the runs an event's subscriptions ask for (see the module docstring)."""
    eng = engine_for(self.app)
    event = eng.store.channel_entry(channel, stream_id)
    if event is None:  # trimmed away already: nothing to do
        log.warning("event %s on channel %s is gone", stream_id, channel)
        return {"started": 0, "dead": 0}
    outcomes = dispatch(eng.store, self.app, eng.plan, event)
    return {
        "started": sum(1 for o in outcomes if o.get("run")),
        "dead": sum(1 for o in outcomes if o.get("dead")),
    }


def dispatch(
    store: RedisStore,
    app: Celery,
    plan_for: Callable[[str, str], Plan],
    event: dict[str, Any],
) -> list[dict[str, Any]]:
    """Deliver ``event`` to every subscription of its channel; one outcome each."""
    subs = store.resources("EventSubscription")
    return [
        deliver(store, app, plan_for, name, spec, event)
        for name, spec in sorted(subs.items())
        if spec.get("channel") == event["channel"]
    ]


def deliver(
    store: RedisStore,
    app: Celery,
    plan_for: Callable[[str, str], Plan],
    name: str,
    spec: dict[str, Any],
    event: dict[str, Any],
) -> dict[str, Any]:
    """Start (at most once) the run one subscription asks for, or dead-letter the event.

    Returns ``{subscription, run, created}``, ``{subscription, filtered: True}`` or
    ``{subscription, dead: <entry id>, reason}``.
    """
    ctx = {"event": event}
    out: dict[str, Any] = {"subscription": name}
    try:
        if spec.get("filter") is not None and not expressions.evaluate_condition(
            spec["filter"], ctx
        ):
            return {**out, "filtered": True}
        inputs = expressions.render(spec.get("inputs") or {}, ctx)
        run_id, created, _, _ = trigger_flow(
            store, app, plan_for, spec["flow"], inputs, f"event:{name}:{event['id']}"
        )
    except OrchestratorError as exc:
        reason = _reason(exc)
        entry = {
            "event": event,
            "subscription": name,
            "flow": spec.get("flow"),
            "reason": reason,
            "at": time.time(),
        }
        dead_id = store.add_event(event["channel"], entry, dead=True)
        log.warning("event %s -> %s dead-lettered: %s", event["id"], name, reason)
        return {**out, "dead": dead_id, "reason": reason}
    return {**out, "run": run_id, "created": created}


def replay(
    store: RedisStore,
    app: Celery,
    plan_for: Callable[[str, str], Plan],
    channel: str,
    ids: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Deliver dead-lettered events again (all, or those ``ids``) to their subscription.

    An entry that starts its run now is removed; one that fails again is replaced by a
    new entry with the new reason. Outcomes are in the order of the entries.
    """
    check_channel(channel)
    if ids:
        entries = []
        for i in ids:
            entry = store.channel_entry(channel, i, dead=True)
            if entry is None:
                raise NotFound(f"no dead-letter entry {i!r} on channel {channel!r}")
            entries.append((i, entry))
    else:
        entries = store.channel_entries(channel, count=10_000, dead=True)
    subs = store.resources("EventSubscription")
    outcomes = []
    for entry_id, entry in entries:
        name = entry["subscription"]
        spec = subs.get(name)
        store.remove_dead(channel, entry_id)
        if spec is None or spec.get("channel") != channel:
            reason = f"subscription {name!r} is no longer deployed on channel {channel!r}"
            dead = store.add_event(channel, {**entry, "reason": reason, "at": time.time()}, True)
            outcomes.append(
                {"entry": entry_id, "subscription": name, "dead": dead, "reason": reason}
            )
            continue
        outcome = deliver(store, app, plan_for, name, spec, entry["event"])
        outcomes.append({"entry": entry_id, **outcome})
    return outcomes


def _reason(exc: OrchestratorError) -> str:
    if isinstance(exc, InputError):
        return f"inputs.{exc.field}: {exc.reason}"
    return str(exc)
