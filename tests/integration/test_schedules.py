"""Schedules fired by real beat processes, and waits that outlive every process."""

from __future__ import annotations

import time
import uuid

import pytest

from orchestrator.model import ScheduleSpec
from orchestrator.scheduler import due_fires, next_fire
from tests.support import wait_for

pytestmark = pytest.mark.integration

FAST_TICK = {"ORCHESTRATOR_TICK_S": "0.5"}


def test_two_beats_fire_a_minute_cron_once_and_stop_with_the_flow(client, worker, beat_factory):
    name = f"nightly-{uuid.uuid4().hex[:6]}"
    client.deploy(f"""
apiVersion: orchestrator/v1
kind: Flow
metadata: {{name: {name}}}
spec:
  inputs: {{label: {{type: string, required: true}}}}
  steps: [{{id: report, task: ctl.add, with: {{a: 1, b: 2}}}}]
---
apiVersion: orchestrator/v1
kind: Schedule
metadata: {{name: {name}-every-minute}}
spec: {{flow: {name}, cron: "* * * * *", inputs: {{label: tick}}}}
""")
    beat_factory(FAST_TICK)
    beat_factory(FAST_TICK)
    sched = f"{name}-every-minute"
    first = float(client.store.schedule_state(sched)["next"])
    # The first fire time is the next minute boundary: at most a minute away.
    runs = wait_for(lambda: client.runs(flow=name), timeout=90, message="schedule fired")
    wait_for(
        lambda: float(client.store.schedule_state(sched)["next"]) > first,
        timeout=30,
        message="schedule moved on",
    )
    wait_for(lambda: client.runs(flow=name)[0].status == "succeeded", timeout=30)
    assert len(client.runs(flow=name)) == 1  # two beats, one run for the fire time
    assert runs[0].idempotency_key == f"schedule:{sched}:{int(first)}"
    # Stopping the flow stops its schedule: the next minute passes without a run.
    client.stop_flow(name)
    second = first + 60
    wait_for(
        lambda: float(client.store.schedule_state(sched)["next"]) > second,
        timeout=90,
        message="the second fire time passed",
    )
    assert len(client.runs(flow=name)) == 1


def test_due_fires_catchup_rules():
    every_minute = ScheduleSpec(flow="f", cron="* * * * *")
    start = 1_800_000_000.0 - 1_800_000_000.0 % 60  # a minute boundary
    fires, nxt = due_fires(every_minute, start, start + 5)
    assert fires == [start] and nxt == start + 60
    # Beat was down for ten minutes: skip runs nothing for the missed times...
    fires, nxt = due_fires(every_minute, start, start + 600 + 5)
    assert fires == [start + 600] and nxt == start + 660  # ...but the on-time one runs
    late = ScheduleSpec(flow="f", cron="0 * * * *", catchup="once")
    hour = start - start % 3600
    fires, nxt = due_fires(late, hour, hour + 3 * 3600 + 1800)
    assert fires == [hour + 3 * 3600] and nxt == hour + 4 * 3600
    skip = ScheduleSpec(flow="f", cron="0 * * * *")
    assert due_fires(skip, hour, hour + 3 * 3600 + 1800)[0] == []


def test_next_fire_honours_the_time_zone():
    spec = ScheduleSpec(flow="f", cron="0 2 * * *", timezone="Europe/Paris")
    # 2026-07-01 00:30 UTC is 02:30 in Paris (UTC+2): the next 02:00 Paris is the next day.
    t = next_fire(spec, 1_782_865_800.0)
    assert time.gmtime(t)[:5] == (2026, 7, 2, 0, 0)


def test_sleep_survives_a_restart_of_every_worker_and_beat(
    client, worker_factory, beat_factory, orch_env
):
    queue = f"restart-{uuid.uuid4().hex[:6]}"
    name = f"nap-{uuid.uuid4().hex[:6]}"
    client.deploy(f"""
apiVersion: orchestrator/v1
kind: Flow
metadata: {{name: {name}}}
spec:
  defaults: {{queue: {queue}}}
  steps:
    - {{id: before, task: ctl.add, with: {{a: 1, b: 1}}}}
    - {{id: nap, sleep: 3s}}
    - {{id: after, task: ctl.add, with: {{a: "${{steps.before.output}}", b: 1}}}}
  outputs: {{after: "${{steps.after.output}}"}}
""")
    env = {"ORCHESTRATOR_DEFAULT_QUEUE": queue, **FAST_TICK}
    w = worker_factory(queues=[queue], env=env, name="first")
    b = beat_factory(env)
    run = client.trigger(name)
    wait_for(lambda: client.get(run.id).status == "waiting", timeout=20, message="sleeping")
    w.kill()  # SIGKILL: nothing is left of the process that started the sleep
    b.kill()
    worker_factory(queues=[queue], env=env, name="second")
    beat_factory(env)
    assert run.wait(timeout=30) == {"after": 3}
    steps = client.get(run.id).steps
    assert steps["nap"].finished_at - steps["nap"].started_at >= 3.0
