"""The sweep on real processes: a beat's tick, run by a worker, moves on the runs that no
message will move: published again, marked unconsumed, or reaped."""

from __future__ import annotations

import time

import pytest

from orchestrator import Client, RunFailed
from orchestrator.runtime import new_run_id
from orchestrator.settings import Settings
from tests.integration.flows import deploy
from tests.support import wait_for

FAST = {
    "ORCHESTRATOR_TICK_S": "0.2",
    "ORCHESTRATOR_SWEEP_S": "0.5",
    "ORCHESTRATOR_PENDING_WARN_S": "1",
    "ORCHESTRATOR_REAPER_MARGIN_S": "1",
}


@pytest.fixture(scope="module")
def orch_env(orch_env: dict[str, str]) -> dict[str, str]:
    return {**orch_env, **FAST}


@pytest.fixture(scope="module")
def client(settings: Settings):
    c = Client(settings)
    yield c
    c.close()


@pytest.fixture
def beat(beat_factory):
    return beat_factory()


STEP = "apiVersion: orchestrator/v1\nkind: Flow\nmetadata: {name: NAME}\nspec:\n  steps:\n"


def _stored_run(client: Client, name: str, status: str, age: float, **fields) -> str:
    """A run written straight into Redis, as a producer or worker that died left it."""
    info = client.store.flow_info(name)
    rid, now = new_run_id(), time.time()
    client.store.create_run(
        {
            "id": rid,
            "flow": name,
            "version": info["version"],
            "status": status,
            "inputs": {},
            "created_at": now - age,
        },
        {"ts": now, "type": "run.created", "step": ""},
    )
    if fields:
        client.store.set_fields(rid, fields)
    return rid


def test_a_run_its_producer_never_published_is_published_by_the_sweep(client, worker, beat):
    name = deploy(client, STEP + "    - {id: a, task: ctl.add, with: {a: 2, b: 3}}\n")
    rid = _stored_run(client, name, "pending", age=60)
    assert client.get(rid).wait(timeout=30) == {}
    assert client.get(rid).steps["a"].output == 5
    assert client.store.read_fields(rid, ["published"])[0] is not None


def test_a_run_whose_queue_nobody_consumes_says_so(client, worker, beat):
    name = deploy(
        client, STEP + "    - {id: a, task: ctl.add, with: {a: 1, b: 1}, queue: nobody}\n"
    )
    run = client.trigger(name)
    wait_for(lambda: client.get(run.id).reason, timeout=30, message="a reason for pending")
    fresh = client.get(run.id)
    assert fresh.status == "pending"
    assert "no live worker consumes queue 'nobody'" in fresh.reason
    events = [e for e in client.events(run.id) if e["type"] == "run.unconsumed"]
    assert len(events) == 1 and events[0]["consumed"] == "no"


def test_a_step_running_past_its_hard_limit_with_no_lease_is_reaped(client, worker, beat):
    name = deploy(
        client,
        STEP + "    - {id: stuck, task: ctl.add, with: {a: 1, b: 1}, timeout: 1s,"
        " compensate: {id: undo, task: ctl.add, with: {a: 0, b: 0}}}\n",
    )
    now = time.time()
    record = {
        "status": "running",
        "attempts": 1,
        "started_at": now - 30,
        "worker": "gone@nowhere:1",
        "task_id": "t-gone",
        "lease": 2,
    }
    rid = _stored_run(client, name, "running", age=30, **{"s:stuck": record})
    with pytest.raises(RunFailed) as info:
        client.get(rid).wait(timeout=30)
    run = info.value.run
    assert run.steps["stuck"].status == "failed"
    assert run.steps["stuck"].error["type"] == "Reaped"
    assert run.status == "failed"


def test_a_step_with_a_live_lease_is_not_reaped(client, worker, beat):
    name = deploy(
        client, STEP + "    - {id: long, task: ctl.add, with: {a: 1, b: 1}, timeout: 1s}\n"
    )
    now = time.time()
    record = {
        "status": "running",
        "attempts": 1,
        "started_at": now - 30,
        "worker": "w@h:1",
        "task_id": "t-live",
        "lease": 2,
    }
    lease = {"t": "t-live", "w": "w@h:1", "u": now + 3600}
    rid = _stored_run(client, name, "running", age=30, **{"s:long": record, "l:long": lease})
    marker = _stored_run(client, name, "running", age=30, **{"s:long": {**record, "task_id": "x"}})
    wait_for(lambda: client.get(marker).status == "failed", timeout=30, message="a sweep passed")
    assert client.get(rid).status == "running"
