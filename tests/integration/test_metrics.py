"""GET /metrics: what real workers counted in Redis, scraped in Prometheus's text format."""

from __future__ import annotations

import time
import uuid

import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator import RunFailed
from orchestrator.api import create_api
from orchestrator.client import Client
from orchestrator.counters import RUN_BUCKETS, run_counts, step_counts
from orchestrator.metrics import OrchestratorCollector, metrics_registry
from tests.integration.flows import deploy, waiting
from tests.support import REPO_ROOT

pytestmark = pytest.mark.integration

TOKEN = "metrics-token"

FAILING = """
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: NAME}
spec:
  steps:
    - id: boom
      task: tests.fail
      retry: {maxAttempts: 2, initialDelay: 10ms, jitter: false}
"""

# Its steps go to a queue that no worker consumes, so its messages stay there.
PARKED = """
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: NAME}
spec:
  steps:
    - id: held
      task: tests.noop
      queue: QUEUE
      PRIORITY
"""

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def api(settings, client, worker):
    client.deploy(*(REPO_ROOT / "flows" / f for f in ("etl.yaml", "text.yaml")))
    client.deploy(REPO_ROOT / "flows" / "expense-approval.yaml")
    app = create_api(settings.model_copy(update={"api_tokens": TOKEN}), client)
    with TestClient(app, raise_server_exceptions=False) as tc:
        tc.headers.update({"Authorization": f"Bearer {TOKEN}"})
        yield tc


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape(api: TestClient) -> Samples:
    resp = api.get("/metrics")
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    return parse(resp.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_metrics_need_the_bearer_token(api):
    assert api.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    with TestClient(api.app) as anonymous:
        resp = anonymous.get("/metrics")
    assert resp.status_code == 401
    assert resp.json()["error"] == "unauthorized"


def test_runs_steps_and_retries_are_counted_once(api, client):
    failing = deploy(client, FAILING)
    before = scrape(api)

    etl = client.trigger("etl", {"pages": 1})
    assert etl.wait(timeout=60)["extract_attempts"] == 3  # two failures, then success
    key = f"k-{uuid.uuid4().hex}"
    text = client.trigger("text", {"message": "a b"}, idempotency_key=key)
    assert client.trigger("text", {"message": "a b"}, idempotency_key=key).id == text.id
    text.wait(timeout=30)
    with pytest.raises(RunFailed):
        client.trigger(failing).wait(timeout=30)
    after = scrape(api)

    def d(name: str, **labels: str) -> float:
        return delta(before, after, name, **labels)

    assert d("orchestrator_runs_started_total", flow="etl") == 1
    assert d("orchestrator_runs_finished_total", flow="etl", status="succeeded") == 1
    assert d("orchestrator_runs_finished_total", flow="etl", status="failed") == 0
    assert d("orchestrator_step_retries_total", flow="etl") == 2
    # extract three times, validate, transform, load
    assert d("orchestrator_step_duration_seconds_count", flow="etl") == 6
    assert d("orchestrator_step_duration_seconds_sum", flow="etl") > 0
    assert d("orchestrator_run_duration_seconds_count", flow="etl") == 1

    # The run's duration is its record's, in the bucket that holds it.
    run = client.get(etl.id)
    seconds = run.finished_at - run.created_at
    assert d("orchestrator_run_duration_seconds_sum", flow="etl") == pytest.approx(
        seconds, abs=1e-3
    )
    first = next(b for b in RUN_BUCKETS if seconds <= b)
    for b in RUN_BUCKETS:
        le = str(float(b))
        expected = 1 if b >= first else 0
        assert d("orchestrator_run_duration_seconds_bucket", flow="etl", le=le) == expected, le
    assert d("orchestrator_run_duration_seconds_bucket", flow="etl", le="+Inf") == 1

    # The second trigger with the same idempotency key started nothing.
    assert d("orchestrator_runs_started_total", flow="text") == 1
    assert d("orchestrator_runs_finished_total", flow="text", status="succeeded") == 1
    assert d("orchestrator_step_retries_total", flow="text") == 0
    # upper, reverse, spaces (the parallel that joins them is no task of its own)
    assert d("orchestrator_step_duration_seconds_count", flow="text") == 3

    assert d("orchestrator_runs_started_total", flow=failing) == 1
    assert d("orchestrator_runs_finished_total", flow=failing, status="failed") == 1
    assert d("orchestrator_runs_finished_total", flow=failing, status="succeeded") == 0
    assert d("orchestrator_step_retries_total", flow=failing) == 1
    assert d("orchestrator_step_duration_seconds_count", flow=failing) == 2


def test_waiting_runs_and_cancelled_runs(api, client):
    before = scrape(api)
    assert value(before, "orchestrator_runs_waiting", flow="expense-approval") == 0
    run = client.trigger("expense-approval", {"employee": "eve", "amount": 100})
    waiting(client, run.id, "manager_approval")
    during = scrape(api)
    assert value(during, "orchestrator_runs_waiting", flow="expense-approval") == 1
    assert value(during, "orchestrator_runs_running", flow="expense-approval") == 0
    assert delta(before, during, "orchestrator_runs_started_total", flow="expense-approval") == 1

    client.cancel(run.id)
    after = scrape(api)
    assert value(after, "orchestrator_runs_waiting", flow="expense-approval") == 0
    assert (
        delta(
            before,
            after,
            "orchestrator_runs_finished_total",
            flow="expense-approval",
            status="cancelled",
        )
        == 1
    )
    assert (
        delta(before, after, "orchestrator_run_duration_seconds_count", flow="expense-approval")
        == 1
    )
    # submit ran; the approval is a wait, not an attempt of work
    assert (
        delta(before, after, "orchestrator_step_duration_seconds_count", flow="expense-approval")
        == 1
    )


def test_queue_depth_counts_every_priority_and_the_key_prefix(api, client, settings, tmp_path):
    queue = f"parked-{uuid.uuid4().hex[:8]}"
    plain = deploy(client, PARKED.replace("QUEUE", queue).replace("PRIORITY", ""))
    urgent = deploy(client, PARKED.replace("QUEUE", queue).replace("PRIORITY", "priority: 9"))
    runs = [client.trigger(plain).id for _ in range(2)] + [client.trigger(urgent).id]

    samples = scrape(api)
    assert value(samples, "orchestrator_queue_depth", queue=queue) == 3
    # kombu keeps priority 9 in a list of its own beside the queue's
    assert client.store.r.llen(f"{queue}\x06\x169") == 1 and client.store.r.llen(queue) == 2
    assert ("orchestrator_queue_depth", (("queue", settings.default_queue),)) in samples
    assert value(samples, "orchestrator_runs_pending", flow=plain) == 2
    assert value(samples, "orchestrator_runs_pending", flow=urgent) == 1

    # Under a Celery key prefix the same queue is another Redis list.
    prefixed = Client(settings.model_copy(update={"celery_key_prefix": "cp:"}))
    try:
        runs.append(prefixed.trigger(plain).id)
        samples = parse(generate_latest(metrics_registry(prefixed)).decode())
        assert value(samples, "orchestrator_queue_depth", queue=queue) == 1
    finally:
        prefixed.close()

    # Queues of the worker pools are measured too, even before any message.
    pools = tmp_path / "pools.yaml"
    pools.write_text("pools:\n  io: {queues: [pool-only, other]}\n  bad: {queues: nope}\n")
    assert {"pool-only", "other", queue} <= OrchestratorCollector(client, pools).known_queues(
        client.store.flow_names()
    )
    for run_id in runs:
        client.cancel(run_id)


def test_every_deployed_flow_appears_at_zero(api, client):
    fresh = deploy(client, FAILING)
    samples = scrape(api)
    assert ("orchestrator_runs_started_total", (("flow", fresh),)) in samples
    assert value(samples, "orchestrator_runs_started_total", flow=fresh) == 0
    assert value(samples, "orchestrator_run_duration_seconds_count", flow=fresh) == 0


def test_openmetrics_when_the_scraper_asks_for_it(api):
    accept = "application/openmetrics-text; version=1.0.0, text/plain; version=0.0.4; q=0.5"
    resp = api.get("/metrics", headers={"Accept": accept})
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/openmetrics-text")
    assert resp.text.endswith("# EOF\n")
    assert 'orchestrator_runs_started_total{flow="etl"}' in resp.text


def test_a_change_the_script_refuses_takes_its_counts_back(client):
    """Counts ride in the script's pipeline; a change the script does not make is not
    counted: a run created twice, a step ended twice, a run that had ended already."""
    store, flow, rid = client.store, f"f-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    now = time.time()
    run = {"id": rid, "flow": flow, "version": "v1", "status": "pending", "created_at": now}
    created = {"ts": now, "type": "run.created", "step": ""}
    assert store.create_run(run, created) and not store.create_run(run, created)

    rec = {"status": "succeeded", "attempts": 1, "started_at": now, "finished_at": now + 0.3}
    counts = step_counts(flow, 0.3)
    assert store.complete_step(rid, [("a", rec, 1)], [], counts=counts) == "ok"
    assert store.complete_step(rid, [("a", rec, 1)], [], counts=counts) == "dup"

    end = {"ts": now, "type": "run.cancelled", "step": ""}
    store.move_run(rid, ("pending", "running"), "cancelled", end, {"finished_at": now + 2})
    with pytest.raises(redis.ResponseError):
        store.move_run(rid, ("pending", "running"), "cancelled", end, {"finished_at": now + 3})
    # A step that ends after the cancel is recorded, but it does not end the run.
    final = {"status": "succeeded", "finished_at": now + 4}
    res = store.complete_step(
        rid,
        [("b", rec, 2)],
        [],
        final,
        counts=counts,
        final_counts=run_counts(flow, "succeeded", now, now + 4),
    )
    assert res == "inactive"

    raw = store.r.hgetall(store.metrics_key())
    mine = {k: float(v) for k, v in raw.items() if k.split("|")[1:2] == [flow]}
    assert mine == {
        f"started|{flow}": 1,
        f"step|{flow}|0.5": 2,  # a and b, 0.3 s each
        f"step_sum|{flow}": pytest.approx(0.6),
        f"finished|{flow}|cancelled": 1,
        f"run|{flow}|2.5": 1,  # 2 s from creation to the cancel
        f"run_sum|{flow}": pytest.approx(2.0),
        f"finished|{flow}|succeeded": 0,
        f"run|{flow}|5": 0,
    }
