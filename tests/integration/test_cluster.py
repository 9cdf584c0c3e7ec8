"""Run state on a real three-node Redis Cluster (the broker on a plain Redis, as Celery
needs): flows with chords, a forEach, an approval wait and the cancel of a run all work,
and a run's keys really sit in one slot while runs spread over the nodes."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from orchestrator.client import Client
from orchestrator.settings import Settings
from tests.integration.flows import deploy
from tests.support import REPO_ROOT, wait_for

FOREACH = """
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: NAME}
spec:
  inputs: {n: {type: integer, required: true}}
  steps:
    - {id: make, task: ctl.double, with: {x: "${inputs.n}"}}
    - id: each
      forEach: "${[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]}"
      concurrency: 4
      do: {id: sq, task: tests.add, with: {a: "${item}", b: "${steps.make.output}"}}
  outputs: {total: "${sum(steps.each.output)}"}
"""


@pytest.fixture(scope="module")
def cluster_env(orch_env, redis_cluster):
    """State on the Cluster; Celery's broker and result backend on the session Redis."""
    return {
        **orch_env,
        "ORCHESTRATOR_REDIS_URL": redis_cluster.url.replace("redis://", "redis+cluster://"),
        "ORCHESTRATOR_BROKER_URL": orch_env["ORCHESTRATOR_REDIS_URL"],
        "ORCHESTRATOR_RESULT_BACKEND": orch_env["ORCHESTRATOR_REDIS_URL"],
    }


@pytest.fixture(scope="module")
def cluster_client(cluster_env):
    settings = Settings(
        **{k.removeprefix("ORCHESTRATOR_").lower(): v for k, v in cluster_env.items()}
    )
    assert settings.redis_cluster
    c = Client(settings)
    yield c
    c.close()


@pytest.fixture
def cluster_worker(worker_factory, cluster_env):
    queue = cluster_env["ORCHESTRATOR_DEFAULT_QUEUE"]
    return worker_factory([queue], env=cluster_env, name="cluster")


def test_flows_run_with_their_state_on_a_cluster(cluster_client, cluster_worker, redis_cluster):
    c = cluster_client
    c.deploy(REPO_ROOT / "flows" / "text.yaml", REPO_ROOT / "flows" / "expense-approval.yaml")
    text = c.trigger("text", {"message": "a b c"})
    assert text.wait(timeout=30) == {"message": "C B A", "spaces": 2}

    name = deploy(c, FOREACH)
    runs = [c.trigger(name, {"n": n}) for n in range(6)]
    for n, run in enumerate(runs):
        assert run.wait(timeout=30) == {"total": 55 + 10 * 2 * n}
    assert c.get(runs[0].id).steps["sq[9]"].output == 10

    expense = c.trigger("expense-approval", {"employee": "eve", "amount": 100})
    wait_for(
        lambda: (s := c.get(expense.id).steps.get("manager_approval")) and s.status == "waiting",
        timeout=20,
    )
    c.approve(expense.id, "manager_approval", by="alice")
    assert expense.wait(timeout=30)["result"]["paid_to"] == "eve"

    doomed = c.trigger("expense-approval", {"employee": "bob", "amount": 50})
    wait_for(lambda: c.get(doomed.id).status == "waiting", timeout=20)
    assert c.cancel(doomed.id).status == "cancelled"

    # Every key of a run is in the run's slot; the runs themselves spread over the nodes.
    store = c.store
    for run in runs:
        keys = [store.run_key(run.id), store.events_key(run.id), store.comp_key(run.id)]
        assert len({key_slot(k.encode()) for k in keys}) == 1
    nodes = {
        redis_cluster.client().get_node_from_key(store.run_key(r.id)).name for r in runs + [text]
    }
    assert len(nodes) >= 2
    assert {r.id for r in c.runs(flow=name)} == {r.id for r in runs}
    assert [r.id for r in c.runs(status="cancelled")] == [doomed.id]
