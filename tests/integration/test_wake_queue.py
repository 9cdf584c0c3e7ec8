"""Messages that resume a parked step go to the step's queue, not the sender's default.

No worker here consumes the module's default queue: a wake-up sent there would never run.
"""

from __future__ import annotations

import uuid

from tests.integration.flows import deploy, waiting
from tests.support import wait_for

FLOW = """
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: NAME}
spec:
  defaults: {queue: QUEUE}
  steps:
    - id: ask
      approval: {approvers: [alice]}
    - id: child
      flow: CHILD
  outputs: {decision: "${steps.ask.output.decision}", child: "${steps.child.output}"}
---
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: CHILD}
spec:
  defaults: {queue: QUEUE}
  steps:
    - {id: hold, wait: {signal: go}}
  outputs: {got: "${steps.hold.output}"}
"""


def test_approval_and_subflow_resume_on_the_steps_queue(client, worker_factory):
    queue = f"only-{uuid.uuid4().hex[:6]}"
    child = f"c-{uuid.uuid4().hex[:8]}"
    worker_factory([queue], name="approvals")
    name = deploy(client, FLOW.replace("QUEUE", queue).replace("CHILD", child))
    run = client.trigger(name)
    waiting(client, run.id, "ask")
    client.approve(run.id, "ask", by="alice")  # the wake-up must reach the `only-` queue
    wait_for(lambda: client.runs(flow=child), timeout=20, message="the child run")
    [kid] = client.runs(flow=child)
    waiting(client, kid.id, "hold")
    client.signal(kid.id, "go", {"n": 1})  # the child ends: its parent resumes on QUEUE
    assert run.wait(timeout=30) == {"decision": "approved", "child": {"got": {"n": 1}}}
