"""Hardening on real workers: what a hostile caller or a dying step does to a run.

Each test attacks one way a run could be lost, stuck or poisoned: many threads sharing one
client, an idempotency key reused with other inputs, inputs and outputs over the limits, a
step that kills its own process or outlives its hard time limit, recursive subflows, and a
run tree too deep to cancel recursively. Every wait is a bounded poll on run state.
"""

from __future__ import annotations

import concurrent.futures
import time

import pytest

from orchestrator import Client, InputError, RunFailed
from orchestrator.errors import IdempotencyConflict, LimitExceeded
from orchestrator.runtime import new_run_id
from orchestrator.settings import Settings
from tests.integration.flows import deploy, key

WORKER_ENV = {
    "ORCHESTRATOR_HEARTBEAT_S": "0.5",
    "ORCHESTRATOR_LEASE_S": "2",
    "ORCHESTRATOR_MAX_FOREACH_ITEMS": "10",
    "ORCHESTRATOR_MAX_OUTPUT_BYTES": "65536",
    "ORCHESTRATOR_MAX_SUBFLOW_DEPTH": "3",
}


@pytest.fixture(scope="module")
def orch_env(orch_env: dict[str, str]) -> dict[str, str]:
    """The module's environment with the hardening tasks and small limits on the workers."""
    tasks = orch_env["ORCHESTRATOR_TASK_MODULES"] + ",tests.hardening_tasks"
    return {**orch_env, **WORKER_ENV, "ORCHESTRATOR_TASK_MODULES": tasks}


@pytest.fixture(scope="module")
def client(settings: Settings):
    c = Client(settings)
    yield c
    c.close()


def flow(steps: str, extra: str = "") -> str:
    return (
        "apiVersion: orchestrator/v1\nkind: Flow\nmetadata: {name: NAME}\n"
        f"spec:\n{extra}  steps:\n{steps}"
    )


def failed(client: Client, run_id: str, timeout: float = 60) -> dict:
    """Wait for the run to end and return its error; it must end failed."""
    with pytest.raises(RunFailed) as info:
        client.get(run_id).wait(timeout=timeout)
    assert info.value.run.status == "failed", info.value.run.status
    return info.value.run.error


# -- producers ------------------------------------------------------------------------------


def test_fifty_threads_share_one_client_and_every_trigger_returns(client, worker) -> None:
    name = deploy(client, flow("    - {id: a, task: ctl.add, with: {a: 1, b: 2}}\n"))
    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        futures = [pool.submit(client.trigger, name, None) for _ in range(50)]
        done, stuck = concurrent.futures.wait(futures, timeout=60)
    assert not stuck, f"{len(stuck)} of 50 triggers never returned"
    runs = [f.result() for f in done]
    for run in runs:
        assert run.wait(timeout=60) == {}  # the flow has no outputs
        assert client.get(run.id).status == "succeeded"
        assert client.store.read_fields(run.id, ["published"])[0] is not None


def test_an_idempotency_key_with_other_inputs_is_a_conflict(client) -> None:
    name = deploy(
        client,
        flow(
            "    - {id: a, task: ctl.add, with: {a: '${inputs.n}', b: 1}}\n",
            "  inputs: {n: {type: integer, required: true}}\n",
        ),
    )
    first = client.trigger(name, {"n": 1}, idempotency_key="order-7")
    assert client.trigger(name, {"n": 1}, idempotency_key="order-7").id == first.id
    with pytest.raises(IdempotencyConflict) as info:
        client.trigger(name, {"n": 2}, idempotency_key="order-7")
    assert info.value.run_id == first.id and "order-7" in str(info.value)


def test_inputs_over_the_limits_are_refused_before_a_run_exists(client, settings) -> None:
    name = deploy(
        client,
        flow(
            "    - {id: a, task: ctl.add, with: {a: 1, b: 1}}\n",
            "  inputs: {doc: {type: object}}\n",
        ),
    )
    before = client.store.r.zcard(f"{settings.key_prefix}runs")
    big = {"doc": {"blob": "x" * (settings.max_input_bytes + 1)}}
    with pytest.raises(LimitExceeded, match="MAX_INPUT_BYTES"):
        client.trigger(name, big)
    deep: dict = {}
    for _ in range(900):
        deep = {"d": deep}
    with pytest.raises(LimitExceeded, match="nested more than 64") as info:
        client.trigger(name, {"doc": deep})
    assert isinstance(info.value, InputError) and info.value.field.startswith("inputs.doc")
    with pytest.raises(LimitExceeded, match="surrogate"):
        client.trigger(name, {"doc": {"s": "\ud800"}})
    assert client.store.r.zcard(f"{settings.key_prefix}runs") == before


# -- steps that end outside their error handling -----------------------------------------------


@pytest.mark.parametrize(
    ("kind", "size", "why"),
    [
        ("big", 70_000, "MAX_OUTPUT_BYTES"),
        ("deep", 200, "nested more than"),
        ("huge_int", 0, "not JSON"),
        ("nan", 0, "JSON cannot carry"),
    ],
)
def test_an_output_the_record_cannot_hold_fails_the_step(client, worker, r, kind, size, why):
    k = key()
    name = deploy(
        client,
        flow(
            f"    - {{id: out, task: hard.output, with: {{key: {k}, kind: {kind}, size: {size}}},"
            " retry: {maxAttempts: 3, initialDelay: 10ms}}\n"
        ),
    )
    run = client.trigger(name)
    error = failed(client, run.id)
    assert why in error["message"], error
    assert r.get(k) == "1"  # a permanent failure: not retried


def test_an_exception_whose_message_cannot_be_read_still_fails_the_run(client, worker, r):
    k = key()
    name = deploy(client, flow(f"    - {{id: bad, task: hard.unprintable, with: {{key: {k}}}}}\n"))
    error = failed(client, client.trigger(name).id)
    assert error["step"] == "bad" and "could not be read" in error["message"]


def test_memory_error_in_a_step_fails_it_under_its_policy(client, worker, r):
    k = key()
    name = deploy(
        client,
        flow(
            f"    - {{id: m, task: hard.memory, with: {{key: {k}}},"
            " retry: {maxAttempts: 2, initialDelay: 10ms}}\n"
        ),
    )
    error = failed(client, client.trigger(name).id)
    assert error["type"] == "MemoryError"
    assert r.get(k) == "2"


def test_the_hard_time_limit_is_a_failed_attempt_not_a_stuck_run(client, worker, r):
    k = key()
    name = deploy(
        client,
        flow(
            f"    - {{id: slow, task: hard.stubborn, with: {{key: {k}, seconds: 30}}, timeout: 1s,"
            " retry: {maxAttempts: 2, initialDelay: 10ms}}\n"
        ),
    )
    run = client.trigger(name)
    error = failed(client, run.id, timeout=40)
    assert error["type"] == "Timeout", error
    step = client.get(run.id).steps["slow"]
    assert step.status == "failed" and step.attempts == 2
    assert r.get(k) == "2"  # each attempt ran once, none was delivered again


@pytest.mark.parametrize("how", ["sigkill", "exit", "os_exit"])
def test_a_step_that_kills_its_process_fails_after_max_deliveries(client, worker, r, how):
    k = key()
    name = deploy(
        client, flow(f"    - {{id: boom, task: hard.die, with: {{key: {k}, how: {how}}}}}\n")
    )
    run = client.trigger(name)
    error = failed(client, run.id, timeout=60)
    assert error["type"] == "WorkerLost", error
    assert "died 3 times" in error["message"]
    assert r.get(k) == "3"


def test_a_poison_step_is_compensated_like_any_failure(client, worker, r):
    k, undo = key(), key()
    name = deploy(
        client,
        flow(
            "    - {id: book, task: ctl.add, with: {a: 1, b: 1},"
            f" compensate: {{id: unbook, task: ctl.count, with: {{counter: {undo}}}}}}}\n"
            f"    - {{id: boom, task: hard.die, with: {{key: {k}, how: sigkill}}}}\n"
        ),
    )
    run = client.trigger(name)
    with pytest.raises(RunFailed):
        client.get(run.id).wait(timeout=60)
    assert client.get(run.id).status == "compensated"
    assert r.get(undo) == "1"


# -- limits on runtime structure ------------------------------------------------------------


def test_foreach_wider_than_the_limit_fails_the_step(client, worker):
    name = deploy(
        client,
        flow(
            "    - {id: each, forEach: '${inputs.items}', do: {id: a, task: ctl.double,"
            " with: {x: '${item}'}}}\n",
            "  inputs: {items: {type: array}}\n",
        ),
    )
    error = failed(client, client.trigger(name, {"items": list(range(11))}).id)
    assert "11 items" in error["message"] and "MAX_FOREACH_ITEMS" in error["message"]
    ok = client.trigger(name, {"items": list(range(10))})
    ok.wait(timeout=30)
    assert client.get(ok.id).status == "succeeded"


def test_subflows_deeper_than_the_limit_fail_the_run(client, worker):
    leaf = deploy(client, flow("    - {id: a, task: ctl.add, with: {a: 1, b: 1}}\n"))
    names = [leaf]
    for _ in range(4):  # four levels above the leaf: 4 subflow runs deep
        names.append(deploy(client, flow(f"    - {{id: call, flow: {names[-1]}}}\n")))
    allowed = client.trigger(names[3])  # 3 subflow runs deep: the limit
    allowed.wait(timeout=60)
    assert client.get(allowed.id).status == "succeeded"
    error = failed(client, client.trigger(names[4]).id)
    assert "MAX_SUBFLOW_DEPTH" in error["message"], error


def test_a_stopped_flow_starts_no_subflow_runs(client, worker):
    child = deploy(client, flow("    - {id: a, task: ctl.add, with: {a: 1, b: 1}}\n"))
    parent = deploy(client, flow(f"    - {{id: call, flow: {child}}}\n"))
    client.stop_flow(child)
    error = failed(client, client.trigger(parent).id)
    assert "is stopped" in error["message"]


def test_cancel_of_a_tree_deeper_than_the_recursion_limit(client, settings) -> None:
    """2,000 nested runs (written directly: no worker could make them this deep) cancel
    iteratively, every one of them."""
    store = client.store
    ids = [new_run_id() for _ in range(2000)]
    now = time.time()
    for i, rid in enumerate(ids):
        parent = {"run": ids[i - 1], "flow": "x", "version": "v", "step": "call", "path": []}
        store.create_run(
            {
                "id": rid,
                "flow": "x",
                "version": "v",
                "status": "running",
                "inputs": {},
                "created_at": now,
                "parent": parent if i else None,
            },
            {"ts": now, "type": "run.created", "step": ""},
        )
        if i:
            store.set_fields(ids[i - 1], {"c:call": rid})
    client.cancel(ids[0])
    statuses = {store.read_fields(rid, ["status"])[0] for rid in ids}
    assert statuses == {"cancelled"}
