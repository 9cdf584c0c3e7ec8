"""Crash recovery and shutdown with real worker processes (README "Crash recovery and shutdown").

Workers here heartbeat every ``HEARTBEAT_S`` and a lease lasts ``LEASE_S`` (production
defaults: 5 s and 15 s), so a dead worker's steps are back within seconds. Every test
routes its flow to a queue of its own, served only by the workers it starts. The tasks
(``tests/recovery_tasks.py``) record every execution's start and worker in Redis and count
two executions of one step running at once (``overlap``), which must never happen.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest

from orchestrator.compiler import CanvasBuilder
from orchestrator.runtime import new_run_id
from orchestrator.store import _script
from tests.integration.flows import deploy, key, waiting
from tests.support import wait_for

HEARTBEAT_S = 0.5
LEASE_S = 2.0
#: Longest a dead node's step may wait for another worker: the lease, the sweep that
#: notices it (one heartbeat), one deferral while the running record's lease lapses, and
#: scheduling slack on a loaded two-core machine.
RECOVERY_BOUND_S = LEASE_S + 2 * HEARTBEAT_S + 2.0


@pytest.fixture
def queue() -> str:
    return f"rec-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def env(orch_env: dict[str, str], queue: str) -> dict[str, str]:
    """Worker environment: this test's queue, the recovery tasks, fast heartbeats."""
    return {
        "ORCHESTRATOR_DEFAULT_QUEUE": queue,
        "ORCHESTRATOR_TASK_MODULES": orch_env["ORCHESTRATOR_TASK_MODULES"]
        + ",tests.recovery_tasks",
        "ORCHESTRATOR_HEARTBEAT_S": str(HEARTBEAT_S),
        "ORCHESTRATOR_LEASE_S": str(LEASE_S),
    }


class Traces:
    """What ``tests/recovery_tasks.py`` recorded about the executions of one run's steps."""

    def __init__(self, r, ns: str, run_id: str):
        self.r, self.ns, self.run_id = r, ns, run_id

    def starts(self, step: str) -> list[tuple[float, str]]:
        raw = self.r.lrange(f"{self.ns}:{self.run_id}:{step}:starts", 0, -1)
        return [(float(t), w) for t, w in (s.split(" ", 1) for s in raw)]

    def overlap(self, step: str) -> int:
        return int(self.r.get(f"{self.ns}:{self.run_id}:{step}:overlap") or 0)


def test_a_redelivery_runs_only_when_the_execution_it_started_is_gone(client) -> None:
    """The verdicts of begin_step.lua for a step recorded running, lease by lease."""
    store = client.store
    renew = store.r.register_script(_script("renew_lease"))
    release = store.r.register_script(_script("release_lease"))
    run_id, worker = new_run_id(), "node@host:4242"
    now = time.time()
    store.create_run(
        {"id": run_id, "flow": "f", "version": "v", "status": "running", "created_at": now},
        {"ts": now, "type": "run.created", "step": ""},
    )
    keys = [store.run_key(run_id)]

    def begin(task_id: str = "T1", lease: float | None = 30.0, started: float = now) -> str:
        rec = {"status": "running", "task_id": "T1", "worker": worker, "started_at": started}
        if lease is not None:
            rec["lease"] = lease
        store.set_fields(run_id, {"s:s": rec})  # as the first delivery recorded it
        return store.begin_step(run_id, "s", task_id, False, None, None, [])[0]

    assert begin(lease=None) == "run"  # a worker without heartbeats: as before
    assert begin() == "held"  # started just now: its record's lease (30 s) is live
    assert begin(started=now - 60) == "run"  # a minute on without a heartbeat: gone
    assert begin("T2") == "busy"  # another message for the same step: dropped
    assert renew(keys=keys, args=["s", "T1", worker, 30]) == 1
    assert begin(started=now - 60) == "held"  # heartbeated: alive whatever its age
    assert renew(keys=keys, args=["s", "T1", "node@host:1", 30]) == 0  # not that process's
    assert release(keys=keys, args=["s", "T1", worker]) == 1  # its process died
    assert begin() == "run"  # the lease lapsed at once, before the record's own
    assert renew(keys=keys, args=["s", "T1", worker, 30]) == 0  # a late heartbeat: still dead
    assert begin() == "run"
    store.set_fields(run_id, {"s:s": {"status": "succeeded", "task_id": "T1"}})
    assert release(keys=keys, args=["s", "T1", worker]) == 1  # ended: the lease is dropped
    assert "l:s" not in store.run_hash(run_id)


HOLD_THEN_EFFECT = """
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: NAME}
spec:
  defaults: {queue: QUEUE}
  inputs: {ns: {type: string}, release: {type: string}}
  steps:
    - {id: hold, task: rec.hold, with: {ns: "${inputs.ns}", release: "${inputs.release}"}}
    - {id: after, task: rec.effect, with: {ns: "${inputs.ns}", value: 1}}
  outputs: {after: "${steps.after.output}"}
"""


def start_hold(client, queue: str) -> tuple:
    """Deploy and trigger HOLD_THEN_EFFECT; (run, traces, release key)."""
    name = deploy(client, HOLD_THEN_EFFECT.replace("QUEUE", queue))
    ns, release = key(), key()
    run = client.trigger(name, {"ns": ns, "release": release})
    return run, ns, release


def test_a_sigkilled_worker_nodes_step_runs_again_elsewhere_within_the_lease(
    client, worker_factory, env, queue, r, record
) -> None:
    doomed = worker_factory(queues=[queue], env=env, concurrency=1, name="doomed")
    run, ns, release = start_hold(client, queue)
    traces = Traces(r, ns, run.id)
    wait_for(lambda: traces.starts("hold"), timeout=20, message="hold never started")
    survivor = worker_factory(queues=[queue], env=env, concurrency=1, name="survivor")
    # The live node heartbeats its step: it holds a lease, and the survivor (sweeping
    # every heartbeat) never takes the message while the node lives.
    wait_for(lambda: client.store.run_hash(run.id).get("l:hold"), timeout=10, message="no lease")
    killed_at = time.time()
    doomed.kill()  # SIGKILL the whole node: main process and pool child
    wait_for(
        lambda: len(traces.starts("hold")) == 2,
        timeout=RECOVERY_BOUND_S + 10,
        message="the step did not run again after its worker died",
    )
    (_, first), (again, second) = traces.starts("hold")
    recovery = again - killed_at
    record("recovery_s", round(recovery, 2))
    assert first.startswith(doomed.hostname) and second.startswith(survivor.hostname)
    assert recovery < RECOVERY_BOUND_S, f"recovered after {recovery:.1f} s"
    r.set(release, "1")
    assert run.wait(timeout=30) == {"after": 2}
    assert traces.overlap("hold") == 0
    assert client.get(run.id).steps["hold"].attempts == 1  # a redelivery is not a retry


def test_a_step_outliving_the_visibility_timeout_runs_once(
    client, worker_factory, env, queue, r
) -> None:
    # The broker would deliver the message again after 3 s and every worker sweeps
    # messages nobody heartbeated for 2 s; the step runs 7 s next to idle workers.
    env = {**env, "ORCHESTRATOR_VISIBILITY_TIMEOUT_S": "3"}
    for n in ("one", "two"):
        worker_factory(queues=[queue], env=env, concurrency=2, name=n)
    name = deploy(
        client,
        f"""
apiVersion: orchestrator/v1
kind: Flow
metadata: {{name: NAME}}
spec:
  defaults: {{queue: {queue}}}
  inputs: {{ns: {{type: string}}}}
  steps:
    - {{id: long, task: rec.work, with: {{ns: "${{inputs.ns}}", seconds: 7}}}}
  outputs: {{seconds: "${{steps.long.output}}"}}
""",
    )
    ns = key()
    run = client.trigger(name, {"ns": ns})
    assert run.wait(timeout=40) == {"seconds": 7}
    traces = Traces(r, ns, run.id)
    assert len(traces.starts("long")) == 1
    assert traces.overlap("long") == 0
    started = [e for e in client.events(run.id) if e["type"] == "step.started"]
    assert len(started) == 1


def test_a_second_delivery_waits_for_the_running_step_and_takes_over_when_it_dies(
    client, worker_factory, env, queue, r
) -> None:
    holder = worker_factory(queues=[queue], env=env, concurrency=1, name="holder")
    run, ns, release = start_hold(client, queue)
    traces = Traces(r, ns, run.id)
    wait_for(lambda: traces.starts("hold"), timeout=20, message="hold never started")
    other = worker_factory(queues=[queue], env=env, concurrency=1, name="other")
    # The same message again (as the broker redelivers it: same task id) while it runs.
    task_id = json.loads(client.store.run_hash(run.id)["s:hold"])["task_id"]
    plan = client.plan(run.flow, run.version)
    sig = CanvasBuilder(client.app, plan, run.id).signature(plan.nodes["hold"], (), tail=False)
    sig.apply_async(task_id=task_id)
    wait_for(
        lambda: f"[{task_id}] retry" in other.log_text(),
        timeout=20,
        message="the second delivery was not held back",
    )
    assert len(traces.starts("hold")) == 1
    holder.kill()
    wait_for(
        lambda: len(traces.starts("hold")) == 2,
        timeout=RECOVERY_BOUND_S + 10,
        message="nobody took over the step",
    )
    r.set(release, "1")
    assert run.wait(timeout=30) == {"after": 2}
    assert len(traces.starts("hold")) == 2
    assert traces.overlap("hold") == 0


def test_sigterm_lets_the_running_step_finish(client, worker_factory, env, queue, r) -> None:
    w = worker_factory(
        queues=[queue], env={**env, "ORCHESTRATOR_SHUTDOWN_TIMEOUT_S": "30"}, concurrency=1
    )
    run, ns, release = start_hold(client, queue)
    traces = Traces(r, ns, run.id)
    wait_for(lambda: traces.starts("hold"), timeout=20, message="hold never started")
    w.proc.terminate()  # SIGTERM: warm shutdown
    wait_for(lambda: "Warm shutdown" in w.log_text(), timeout=10, message="no warm shutdown began")
    assert w.running  # waiting for its step
    r.set(release, "1")
    wait_for(lambda: not w.running, timeout=20, message="the worker did not exit")
    assert w.returncode == 0
    assert client.get(run.id).steps["hold"].status == "succeeded"
    worker_factory(queues=[queue], env=env, concurrency=1, name="next")
    assert run.wait(timeout=30) == {"after": 2}
    assert len(traces.starts("hold")) == 1


def test_a_step_still_running_at_the_shutdown_limit_goes_back_to_the_queue(
    client, worker_factory, env, queue, r, record
) -> None:
    w = worker_factory(
        queues=[queue], env={**env, "ORCHESTRATOR_SHUTDOWN_TIMEOUT_S": "1"}, concurrency=1
    )
    run, ns, release = start_hold(client, queue)
    traces = Traces(r, ns, run.id)
    wait_for(lambda: traces.starts("hold"), timeout=20, message="hold never started")
    nxt = worker_factory(queues=[queue], env=env, concurrency=1, name="next")
    term_at = time.time()
    w.proc.terminate()
    wait_for(lambda: not w.running, timeout=15, message="the worker ignored its shutdown limit")
    stopped = time.time() - term_at
    wait_for(
        lambda: len(traces.starts("hold")) == 2,
        timeout=RECOVERY_BOUND_S + 10,
        message="the interrupted step did not run again",
    )
    requeued = traces.starts("hold")[1][0] - term_at
    record("shutdown_s", round(stopped, 2))
    record("requeued_s", round(requeued, 2))
    assert traces.starts("hold")[1][1].startswith(nxt.hostname)
    assert "still running after 1 s" in w.log_text()
    r.set(release, "1")
    assert run.wait(timeout=30) == {"after": 2}
    assert traces.overlap("hold") == 0


def test_a_waiting_run_is_not_disturbed_by_workers_and_beat_stopping(
    client, worker_factory, beat_factory, env, orch_env, r, record
) -> None:
    # The module's default queue (the client sends decisions' wake-ups there).
    queue = orch_env["ORCHESTRATOR_DEFAULT_QUEUE"]
    env = {**env, "ORCHESTRATOR_DEFAULT_QUEUE": queue, "ORCHESTRATOR_TICK_S": "0.2"}
    name = deploy(
        client,
        """
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: NAME}
spec:
  inputs: {ns: {type: string}}
  steps:
    - id: ok
      approval: {approvers: [alice]}
    - {id: nap, sleep: 1s}
    - {id: after, task: rec.effect, with: {ns: "${inputs.ns}", value: 1}}
  outputs: {after: "${steps.after.output}", by: "${steps.ok.output.by}"}
""",
    )
    w, b = worker_factory(queues=[queue], env=env, name="first"), beat_factory(env)
    ns = key()
    run = client.trigger(name, {"ns": ns})
    waiting(client, run.id, "ok")
    for p, what in ((w, "worker"), (b, "beat")):  # SIGTERM: a waiting run holds no slot
        began = time.monotonic()
        p.stop(timeout=10)
        took = time.monotonic() - began
        record(f"{what}_stop_s", round(took, 2))
        assert p.returncode == 0 and took < 8
    worker_factory(queues=[queue], env=env, name="second")
    beat_factory(env)
    client.approve(run.id, "ok", by="alice")  # then the new beat's tick ends the nap
    assert run.wait(timeout=30) == {"after": 2, "by": "alice"}
    steps = client.get(run.id).steps
    assert steps["nap"].finished_at - steps["nap"].started_at >= 1.0
    assert len(Traces(r, ns, run.id).starts("after")) == 1
