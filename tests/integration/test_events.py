"""Event channels and webhooks on a real worker: subscriptions with filters and input
mapping, at most one run per subscription per event id, the dead-letter stream and its
replay, ``POST /v1/events``, ``POST /v1/hooks`` signatures, and ``flows logs``."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from orchestrator import events
from orchestrator.api import create_api
from orchestrator.cli import cli
from orchestrator.webhooks import sign
from tests.integration.flows import deploy
from tests.support import wait_for

TOKEN = "events-token"
HOOK_SECRET = f"hook-{uuid.uuid4().hex}"

ORDERS = """
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: NAME}
spec:
  inputs:
    order: {type: string, required: true}
    amount: {type: integer, required: true}
  steps:
    - {id: echo, task: tests.echo, with: {order: "${inputs.order}", amount: "${inputs.amount}"}}
  outputs: {order: "${steps.echo.output.order}"}
---
apiVersion: orchestrator/v1
kind: EventSubscription
metadata: {name: NAME-big}
spec:
  channel: CHANNEL
  flow: NAME
  filter: ${event.data.amount >= 100}
  inputs: {order: "${event.data.id}", amount: "${event.data.amount}"}
"""


@pytest.fixture
def orders(client):
    """A flow and its subscription on a fresh channel: (flow, channel)."""
    channel = f"orders-{uuid.uuid4().hex[:6]}"
    name = deploy(client, ORDERS.replace("CHANNEL", channel))
    return name, channel


def _runs(client, flow: str, n: int) -> list:
    wait_for(lambda: len(client.runs(flow=flow)) >= n, timeout=20, message=f"{n} runs of {flow}")
    return client.runs(flow=flow)


def test_matching_events_start_one_run_each_at_most_once_per_id(client, worker, orders):
    flow, channel = orders
    client.publish(channel, {"id": "o-1", "amount": 150}, id="evt-1")
    client.publish(channel, {"id": "o-1", "amount": 150}, id="evt-1")  # the same event again
    client.publish(channel, {"id": "o-2", "amount": 5}, id="evt-2")  # filtered out
    client.publish(channel, {"id": "o-3", "amount": 300})  # a fresh id
    runs = _runs(client, flow, 2)
    for r in runs:
        r.wait(timeout=20)
    assert sorted(r.inputs["order"] for r in runs) == ["o-1", "o-3"]
    # Every event is on the channel, the filtered one included.
    published = client.channel_events(channel)
    assert [e["id"] for e in published][:3] == ["evt-1", "evt-1", "evt-2"]
    # Delivering evt-1 once more (as a duplicate Celery delivery would) starts nothing.
    first = next(r for r in runs if r.inputs["order"] == "o-1")
    [outcome] = events.dispatch(client.store, client.app, client.plan, published[0])
    assert outcome == {"subscription": f"{flow}-big", "run": first.id, "created": False}
    [outcome] = events.dispatch(client.store, client.app, client.plan, published[2])
    assert outcome == {"subscription": f"{flow}-big", "filtered": True}
    assert len(client.runs(flow=flow)) == 2
    assert client.dead_events(channel) == []


def test_an_event_that_cannot_start_a_run_is_dead_lettered_and_replayed(client, worker, orders):
    flow, channel = orders
    # amount is not an integer: the flow's inputs refuse it
    client.publish(channel, {"id": "o-9", "amount": 150.5}, id="bad-1")
    wait_for(lambda: client.dead_events(channel), timeout=20, message="a dead-letter entry")
    [dead] = client.dead_events(channel)
    assert dead["subscription"] == f"{flow}-big" and dead["event"]["id"] == "bad-1"
    assert dead["reason"].startswith("inputs.amount: expected integer")

    # Replaying before the cause is fixed keeps it dead (with a new entry id).
    again = client.replay(channel)
    assert again[0]["dead"] and again[0]["reason"] == dead["reason"]
    assert len(client.dead_events(channel)) == 1

    # Fix the cause: the subscription now converts the amount.
    fixed = ORDERS.split("---")[1].replace("NAME", flow).replace("CHANNEL", channel)
    fixed = fixed.replace('amount: "${event.data.amount}"', 'amount: "${int(event.data.amount)}"')
    client.deploy(fixed)
    [outcome] = client.replay(channel)
    assert outcome["created"] is True
    run = client.get(outcome["run"])
    assert run.wait(timeout=20) == {"order": "o-9"}
    assert run.inputs == {"order": "o-9", "amount": 150}
    assert client.dead_events(channel) == []
    # A second replay of the same event id starts nothing new.
    assert client.replay(channel) == []


def test_stopped_flow_dead_letters_until_started(client, worker, orders):
    flow, channel = orders
    client.stop_flow(flow)
    client.publish(channel, {"id": "o-5", "amount": 500}, id="stopped-1")
    wait_for(lambda: client.dead_events(channel), timeout=20, message="a dead-letter entry")
    assert "is stopped" in client.dead_events(channel)[0]["reason"]
    client.start_flow(flow)
    [outcome] = client.replay(channel)
    assert client.get(outcome["run"]).wait(timeout=20) == {"order": "o-5"}


def test_cli_events_publish_ls_dead_replay_and_flows_logs(client, worker, orders, orch_env):
    flow, channel = orders
    runner = CliRunner()

    def call(*args: str) -> str:
        res = runner.invoke(cli, list(args), env=orch_env, catch_exceptions=False)
        assert res.exit_code == 0, res.output
        return res.output

    out = json.loads(
        call("events", "publish", channel, "--data", '{"id": "c-1", "amount": 120}', "--json")
    )
    assert out["channel"] == channel and out["stream_id"]
    [run] = _runs(client, flow, 1)
    run.wait(timeout=20)
    assert out["id"] in call("events", "ls", channel)
    assert f"{flow}-big" in call("events", "ls", channel)  # the subscriptions are listed

    call("events", "publish", channel, "--data", '{"id": "c-2", "amount": 100.5}', "--id", "dead-c")
    wait_for(lambda: client.dead_events(channel), timeout=20)
    assert "dead-c" in call("events", "dead", channel)
    res = runner.invoke(cli, ["events", "replay", channel], env=orch_env)
    assert res.exit_code == 1 and "dead again" in res.output  # still invalid: says so, exits 1

    bad = runner.invoke(cli, ["events", "publish", channel, "--data", "{nope"], env=orch_env)
    assert bad.exit_code == 2 and "--data" in bad.output

    logs = call("flows", "logs", flow)
    assert run.id in logs and "run.succeeded" in logs and "step.started" in logs
    lines = [json.loads(x) for x in call("flows", "logs", flow, "--json").splitlines()]
    assert {e["run"] for e in lines} == {run.id}
    assert [e["type"] for e in lines][0] == "run.created"


# -- over the REST API ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(settings, client, worker):
    app = create_api(settings.model_copy(update={"api_tokens": TOKEN}), client)
    with TestClient(app, raise_server_exceptions=False) as tc:
        yield tc


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_post_events_publishes_and_validates(client, api, orders):
    flow, channel = orders
    resp = api.post(
        f"/v1/events/{channel}", json={"data": {"id": "a-1", "amount": 100}}, headers=AUTH
    )
    assert resp.status_code == 202, resp.text
    [run] = _runs(client, flow, 1)
    assert run.wait(timeout=20) == {"order": "a-1"}
    assert api.get(f"/v1/events/{channel}", headers=AUTH).json()["events"][0]["id"]
    assert api.get(f"/v1/events/{channel}/dead", headers=AUTH).json() == {
        "channel": channel,
        "dead": [],
    }
    assert api.post(f"/v1/events/{channel}", json={"data": 1}).status_code == 401
    bad = api.post(f"/v1/events/{channel}", json={"data": 1, "extra": 2}, headers=AUTH)
    assert bad.status_code == 422 and bad.json()["field"] == "body.extra"
    bad = api.post("/v1/events/has space", json={"data": 1}, headers=AUTH)
    assert bad.status_code == 422 and bad.json()["field"] == "inputs.channel"
    resp = api.get(f"/v1/flows/{flow}/events", headers=AUTH)
    assert resp.status_code == 200 and resp.json()["events"][-1]["type"] == "run.succeeded"


HOOKED = """
apiVersion: orchestrator/v1
kind: Variable
metadata: {name: NAME-hook}
spec: {value: "${env.EVENTS_TEST_HOOK_SECRET}", secret: true}
---
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: NAME}
spec:
  webhook: {secret: NAME-hook}
  inputs: {message: {type: string, required: true}}
  steps:
    - {id: up, task: text.upper, with: {message: "${inputs.message}"}}
  outputs: {message: "${steps.up.output}"}
"""


@pytest.fixture
def hooked(client, monkeypatch):
    monkeypatch.setenv("EVENTS_TEST_HOOK_SECRET", HOOK_SECRET)  # the API process reads it
    return deploy(client, HOOKED)


def test_webhook_with_a_valid_signature_triggers_once(client, api, hooked):
    body = json.dumps({"message": "hi there"}).encode()
    headers = {"X-Signature": sign(HOOK_SECRET, body), "Content-Type": "application/json"}
    resp = api.post(f"/v1/hooks/{hooked}", content=body, headers=headers)
    assert resp.status_code == 201, resp.text
    run_id = resp.json()["id"]
    assert client.get(run_id).wait(timeout=20) == {"message": "HI THERE"}
    # The very same signed request again (a retry by the sender): the same run, 200.
    again = api.post(f"/v1/hooks/{hooked}", content=body, headers=headers)
    assert again.status_code == 200 and again.json()["id"] == run_id


@pytest.mark.parametrize(
    "make, why",
    [
        (lambda body: {}, "missing X-Signature"),
        (lambda body: {"X-Signature": "sha256=abc"}, "malformed"),
        (lambda body: {"X-Signature": sign("wrong-secret", body)}, "does not match"),
        (lambda body: {"X-Signature": sign(HOOK_SECRET, body + b" ")}, "does not match"),
        (lambda body: {"X-Signature": sign(HOOK_SECRET, body, time.time() - 301)}, "replay"),
        (lambda body: {"X-Signature": sign(HOOK_SECRET, body, time.time() + 400)}, "replay"),
    ],
)
def test_webhook_refuses_bad_missing_and_replayed_signatures(client, api, hooked, make, why):
    body = json.dumps({"message": "x"}).encode()
    resp = api.post(f"/v1/hooks/{hooked}", content=body, headers=make(body))
    assert resp.status_code == 401, resp.text
    assert why in resp.json()["message"] and resp.json()["field"] == "header.X-Signature"
    assert client.runs(flow=hooked) == []


def test_webhook_bad_input_and_flows_without_a_hook(client, api, hooked):
    for body, code, field in [
        (b"[1, 2]", 422, "body"),
        (b'{"message": 3}', 422, "inputs.message"),
        (b'{"unknown": 1, "message": "a"}', 422, "inputs.unknown"),
        (b"{not json", 400, None),
    ]:
        resp = api.post(
            f"/v1/hooks/{hooked}", content=body, headers={"X-Signature": sign(HOOK_SECRET, body)}
        )
        assert resp.status_code == code, (body, resp.text)
        assert resp.json().get("field") == field
    body = b"{}"
    plain = deploy(client, HOOKED.split("---")[1].replace("webhook: {secret: NAME-hook}", ""))
    # A flow without a webhook, or none at all, answers like a wrong signature: 401 with the
    # same body, so unauthenticated callers cannot enumerate flow names.
    headers = {"X-Signature": sign("x", body)}
    wrong = api.post(f"/v1/hooks/{hooked}", content=body, headers=headers)
    resp = api.post(f"/v1/hooks/{plain}", content=body, headers=headers)
    assert resp.status_code == wrong.status_code == 401 and resp.json() == wrong.json()
    missing = api.post("/v1/hooks/no-such-flow", content=body, headers=headers)
    assert missing.status_code == 401 and missing.json() == wrong.json()


def test_webhook_secret_must_be_a_deployed_secret_variable(client):
    from orchestrator.errors import DefinitionError

    text = HOOKED.split("---")[1].replace("NAME-hook", "not-deployed")
    with pytest.raises(DefinitionError) as info:
        deploy(client, text)
    assert info.value.problems[0].path == "spec.webhook.secret"
