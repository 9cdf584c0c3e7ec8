"""Durable waits on real workers and a real beat: approvals, signals, sleep, runs."""

from __future__ import annotations

import pytest

from orchestrator import Forbidden, InvalidState, RunFailed
from tests.integration.flows import deploy, key, waiting
from tests.support import wait_for

pytestmark = pytest.mark.integration

FAST_TICK = {"ORCHESTRATOR_TICK_S": "0.2"}


@pytest.fixture(scope="module")
def beat(orch_env, tmp_path_factory):
    from tests.support import BeatProcess

    b = BeatProcess(
        env={**orch_env, **FAST_TICK}, log_dir=tmp_path_factory.mktemp("beat", numbered=True)
    )
    b.start()
    yield b
    b.stop()


APPROVAL = """
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: NAME}
spec:
  inputs: {amount: {type: integer, default: 100}}
  steps:
    - id: manager
      approval:
        approvers: ["alice", "${'carol' if inputs.amount > 50 else 'dave'}"]
        message: "approve ${inputs.amount} EUR"
        TIMEOUT
    - id: pay
      when: "steps.manager.output.decision == 'approved'"
      task: ctl.double
      with: {x: "${inputs.amount}"}
  outputs: {decision: "${steps.manager.output}", paid: "${steps.pay.output}"}
"""


def test_approve_by_a_listed_approver(client, worker):
    name = deploy(client, APPROVAL.replace("TIMEOUT", ""))
    run = client.trigger(name)
    waiting(client, run.id, "manager")
    assert client.get(run.id).status == "waiting"
    with pytest.raises(Forbidden):
        client.approve(run.id, "manager", by="mallory")
    client.approve(run.id, "manager", by="carol", comment="fine")
    out = run.wait(timeout=20)
    assert out["decision"]["decision"] == "approved" and out["decision"]["by"] == "carol"
    assert out["decision"]["comment"] == "fine" and out["paid"] == 200
    types = [(e["type"], e.get("by")) for e in client.events(run.id)]
    assert ("step.approved", "carol") in types
    with pytest.raises(InvalidState):
        client.approve(run.id, "manager", by="alice")


def test_reject_skips_what_depends_on_approval(client, worker):
    name = deploy(client, APPROVAL.replace("TIMEOUT", ""))
    run = client.trigger(name)
    waiting(client, run.id, "manager")
    client.reject(run.id, "manager", by="alice", comment="too much")
    out = run.wait(timeout=20)
    assert out["decision"]["decision"] == "rejected" and out["paid"] is None
    assert client.get(run.id).steps["pay"].status == "skipped"


@pytest.mark.parametrize("on_timeout,decision", [("reject", "rejected"), ("approve", "approved")])
def test_timeout_decides(client, worker, beat, on_timeout, decision):
    name = deploy(
        client, APPROVAL.replace("TIMEOUT", f"timeout: 500ms\n        onTimeout: {on_timeout}")
    )
    out = client.trigger(name).wait(timeout=20)
    assert out["decision"]["decision"] == decision and out["decision"]["timedOut"] is True


def test_escalation_hands_the_decision_over(client, worker, beat):
    name = deploy(
        client,
        APPROVAL.replace(
            "TIMEOUT", "timeout: 1s\n        onTimeout: escalate\n        escalateTo: [boss]"
        ),
    )
    run = client.trigger(name)
    waiting(client, run.id, "manager")
    wait_for(
        lambda: any(e["type"] == "step.escalated" for e in client.events(run.id)),
        timeout=20,
        message="escalated",
    )
    with pytest.raises(Forbidden):
        client.approve(run.id, "manager", by="alice")
    client.approve(run.id, "manager", by="boss")
    assert run.wait(timeout=20)["decision"]["by"] == "boss"


SIGNAL = """
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: NAME}
spec:
  steps:
    - {id: first, task: ctl.hold, with: {counter: C, release: R}}
    - id: paid
      wait: {signal: payment_confirmed, timeout: 30s}
  outputs: {payment: "${steps.paid.output}"}
"""


def test_signal_after_the_wait_starts(client, worker, redis_server):
    r = redis_server.client(decode_responses=True)
    release = key()
    r.set(release, "1")
    name = deploy(client, SIGNAL.replace("C", key()).replace("R", release))
    run = client.trigger(name)
    waiting(client, run.id, "paid")
    assert client.signal(run.id, "payment_confirmed", {"amount": 10}) == "resumed"
    assert run.wait(timeout=20) == {"payment": {"amount": 10}}


def test_signal_before_the_wait_is_kept(client, worker, redis_server):
    r = redis_server.client(decode_responses=True)
    started, release = key(), key()
    name = deploy(client, SIGNAL.replace("C", started).replace("R", release))
    run = client.trigger(name)
    wait_for(lambda: r.get(started) == "1", timeout=20, message="first step running")
    assert client.signal(run.id, "payment_confirmed", {"amount": 7}) == "kept"
    r.set(release, "1")
    assert run.wait(timeout=20) == {"payment": {"amount": 7}}


def test_wait_timeout_fails_the_step(client, worker, beat):
    name = deploy(
        client,
        """
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: NAME}
spec:
  steps:
    - {id: callback, wait: {signal: never, timeout: 500ms}, onError: continue}
  outputs: {status: "${steps.callback.status}", error: "${steps.callback.error.type}"}
""",
    )
    assert client.trigger(name).wait(timeout=20) == {"status": "failed", "error": "Timeout"}


def test_wait_for_another_run(client, worker, redis_server):
    r = redis_server.client(decode_responses=True)
    release = key()
    target = deploy(
        client,
        f"""
apiVersion: orchestrator/v1
kind: Flow
metadata: {{name: NAME}}
spec:
  steps: [{{id: h, task: ctl.hold, with: {{counter: {key()}, release: {release}}}}}]
  outputs: {{done: "${{steps.h.output}}"}}
""",
    )
    other = client.trigger(target)
    name = deploy(
        client,
        f"""
apiVersion: orchestrator/v1
kind: Flow
metadata: {{name: NAME}}
spec:
  inputs: {{other: {{type: string, required: true}}}}
  steps:
    - id: after
      wait: {{flow: {target}, run: "${{inputs.other}}", status: succeeded}}
  outputs: {{seen: "${{steps.after.output}}"}}
""",
    )
    run = client.trigger(name, {"other": other.id})
    waiting(client, run.id, "after")
    r.set(release, "1")
    seen = run.wait(timeout=20)["seen"]
    assert seen == {"run": other.id, "status": "succeeded", "outputs": {"done": "released"}}


def test_sleep_until_a_time(client, worker, beat):
    name = deploy(
        client,
        """
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: NAME}
spec:
  inputs: {at: {type: number, required: true}}
  steps:
    - {id: nap, until: "${inputs.at}"}
    - {id: after, task: ctl.add, with: {a: 1, b: 1}}
  outputs: {after: "${steps.after.output}"}
""",
    )
    import time

    run = client.trigger(name, {"at": time.time() + 1.0})
    waiting(client, run.id, "nap")
    assert run.wait(timeout=20) == {"after": 2}
    nap = client.get(run.id).steps["nap"]
    assert nap.finished_at >= run.created_at + 1.0


def test_cancel_a_waiting_run(client, worker):
    name = deploy(client, APPROVAL.replace("TIMEOUT", ""))
    run = client.trigger(name)
    waiting(client, run.id, "manager")
    client.cancel(run.id)
    with pytest.raises(RunFailed):
        run.wait(timeout=10)
    assert client.get(run.id).steps["manager"].status == "cancelled"
    with pytest.raises(InvalidState):
        client.signal(run.id, "anything")
