"""http and service steps against a real local HTTP server, on a real worker;
Variables and secrets, with a scan of Redis and the worker's log for the secret."""

from __future__ import annotations

import uuid

import pytest

from orchestrator.errors import RunFailed
from tests.integration.flows import deploy
from tests.integration.httpserver import LocalHttpServer

SECRET = f"tok-{uuid.uuid4().hex}"
PLAIN = "https://plain.example"


@pytest.fixture(scope="module")
def orch_env(orch_env):
    """The worker's environment holds the secret (and a plain value) for ``${env.NAME}``."""
    return {**orch_env, "HTTP_TEST_TOKEN": SECRET, "HTTP_TEST_BASE": PLAIN}


@pytest.fixture(scope="module")
def server():
    s = LocalHttpServer().start()
    s.token = SECRET
    try:
        yield s
    finally:
        s.stop()


FAST_RETRY = "retry: {maxAttempts: 3, backoff: fixed, initialDelay: 50ms, jitter: false}"


def test_http_step_output_and_expressions(client, worker, server):
    name = deploy(
        client,
        f"""
apiVersion: orchestrator/v1
kind: Flow
metadata: {{name: NAME}}
spec:
  inputs: {{n: {{type: integer, required: true}}}}
  steps:
    - id: call
      http:
        method: post
        url: "{server.url}/json"
        query: {{page: "${{inputs.n}}"}}
        json: {{n: "${{inputs.n}}", run: "${{run.id}}"}}
    - id: use
      http: {{url: "{server.url}/json", query: {{prev: "${{steps.call.output.body.body.n}}"}}}}
  outputs:
    status: ${{steps.call.output.status}}
    echoed: ${{steps.call.output.body.body}}
    prev: ${{steps.use.output.body.query.prev}}
""",
    )
    run = client.trigger(name, {"n": 7})
    out = run.wait(timeout=30)
    assert out["status"] == 200
    assert out["echoed"] == {"n": 7, "run": run.id}
    assert out["prev"] == "7"
    run.refresh()
    assert run.steps["call"].input["method"] == "POST"


def test_5xx_is_retried_and_4xx_is_not(client, worker, server):
    key = uuid.uuid4().hex[:8]
    name = deploy(
        client,
        f"""
apiVersion: orchestrator/v1
kind: Flow
metadata: {{name: NAME}}
spec:
  defaults: {{{FAST_RETRY}}}
  steps:
    - id: flaky
      http: {{url: "{server.url}/flaky/{key}/2"}}
    - id: missing
      onError: continue
      http: {{url: "{server.url}/status/404"}}
    - id: accepted
      http: {{url: "{server.url}/status/404", expect: [200, 404]}}
  outputs: {{tries: "${{steps.flaky.output.body.tries}}"}}
""",
    )
    run = client.trigger(name)
    assert run.wait(timeout=30) == {"tries": 3}
    run.refresh()
    assert run.steps["flaky"].attempts == 3
    missing = run.steps["missing"]
    assert missing.status == "failed" and missing.attempts == 1
    assert "answered 404 (expected 2xx)" in missing.error["message"]
    assert server.count("/status/404") == 2  # once each: a 4xx is not retried
    assert run.steps["accepted"].output["status"] == 404


def test_timeout_is_retryable_and_then_fails(client, worker, server):
    name = deploy(
        client,
        f"""
apiVersion: orchestrator/v1
kind: Flow
metadata: {{name: NAME}}
spec:
  steps:
    - id: slow
      timeout: 300ms
      retry: {{maxAttempts: 2, backoff: fixed, initialDelay: 50ms, jitter: false}}
      http: {{url: "{server.url}/slow/1.5"}}
""",
    )
    run = client.trigger(name)
    with pytest.raises(RunFailed) as info:
        run.wait(timeout=30)
    step = info.value.run.steps["slow"]
    assert step.attempts == 2
    # httpx's timeout or the step's soft time limit, whichever fires first
    assert "timed out" in step.error["message"] or "timeout" in step.error["message"]


def test_service_inputs_and_outputs_are_checked(client, worker, server):
    name = deploy(
        client,
        f"""
apiVersion: orchestrator/v1
kind: Service
metadata: {{name: NAME-quote}}
spec:
  address: "{server.url}/quote"
  inputs:
    amount: {{type: number, required: true, description: net amount}}
    currency: {{type: string, enum: [EUR, USD], required: true}}
  outputs:
    total: {{type: number, required: true}}
    currency: {{type: string}}
---
apiVersion: orchestrator/v1
kind: Service
metadata: {{name: NAME-bad}}
spec:
  address: "{server.url}/quote-bad"
  inputs: {{amount: {{type: number}}, currency: {{type: string}}}}
  outputs: {{total: {{type: number}}}}
---
apiVersion: orchestrator/v1
kind: Flow
metadata: {{name: NAME}}
spec:
  inputs:
    amount: {{type: number, required: true}}
    currency: {{type: string, required: true}}
    which: {{type: string, default: NAME-quote}}
  steps:
    - id: quote
      service: NAME-quote
      with: {{amount: "${{inputs.amount}}", currency: "${{inputs.currency}}"}}
  outputs: {{total: "${{steps.quote.output.total}}", extra: "${{steps.quote.output.extra}}"}}
""",
    )
    before = server.count("/quote")
    assert client.trigger(name, {"amount": 10, "currency": "EUR"}).wait(timeout=30) == {
        "total": 12.0,
        "extra": 1,
    }
    assert server.count("/quote") == before + 1

    # Invalid input: refused before any request, not retried.
    run = client.trigger(name, {"amount": 10, "currency": "GBP"})
    with pytest.raises(RunFailed) as info:
        run.wait(timeout=30)
    err = info.value.run.steps["quote"].error["message"]
    assert "with.currency" in err and "GBP" in err
    assert info.value.run.steps["quote"].attempts == 1
    assert server.count("/quote") == before + 1

    # Invalid output: the answer is checked against the service's outputs.
    bad = deploy(
        client,
        f"""
apiVersion: orchestrator/v1
kind: Flow
metadata: {{name: NAME}}
spec:
  steps:
    - id: quote
      service: {name}-bad
      with: {{amount: 1, currency: EUR}}
""",
    )
    with pytest.raises(RunFailed) as info:
        client.trigger(bad).wait(timeout=30)
    assert "invalid output 'total'" in info.value.run.steps["quote"].error["message"]


def test_service_that_is_not_deployed_fails_the_step_clearly(client, worker):
    name = deploy(
        client,
        """
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: NAME}
spec:
  steps:
    - {id: call, service: no-such-service}
""",
    )
    with pytest.raises(RunFailed) as info:
        client.trigger(name).wait(timeout=30)
    assert "service 'no-such-service' is not deployed" in info.value.run.error["message"]


def test_variables_and_a_secret_that_never_leaks(client, worker, server, redis_server):
    name = deploy(
        client,
        f"""
apiVersion: orchestrator/v1
kind: Variable
metadata: {{name: NAME-token}}
spec: {{value: "${{env.HTTP_TEST_TOKEN}}", secret: true}}
---
apiVersion: orchestrator/v1
kind: Variable
metadata: {{name: NAME-base}}
spec: {{value: "${{env.HTTP_TEST_BASE}}/v2"}}
---
apiVersion: orchestrator/v1
kind: Variable
metadata: {{name: NAME-limit}}
spec: {{value: 3}}
---
apiVersion: orchestrator/v1
kind: Flow
metadata: {{name: NAME}}
spec:
  steps:
    - id: authorized
      http:
        url: "{server.url}/auth"
        headers: {{Authorization: "Bearer ${{vars['NAME-token']}}"}}
    - id: echo
      task: tests.echo
      with:
        value: "token=${{vars['NAME-token']}} base=${{vars['NAME-base']}}"
        limit: "${{vars['NAME-limit']}}"
    - id: leaky
      onError: continue
      task: tests.fail
      with: {{message: "bad token ${{vars['NAME-token']}}"}}
    - id: logs
      task: tests.log
      with: {{message: "the token is ${{vars['NAME-token']}}"}}
  outputs:
    echoed: ${{steps.echo.output}}
    authorized: ${{steps.authorized.output.body.authorized}}
""",
    )
    run = client.trigger(name)
    out = run.wait(timeout=30)
    assert out["authorized"] is True  # the worker resolved the secret and sent it
    assert out["echoed"]["value"] == f"token=*** base={PLAIN}/v2"
    assert out["echoed"]["limit"] == 3
    run.refresh()
    assert run.steps["leaky"].error["message"] == "bad token ***"
    assert run.steps["authorized"].input["headers"]["Authorization"] == "Bearer ***"
    assert {"name": f"{name}-token", "value": "***", "secret": True} in client.variables()

    assert run.steps["logs"].input == {"message": "the token is ***"}

    # The secret is nowhere in Redis (every value of every key) nor in the worker's log.
    assert_nowhere_in_redis(redis_server.client(decode_responses=True), SECRET)
    log = worker.log_text()
    assert "the token is ***" in log  # the task did log it, masked
    assert SECRET not in log


def assert_nowhere_in_redis(r, secret: str) -> None:
    readers = {
        "string": lambda k: [r.get(k)],
        "hash": lambda k: [x for kv in r.hgetall(k).items() for x in kv],
        "list": lambda k: r.lrange(k, 0, -1),
        "set": lambda k: list(r.smembers(k)),
        "zset": lambda k: r.zrange(k, 0, -1),
        "stream": lambda k: [x for _, f in r.xrange(k) for kv in f.items() for x in kv],
    }
    scanned = 0
    for key in r.scan_iter(count=1000):
        assert secret not in key
        kind = r.type(key)
        if kind == "none":  # gone since SCAN saw it (a fired fan-in, an expiring lock)
            continue
        values = readers[kind](key)
        scanned += 1
        for v in values:
            assert secret not in str(v), f"the secret is in {key}"
    assert scanned > 10  # it did look at the run state and the queues
