"""The sweep: what moves a run on when the message that should have did not come.

Every crash path we know of gives a step's message back (recovery.py), but a run must not
depend on that alone. The beat's tick runs :func:`sweep` at most once per ``sweep_s`` across
all workers (a ``SET NX`` lock), over at most ``SWEEP_RUNS`` active runs per pass, taking up
where the last pass stopped (a cursor in Redis), so a pass costs about the same however many
runs are active. For each run it

* publishes again a run that is ``pending`` without ``published`` for ``UNPUBLISHED_S``: its
  producer died between storing it and publishing its first canvas (a duplicate message is
  harmless: the first delivery marks the step running, a second one finds it so);
* marks a run that stays ``pending`` after it was published for ``pending_warn_s``: a
  ``run.unconsumed`` event and a ``reason`` field (shown by the client, CLI and API) that
  names the queue and whether any live worker consumes it (workers say which queues they
  consume with their heartbeat, in ``Pnodes``);
* reaps a step still ``running`` ``reaper_margin_s`` past its hard time limit whose lease
  (recovery.py) is not live: nothing runs it and no message will come for it. It is recorded
  failed (``Reaped``) and the failure goes where any step failure goes (a ``catch``, the
  saga's compensations, the run's end).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from typing import Any

from celery import Task

from .compiler import CanvasBuilder
from .errors import NotFound, StepError
from .plan import parse_key
from .runtime import Engine, Execution, PermanentError, publish

log = logging.getLogger("orchestrator.sweep")

#: Active runs looked at per sweep.
SWEEP_RUNS = 200
#: A run pending this long without ``published`` lost its producer before publishing.
UNPUBLISHED_S = 30.0


def sweep(eng: Engine, task: Task, now: float | None = None, force: bool = False) -> dict:
    """One pass over the next ``SWEEP_RUNS`` active runs; what it did, by kind."""
    now = time.time() if now is None else now
    store = eng.store
    done = {"published": 0, "unconsumed": 0, "reaped": 0}
    if not force and not store.claim_sweep(eng.settings.sweep_s):
        return done
    ids = store.sweep_batch(now, SWEEP_RUNS)
    nodes = _live_queues(eng, now)
    for run_id, _score in ids:
        try:
            _sweep_run(eng, task, run_id, now, nodes, done)
        except Exception as exc:  # noqa: BLE001 - one broken run must not stop the sweep
            log.warning("sweep: run %s: %s", run_id, exc)
    return done


def _live_queues(eng: Engine, now: float) -> set[str] | None:
    """Queues consumed by workers that heartbeated within a lease; None: nobody reports."""
    reports = eng.store.nodes()
    if not reports:
        return None
    queues: set[str] = set()
    for node in reports.values():
        if now - node.get("at", 0) <= eng.settings.lease_s * 2:
            queues.update(node.get("queues", []))
    return queues


def _sweep_run(
    eng: Engine, task: Task, run_id: str, now: float, nodes: set[str] | None, done: dict
) -> None:
    store = eng.store
    status, flow, version, created, published, reason = store.read_fields(
        run_id, ["status", "flow", "version", "created_at", "published", "reason"]
    )
    if status is None or flow is None or version is None:
        return
    try:
        plan = eng.plan(flow, version)
    except PermanentError:
        return
    if status == "pending":
        first = plan.first(plan.top)
        queue = first.options.get("queue") or eng.settings.default_queue
        if published is None and now - float(created or now) > UNPUBLISHED_S:
            publish(task.app, [CanvasBuilder(task.app, plan, run_id).from_node(first)])
            store.set_fields(run_id, {"published": now})
            done["published"] += 1
        elif (
            published is not None
            and reason is None
            and eng.settings.pending_warn_s > 0
            and now - float(published) > eng.settings.pending_warn_s
        ):
            consumed = "unknown" if nodes is None else ("yes" if queue in nodes else "no")
            why = (
                f"no live worker consumes queue {queue!r}"
                if consumed == "no"
                else f"its first step waits in queue {queue!r}"
            )
            waited = now - float(published)
            text = f"still pending after {waited:.0f} s: {why}"
            store.set_fields(run_id, {"reason": text})
            store.complete_step(
                run_id,
                [],
                [
                    {
                        "ts": now,
                        "type": "run.unconsumed",
                        "step": "",
                        "queue": queue,
                        "consumed": consumed,
                        "message": text,
                    }
                ],
            )
            done["unconsumed"] += 1
        return
    if status == "running":
        done["reaped"] += _reap(eng, task, plan, run_id, now)


def _reap(eng: Engine, task: Task, plan: Any, run_id: str, now: float) -> int:
    """Fail the steps of a run that run past their hard limit with no live lease."""
    reaped = 0
    for key, rec in eng.store.step_records(run_id).items():
        if rec.get("status") != "running":
            continue
        node_id, path = parse_key(key)
        node = plan.nodes.get(node_id)
        if node is None:
            continue
        hard = float(node.options.get("time_limit") or eng.settings.default_step_timeout_s)
        if now < float(rec.get("started_at", now)) + hard + eng.settings.reaper_margin_s:
            continue
        if _lease_live(eng, run_id, key, rec, now):
            continue
        x = Execution(eng, task, plan, node, run_id, path, tail=False)
        x._adopt()
        limit = hard + eng.settings.reaper_margin_s
        error = {
            "type": "Reaped",
            "message": f"step {key!r} was still running {limit:g} s after it started, past "
            "its hard time limit, and no worker held it: nothing would ever end it",
            "step": key,
        }
        with contextlib.suppress(StepError, NotFound):  # _fail raises what it recorded
            x._fail(PermanentError(error["message"]), None, error)
        log.warning("sweep: reaped step %s of run %s", key, run_id)
        reaped += 1
    return reaped


def _lease_live(eng: Engine, run_id: str, key: str, rec: dict, now: float) -> bool:
    """As ``lua/begin_step.lua`` reads it: the step's lease has not run out."""
    until = rec["started_at"] + rec["lease"] if rec.get("lease") else None
    raw = eng.store.read_fields(run_id, [f"l:{key}"])[0]
    if raw:
        lease = json.loads(raw)
        if lease.get("t") == rec.get("task_id") and lease.get("w") == rec.get("worker"):
            until = lease.get("u")
    return bool(until and until > now)
