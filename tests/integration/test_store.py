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


# -- the rest of the store's contract: every script and method, redis and cluster alike --


def test_move_run_is_compare_and_set_and_indexes_the_end(store):
    import redis

    rid = new_run(store)
    assert store.move_run(rid, ("pending",), "cancelled", {"type": "run.cancelled"}) == "pending"
    with pytest.raises(redis.ResponseError, match="status:cancelled"):
        store.move_run(rid, ("pending", "running"), "failed", {"type": "run.failed"})
    assert store.run_ids(status="cancelled") == [rid]
    assert 0 < store.r.ttl(store.run_key(rid)) <= store.settings.retention_s


def test_compensation_phase_is_entered_once_with_the_undo_log(store):
    rid = new_run(store)
    store.begin_step(rid, "a", "t1", True, rec("running"), None, [])
    done = [("a", rec("succeeded"), 1)]
    assert store.complete_step(rid, done, [], compensable=['["a", []]']) == "ok"
    assert store.begin_recovery(rid, {"type": "E"}, {"type": "run.failing"}) == ['["a", []]']
    assert store.begin_recovery(rid, {"type": "E"}, {"type": "run.failing"}) is None
    # Only compensation steps may start now.
    assert store.begin_step(rid, "b", "t2", True, rec("running", "t2"), None, [])[0] == "inactive"
    verdict = store.begin_step(rid, "undo", "t3", True, rec("running", "t3"), None, [], True)[0]
    assert verdict == "run"


def test_foreach_counts_each_item_once_and_frees_a_slot_per_arrival(store):
    rid = new_run(store)
    store.foreach_start(rid, "each", ["x", "y", "z"], 2)
    assert store.read_fields(rid, ["i:each[2]", "n:each"]) == ['"z"', "3"]
    assert store.foreach_arrive(rid, "each", 0) == (False, 2)
    assert store.foreach_arrive(rid, "each", 0) == (False, None)  # redelivered: counted once
    assert store.foreach_arrive(rid, "each", 1) == (False, None)
    assert store.foreach_arrive(rid, "each", 2) == (True, None)


def test_foreach_counts_started_items_in_its_own_field(store):
    rid = new_run(store)
    store.foreach_start(rid, "each", ["x", "y", "z"], 2)
    assert store.read_fields(rid, ["fc:each", "c:each"]) == ["2", None]
    assert store.foreach_arrive(rid, "each", 0) == (False, 2)
    assert store.read_fields(rid, ["fc:each", "c:each"]) == ["3", None]


def test_foreach_started_before_fc_still_completes(store):
    # A run stored by the old code keeps its started count in ``c:<key>`` (rolling deploy).
    rid = new_run(store)
    items = {f"i:each[{i}]": f'"{v}"' for i, v in enumerate("xyz")}
    store.r.hset(store.run_key(rid), mapping={**items, "n:each": 3, "c:each": 2})
    assert store.foreach_arrive(rid, "each", 0) == (False, 2)
    assert store.foreach_arrive(rid, "each", 0) == (False, None)  # redelivered: counted once
    assert store.read_fields(rid, ["c:each", "fc:each"]) == ["3", None]
    assert store.foreach_arrive(rid, "each", 1) == (False, None)
    assert store.foreach_arrive(rid, "each", 2) == (True, None)


def test_park_signal_unpark_and_decide(store):
    from orchestrator.plan import StepAddress

    rid = new_run(store)
    # A signal that comes first is kept for the wait that starts later.
    assert store.signal(rid, "paid", {"n": 1}, {"type": "signal.received"})[0] == "kept"
    waiting = {**rec("waiting"), "started_at": time.time()}
    verdict, payload = store.park(
        rid, "w", waiting, {"kind": "signal", "signal": "paid"}, {"type": "step.waiting"}, None
    )
    assert (verdict, payload) == ("signalled", {"n": 1})
    # An approval: only a listed approver decides, and once.
    wait = {"kind": "approval", "approvers": ["ann"], "deadline": time.time() + 60}
    address = StepAddress(rid, "f", "v", "ok")
    assert store.park(rid, "ok", waiting, wait, {"type": "step.waiting"}, address)[0] == "parked"
    assert store.due_timers(time.time() + 120) == [address]
    assert store.due_timers(time.time() + 120) == []  # a timer is claimed once
    decision = {"decision": "approved", "by": "bob"}
    assert store.decide(rid, "ok", "bob", decision, {"type": "step.approved"})[0] == "forbidden"
    decision["by"] = "ann"
    assert store.decide(rid, "ok", "ann", decision, {"type": "step.approved"}) == ["ok"]
    assert store.decide(rid, "ok", "ann", decision, {"type": "step.approved"}) == ["decided"]
    assert store.unpark(rid, "ok") is True
    assert store.unpark(rid, "ok") is False  # one resumer wins


def test_watchers_and_the_parent_hear_of_a_run_end(store):
    from orchestrator.plan import StepAddress

    rid = new_run(store)
    address = StepAddress("other", "g", "v2", "wait", (3,))
    store.add_watcher(rid, address)
    store.set_fields(rid, {"parent": {"run": "p", "step": "call"}})
    parent, watchers = store.end_listeners(rid)
    assert parent == {"run": "p", "step": "call"} and watchers == [address]


def test_leases_renew_release_and_keep_why_a_step_died(store):
    rid = new_run(store)
    running = {**rec("running"), "worker": "w:1", "started_at": time.time(), "lease": 2}
    store.begin_step(rid, "a", "t1", True, running, None, [])
    assert store.leases([(rid, "a", "t1", "w:1")], [], 5.0) == [1]
    assert store.leases([], [(rid, "a", "t1", "w:1", "timeout")], 5.0) == [1]
    # A later release (the heartbeat's) keeps the first reason; a lapsed lease is not renewed.
    assert store.leases([(rid, "a", "t1", "w:1")], [(rid, "a", "t1", "w:1", "died")], 5.0) == [
        0,
        0,
    ]
    verdict, _s, again, _ = store.begin_step(rid, "a", "t1", True, running, None, [])
    assert verdict == "lost" and again["lost_why"] == "timeout"


def test_idempotency_rates_nodes_sweep_and_counts(store):
    rid = new_run(store)
    assert store.claim_idempotency("f", "k", rid) == rid
    assert store.claim_idempotency("f", "k", "another") == rid
    assert [store.rate_hit("f", "a", 7, 1.0) for _ in range(3)] == [1, 2, 3]
    store.report_node("n1", {"queues": ["q"], "at": 1.0})
    assert store.nodes() == {"n1": {"queues": ["q"], "at": 1.0}}
    store.report_node("n1", None)
    assert store.nodes() == {}
    assert store.claim_sweep(60) is True and store.claim_sweep(60) is False
    ids = [rid, new_run(store), new_run(store)]
    first = store.sweep_batch(time.time() + 1, 2)
    rest = store.sweep_batch(time.time() + 1, 2)
    assert [i for i, _ in first + rest] == ids  # the cursor goes on where it stopped
    assert store.active_counts(page=2) == {("f", "pending"): 3}
    store.reset_joins(rid, ["p"])
    assert not store.r.exists(store.fanin_key(rid, "p"), store.comp_key(rid))


def test_definitions_resources_channels_and_schedules(store):
    assert store.save_definition("fl", "v1", {"kind": "Flow"}, "started") is True
    assert store.save_definition("fl", "v1", {"kind": "Flow"}, "stopped") is False
    assert store.get_definition("fl", "v1") == {"kind": "Flow"}
    assert store.flow_info("fl")["state"] == "started" and store.flow_names() == ["fl"]
    assert store.save_resource("Service", "s", {"address": "http://x"}) is True
    assert store.resource("Service", "s") == {"address": "http://x"}
    entry = store.add_event("orders", {"id": "e1", "data": 1})
    assert store.channel_entry("orders", entry) == {"id": "e1", "data": 1}
    dead = store.add_event("orders", {"id": "e1", "why": "x"}, dead=True)
    assert store.remove_dead("orders", dead) is True
    store.save_schedule("nightly", {"flow": "fl"}, 100.0, reset=True)
    assert store.schedules() == {"nightly": {"flow": "fl"}}
    assert (
        store.claim_fire("nightly", 100.0) is True and store.claim_fire("nightly", 100.0) is False
    )
