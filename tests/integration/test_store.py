"""The Redis store's atomic transitions, against a real redis-server."""

from __future__ import annotations

import time
import uuid

import pytest

from orchestrator.settings import Settings
from orchestrator.store import NO_OUTPUT, RedisStore

pytestmark = pytest.mark.integration


@pytest.fixture(params=["redis", "cluster"])
def store(request, redis_server):
    """The same conformance tests against one redis-server and a three-node Cluster."""
    prefix = f"s{uuid.uuid4().hex[:6]}:"
    if request.param == "cluster":
        cluster = request.getfixturevalue("redis_cluster")
        settings = Settings(
            redis_url=cluster.url.replace("redis://", "redis+cluster://"),
            broker_url=redis_server.url,
            result_backend=redis_server.url,
            key_prefix=prefix,
        )
    else:
        settings = Settings(redis_url=redis_server.url, key_prefix=prefix)
    s = RedisStore(settings)
    yield s
    s.close()


def new_run(store: RedisStore) -> str:
    rid = uuid.uuid4().hex
    run = {
        "id": rid,
        "flow": "f",
        "version": "v",
        "status": "pending",
        "inputs": {"x": 1},
        "created_at": time.time(),
    }
    assert store.create_run(run, {"type": "run.created"}) is True
    return rid


def rec(status: str, task_id: str = "t1") -> dict:
    return {"status": status, "attempts": 1, "task_id": task_id}


def test_create_run_once_and_indexed(store):
    rid = new_run(store)
    again = {"id": rid, "flow": "f", "version": "v", "status": "pending", "created_at": 1.0}
    assert store.create_run(again, {"type": "run.created"}) is False
    assert store.run_ids(flow="f") == [rid]
    assert store.run_ids(status="pending") == [rid]


def test_begin_marks_running_and_reads_fields(store):
    rid = new_run(store)
    verdict, status, _rec, values = store.begin_step(
        rid, "a", "t1", True, rec("running"), {"type": "step.started"}, ["inputs", "o:zz"]
    )
    assert (verdict, status, values) == ("run", "running", ['{"x":1}', None])
    # Another message (another task id) for the same step while it runs: busy.
    assert store.begin_step(rid, "a", "t2", True, rec("running", "t2"), None, [])[0] == "busy"
    # The same message delivered again (worker lost): it may run the step, and the new
    # running record counts the death (max_deliveries).
    verdict, _status, again, _ = store.begin_step(rid, "a", "t1", True, rec("running"), None, [])
    assert verdict == "lost" and again["lost"] == 1 and again["lost_why"] == "died"


def test_complete_is_compare_and_set(store):
    rid = new_run(store)
    store.begin_step(rid, "a", "t1", True, rec("running"), None, [])
    assert store.complete_step(rid, [("a", rec("succeeded"), 42)], []) == "ok"
    assert store.complete_step(rid, [("a", rec("succeeded"), 43)], []) == "dup"
    assert store.read_fields(rid, ["o:a"]) == ["42"]
    assert store.begin_step(rid, "a", "t9", True, rec("running", "t9"), None, [])[0] == "done"


def test_final_completion_ends_and_indexes_the_run(store):
    rid = new_run(store)
    store.begin_step(rid, "a", "t1", True, rec("running"), None, [])
    final = {"status": "succeeded", "outputs": {"y": 2}, "finished_at": time.time()}
    assert store.complete_step(rid, [("a", rec("succeeded"), None)], [], final) == "ok"
    assert store.run_ids(status="succeeded") == [rid]
    assert store.run_ids(status="running") == []
    assert 0 < store.r.ttl(store.run_key(rid)) <= store.settings.retention_s
    # The run ended: a late step of it is recorded but does not continue.
    assert store.complete_step(rid, [("b", rec("succeeded"), NO_OUTPUT)], []) == "inactive"


def test_fanin_fires_once_under_redelivery(store):
    rid = new_run(store)
    assert [store.fanin(rid, "p", m, 3) for m in ("a", "b", "a")] == [False, False, False]
    assert store.fanin(rid, "p", "c", 3) is True
    assert store.fanin(rid, "p", "c", 3) is False


def test_scripts_survive_a_script_flush(store):
    store.r.script_flush()
    rid = new_run(store)  # create_run's pipeline reloads its script
    store.r.script_flush()
    assert store.begin_step(rid, "a", "t1", True, rec("running"), None, [])[0] == "run"
    store.r.script_flush()
    final = {"status": "succeeded", "finished_at": time.time()}
    assert store.complete_step(rid, [("a", rec("succeeded"), 1)], [], final) == "ok"
