"""What differs between brokers, on whichever broker the session runs (``--broker``).

These run in the main suite (Redis broker) and again in the RabbitMQ pass of ``make test``.
"""

from __future__ import annotations

import uuid

import pytest

from orchestrator import RunFailed
from tests.integration.flows import deploy

ONE_STEP = """
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: NAME}
spec:
  steps:
    - {id: only, task: tests.noop, queue: QUEUE PRIORITY}
"""


def test_a_step_gets_every_attempt_its_policy_allows(client, worker) -> None:
    # Celery's own default (max_retries=3) must not end the fifth attempt in an error.
    name = deploy(
        client,
        """
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: NAME}
spec:
  steps:
    - {id: f, task: tests.fail, retry: {maxAttempts: 6, initialDelay: 10ms}}
""",
    )
    run = client.trigger(name)
    with pytest.raises(RunFailed):
        run.wait(timeout=30)
    assert run.steps["f"].attempts == 6
    assert run.error["type"] == "ValueError"


def test_step_priority_orders_a_backlog_as_the_broker_does(client, worker_factory, request) -> None:
    queue = f"prio-{uuid.uuid4().hex[:8]}"
    plain = deploy(client, ONE_STEP.replace("QUEUE", queue).replace("PRIORITY", ""))
    nine = deploy(client, ONE_STEP.replace("QUEUE", queue).replace("PRIORITY", ", priority: 9"))
    # A backlog, oldest first: two without a priority, one with priority 9, one without;
    # in arrival order the priority-9 step would run third.
    runs = [client.trigger(plain) for _ in range(2)]
    runs += [urgent := client.trigger(nine), client.trigger(plain)]
    worker_factory(queues=[queue], concurrency=1, name="prio")  # one at a time
    for run in runs:
        run.wait(timeout=30)
    started = sorted(runs, key=lambda r: client.get(r.id).steps["only"].started_at)
    if request.config.getoption("--broker") == "amqp":
        # RabbitMQ (queues declared with x-max-priority 9): the higher number goes first.
        assert started[0].id == urgent.id
    else:
        # kombu's Redis transport serves priority 0 (and no priority) first, 9 last.
        assert started[-1].id == urgent.id
