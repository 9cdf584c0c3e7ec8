"""Control flow on real workers: forEach, switch, try, saga, onFailure, subflow, cancel, retry."""

from __future__ import annotations

import pytest

from orchestrator import RunFailed
from tests.brokers import queue_depth
from tests.integration.flows import deploy, key
from tests.support import wait_for

pytestmark = pytest.mark.integration


def test_foreach_results_in_order_with_concurrency(client, worker):
    name = deploy(
        client,
        """
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: NAME}
spec:
  inputs: {items: {type: array, required: true}}
  steps:
    - id: each
      forEach: "${inputs.items}"
      concurrency: 2
      do:
        - {id: dbl, task: ctl.double, with: {x: "${item}"}}
        - {id: plus, task: ctl.add, with: {a: "${steps.dbl.output}", b: "${index}"}}
    - id: sum
      task: ctl.total
      with: {values: "${steps.each.output}"}
  outputs: {each: "${steps.each.output}", sum: "${steps.sum.output}"}
""",
    )
    run = client.trigger(name, {"items": [5, 6, 7, 8, 9]})
    out = run.wait(timeout=60)
    assert out["each"] == [10, 13, 16, 19, 22]
    assert out["sum"] == 80
    steps = client.get(run.id).steps
    assert {k for k in steps if k.startswith("dbl[")} == {f"dbl[{i}]" for i in range(5)}
    assert steps["plus[3]"].output == 19 and steps["plus[3]"].input == {"a": 16, "b": 3}
    assert steps["each"].status == "succeeded"


def test_foreach_over_empty_list_continues(client, worker):
    name = deploy(
        client,
        """
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: NAME}
spec:
  steps:
    - {id: each, forEach: "${[]}", do: {id: body, task: ctl.double, with: {x: "${item}"}}}
    - {id: after, task: ctl.total, with: {values: "${steps.each.output}"}}
  outputs: {each: "${steps.each.output}", after: "${steps.after.output}"}
""",
    )
    assert client.trigger(name).wait(timeout=30) == {"each": [], "after": 0}


FOREACH_FAIL = """
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: NAME}
spec:
  steps:
    - id: each
      forEach: "${[1, 2, 3, 4]}"
      do: {id: check, task: ctl.fail_when, with: {x: "${item}", bad: 3}ONERR}
  outputs: {each: "${steps.each.output}"}
"""


def test_failure_inside_foreach_fails_the_run(client, worker):
    name = deploy(client, FOREACH_FAIL.replace("ONERR", ""))
    run = client.trigger(name)
    with pytest.raises(RunFailed) as info:
        run.wait(timeout=30)
    failed = info.value.run
    assert failed.status == "failed"
    assert failed.error["step"] == "check[2]" and "item 3 is bad" in failed.error["message"]
    assert failed.steps["each"].status == "failed"


def test_failure_inside_foreach_with_on_error_continue(client, worker):
    name = deploy(client, FOREACH_FAIL.replace("ONERR", ", onError: continue"))
    run = client.trigger(name)
    assert run.wait(timeout=30) == {"each": [1, 2, None, 4]}
    assert client.get(run.id).steps["check[2]"].status == "failed"


def test_nested_foreach_inside_parallel(client, worker):
    name = deploy(
        client,
        """
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: NAME}
spec:
  inputs: {a: {type: array}, b: {type: array}}
  steps:
    - id: both
      parallel:
        - {id: left, forEach: "${inputs.a}", do: {id: l, task: ctl.double, with: {x: "${item}"}}}
        - id: right
          forEach: "${inputs.b}"
          do:
            id: inner
            forEach: "${[item, item + 1]}"
            do: {id: r, task: ctl.add, with: {a: "${item}", b: 100}}
    - {id: sum, task: ctl.total, with: {values: "${steps.both.output.left}"}}
  outputs: {both: "${steps.both.output}", sum: "${steps.sum.output}"}
""",
    )
    out = client.trigger(name, {"a": [1, 2, 3], "b": [10, 20]}).wait(timeout=60)
    assert out["both"] == {"left": [2, 4, 6], "right": [[110, 111], [120, 121]]}
    assert out["sum"] == 12


def test_switch_runs_first_match_and_skips_the_rest(client, worker):
    name = deploy(
        client,
        """
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: NAME}
spec:
  inputs: {amount: {type: integer, required: true}}
  steps:
    - id: route
      switch:
        - when: "inputs.amount < 500"
          steps: [{id: small, task: ctl.double, with: {x: "${inputs.amount}"}}]
        - when: "inputs.amount < 2000"
          steps: [{id: medium, task: ctl.add, with: {a: "${inputs.amount}", b: 1}}]
        - default: [{id: large, task: ctl.add, with: {a: "${inputs.amount}", b: 2}}]
  outputs: {route: "${steps.route.output}"}
""",
    )
    run = client.trigger(name, {"amount": 1000})
    assert run.wait(timeout=30) == {"route": 1001}
    steps = client.get(run.id).steps
    assert steps["medium"].status == "succeeded"
    assert steps["small"].status == "skipped" and steps["large"].status == "skipped"
    assert client.trigger(name, {"amount": 5000}).wait(timeout=30) == {"route": 5002}


def test_try_catch_finally(client, worker, redis_server):
    log = key()
    name = deploy(
        client,
        """
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: NAME}
spec:
  steps:
    - id: guard
      try:
        - {id: ok, task: ctl.record, with: {log: LOG, entry: ok}}
        - {id: bad, task: ctl.fail, with: {message: card declined}}
        - {id: never, task: ctl.record, with: {log: LOG, entry: never}}
      catch:
        - id: handle
          task: ctl.record
          with: {log: LOG, entry: "caught ${error.type} at ${error.step}: ${error.message}"}
      finally:
        - {id: cleanup, task: ctl.record, with: {log: LOG, entry: cleanup}}
    - {id: after, task: ctl.record, with: {log: LOG, entry: after}}
  outputs: {guard: "${steps.guard.output}"}
""".replace("LOG", log),
    )
    run = client.trigger(name)
    assert run.wait(timeout=30) == {"guard": "caught RuntimeError at bad: card declined"}
    r = redis_server.client(decode_responses=True)
    assert r.lrange(log, 0, -1) == [
        "ok",
        "caught RuntimeError at bad: card declined",
        "cleanup",
        "after",
    ]
    steps = client.get(run.id).steps
    assert steps["bad"].status == "failed" and "never" not in steps


def test_try_without_catch_runs_finally_then_fails(client, worker, redis_server):
    log = key()
    name = deploy(
        client,
        """
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: NAME}
spec:
  steps:
    - id: guard
      try: [{id: bad, task: ctl.fail, with: {message: nope}}]
      finally: [{id: cleanup, task: ctl.record, with: {log: LOG, entry: cleanup}}]
    - {id: after, task: ctl.record, with: {log: LOG, entry: after}}
""".replace("LOG", log),
    )
    with pytest.raises(RunFailed) as info:
        client.trigger(name).wait(timeout=30)
    assert info.value.run.error["step"] == "bad"
    assert redis_server.client(decode_responses=True).lrange(log, 0, -1) == ["cleanup"]


SAGA = """
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: NAME}
spec:
  steps:
    - id: flight
      task: ctl.record
      with: {log: LOG, entry: book-flight}
      compensate: {id: cancel_flight, task: ctl.record, with: {log: LOG, entry: cancel-flight}}
    - id: extras
      parallel:
        - id: hotel
          task: ctl.record
          with: {log: LOG, entry: book-hotel}
          compensate:
            id: cancel_hotel
            task: ctl.record
            with: {log: LOG, entry: cancel-hotel, fail_first: 1}
            retry: {maxAttempts: 3, initialDelay: 50ms, jitter: false}
        - id: seats
          forEach: "${[1, 2]}"
          do:
            id: seat
            task: ctl.record
            with: {log: LOG, entry: "book-seat-${item}"}
            compensate:
              id: free_seat
              task: ctl.record
              with: {log: LOG, entry: "free-seat-${item}"}
    - {id: charge, task: ctl.fail, with: {message: card declined}}
  onFailure:
    - {id: notify, task: ctl.record, with: {log: LOG, entry: notify}}
"""


def test_saga_compensates_in_reverse_completion_order(client, worker_factory, redis_server):
    # One worker process runs every step, one at a time, so the order in which the tasks
    # write the log is the order in which their completions are recorded (with two
    # processes, a branch could log first and be recorded second).
    queue = f"saga-{key()}"
    worker_factory(queues=[queue], concurrency=1)
    log = key()
    text = SAGA.replace("LOG", log).replace(
        "spec:\n  steps:", f"spec:\n  defaults: {{queue: {queue}}}\n  steps:", 1
    )
    name = deploy(client, text)
    run = client.trigger(name)
    with pytest.raises(RunFailed) as info:
        run.wait(timeout=60)
    final = info.value.run
    assert final.status == "compensated"
    entries = redis_server.client(decode_responses=True).lrange(log, 0, -1)
    booked = [e for e in entries if e.startswith("book-")]
    undone = [e for e in entries if e.startswith(("cancel-", "free-"))]
    expected = {
        "book-flight": "cancel-flight",
        "book-hotel": "cancel-hotel",
        "book-seat-1": "free-seat-1",
        "book-seat-2": "free-seat-2",
    }
    assert undone == [expected[b] for b in reversed(booked)]
    assert entries[-1] == "notify"  # onFailure runs once, after every compensation
    assert final.steps["cancel_hotel"].attempts == 2  # failed once, retried under its policy
    types = [(e["type"], e["step"]) for e in client.events(run.id)]
    for comp in ("cancel_flight", "cancel_hotel", "free_seat[0]", "free_seat[1]"):
        assert ("step.succeeded", comp) in types


def test_subflow_runs_child_and_returns_its_outputs(client, worker):
    child = deploy(
        client,
        """
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: NAME}
spec:
  inputs: {x: {type: integer, required: true}}
  steps: [{id: d, task: ctl.double, with: {x: "${inputs.x}"}}]
  outputs: {doubled: "${steps.d.output}"}
""",
    )
    parent = deploy(
        client,
        """
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: NAME}
spec:
  steps:
    - {id: call, flow: CHILD, with: {x: 21}}
    - {id: plus, task: ctl.add, with: {a: "${steps.call.output.doubled}", b: 0}}
  outputs: {result: "${steps.plus.output}"}
""".replace("CHILD", child),
    )
    run = client.trigger(parent)
    assert run.wait(timeout=30) == {"result": 42}
    raw = client.store.run_hash(run.id)
    child_id = raw["c:call"]
    assert client.get(child_id).flow == child
    assert f'"run":"{run.id}"' in client.store.run_hash(child_id)["parent"]


def test_cancel_parent_cancels_child(client, worker, redis_server):
    started, release = key(), key()
    child = deploy(
        client,
        f"""
apiVersion: orchestrator/v1
kind: Flow
metadata: {{name: NAME}}
spec:
  steps: [{{id: wait, task: ctl.hold, with: {{counter: {started}, release: {release}}}}}]
""",
    )
    parent = deploy(
        client,
        "apiVersion: orchestrator/v1\nkind: Flow\nmetadata: {name: NAME}\n"
        f"spec:\n  steps: [{{id: call, flow: {child}}}]\n",
    )
    run = client.trigger(parent)
    r = redis_server.client(decode_responses=True)
    wait_for(lambda: r.get(started) == "1", timeout=20, message="child step started")
    client.cancel(run.id)
    child_id = client.store.run_hash(run.id)["c:call"]
    wait_for(
        lambda: client.get(child_id).status == "cancelled", timeout=10, message="child cancelled"
    )
    assert client.get(run.id).status == "cancelled"


def test_cancel_half_done_foreach_leaves_nothing_running(client, worker, redis_server):
    started, release = key(), key()
    name = deploy(
        client,
        f"""
apiVersion: orchestrator/v1
kind: Flow
metadata: {{name: NAME}}
spec:
  steps:
    - id: each
      forEach: "${{[1, 2, 3, 4, 5, 6, 7, 8]}}"
      concurrency: 2
      do: {{id: h, task: ctl.hold, with: {{counter: {started}, release: {release}}}}}
""",
    )
    run = client.trigger(name)
    r = redis_server.client(decode_responses=True)
    wait_for(lambda: int(r.get(started) or 0) >= 2, timeout=20, message="two items running")
    cancelled = client.cancel(run.id)
    assert cancelled.status == "cancelled"
    r.set(release, "1")  # anything still holding would now finish and try to continue
    wait_for(
        lambda: (
            not [
                k
                for k, s in client.get(run.id).steps.items()
                if s.status in ("running", "retrying")
            ]
        ),
        timeout=20,
        message="no step left running",
    )
    before = int(r.get(started))
    # Give the workers a chance to start anything that slipped through: poll the queue
    # until it is empty rather than sleeping.
    queue = client.settings.default_queue
    wait_for(lambda: queue_depth(client.app, queue) == 0, timeout=20)
    assert int(r.get(started)) == before <= 3
    assert client.get(run.id).status == "cancelled"


def test_retry_after_fixing_the_cause_reuses_succeeded_steps(client, worker, redis_server):
    counter, flag, log = key(), key(), key()
    r = redis_server.client(decode_responses=True)
    r.set(flag, "broken")
    name = deploy(
        client,
        f"""
apiVersion: orchestrator/v1
kind: Flow
metadata: {{name: NAME}}
spec:
  steps:
    - {{id: first, task: ctl.count, with: {{counter: {counter}, value: 7}}}}
    - {{id: fragile, task: ctl.fail_while, with: {{flag: {flag}, log: {log}}}}}
    - {{id: last, task: ctl.add, with: {{a: "${{steps.first.output}}", b: 1}}}}
  outputs: {{last: "${{steps.last.output}}"}}
""",
    )
    run = client.trigger(name)
    with pytest.raises(RunFailed):
        run.wait(timeout=30)
    r.delete(flag)
    client.retry(run.id)
    assert client.wait(run.id, timeout=30) == {"last": 8}
    assert r.get(counter) == "1"  # the succeeded step did not run again
    assert r.lrange(log, 0, -1) == ["fixed"]
    types = [e["type"] for e in client.events(run.id)]
    assert "run.retried" in types and types[-1] == "run.succeeded"


def test_cli_cancel_and_retry(client, worker, redis_server, orch_env):
    import os
    import subprocess
    import sys

    flag = key()
    r = redis_server.client(decode_responses=True)
    r.set(flag, "broken")
    name = deploy(
        client,
        f"""
apiVersion: orchestrator/v1
kind: Flow
metadata: {{name: NAME}}
spec:
  steps: [{{id: fragile, task: ctl.fail_while, with: {{flag: {flag}}}}}]
""",
    )
    env = {**os.environ, **orch_env}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "orchestrator", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    run = client.trigger(name)
    with pytest.raises(RunFailed):
        run.wait(timeout=30)
    r.delete(flag)
    done = cli("runs", "retry", run.id, "--wait", "--timeout", "30")
    assert done.returncode == 0, done.stderr
    assert f"run {run.id} succeeded" in done.stdout
    again = cli("runs", "cancel", run.id)
    assert again.returncode == 1 and "succeeded" in again.stderr
