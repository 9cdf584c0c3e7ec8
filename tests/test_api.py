"""The REST API against a real Client, Redis and worker; and ``orchestrator api`` served."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import httpx
import pytest
from fastapi.testclient import TestClient

from orchestrator.api import create_api
from tests.support import REPO_ROOT, free_port, wait_for

pytestmark = pytest.mark.integration

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def api(settings, client, worker):
    client.deploy(REPO_ROOT / "flows" / "text.yaml", REPO_ROOT / "flows" / "expense-approval.yaml")
    app = create_api(settings.model_copy(update={"api_tokens": f"other, {TOKEN}"}), client)
    with TestClient(app, raise_server_exceptions=False) as tc:
        tc.headers.update(AUTH)
        yield tc


def _status(api: TestClient, run_id: str) -> str:
    resp = api.get(f"/v1/runs/{run_id}")
    assert resp.status_code == 200, resp.text
    return resp.json()["status"]


def _trigger_expense(api: TestClient) -> str:
    resp = api.post(
        "/v1/flows/expense-approval/runs", json={"inputs": {"employee": "eve", "amount": 100}}
    )
    assert resp.status_code == 201, resp.text
    run_id = resp.json()["id"]

    def waiting():
        steps = api.get(f"/v1/runs/{run_id}").json()["steps"]
        return steps.get("manager_approval", {}).get("status") == "waiting"

    wait_for(waiting, timeout=30, message="manager_approval never waited")
    return run_id


def test_trigger_answers_201_and_the_run_finishes(api):
    resp = api.post("/v1/flows/text/runs", json={"inputs": {"message": "a b c"}})
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["flow"] == "text" and body["id"] and body["status"] in ("pending", "running")
    assert {"inputs", "outputs", "steps", "created_at"} <= set(body)
    wait_for(lambda: _status(api, body["id"]) == "succeeded", timeout=30)
    run = api.get(f"/v1/runs/{body['id']}").json()
    assert run["outputs"] == {"message": "C B A", "spaces": 2}
    assert run["steps"]["upper"]["status"] == "succeeded"


def test_idempotency_key_returns_the_same_run(api):
    key = f"k-{uuid.uuid4().hex}"
    headers = {"Idempotency-Key": key}
    first = api.post("/v1/flows/text/runs", json={"inputs": {"message": "x"}}, headers=headers)
    second = api.post("/v1/flows/text/runs", json={"inputs": {"message": "x"}}, headers=headers)
    assert first.status_code == second.status_code == 201
    assert first.json()["id"] == second.json()["id"]


def test_bad_input_is_422_naming_the_field(api):
    resp = api.post("/v1/flows/text/runs", json={"inputs": {"message": 5}})
    assert resp.status_code == 422, resp.text
    body = resp.json()
    assert body["error"] == "invalid_input" and body["field"] == "inputs.message"
    resp = api.post("/v1/flows/text/runs", json={"inputs": {}})
    assert resp.status_code == 422 and resp.json()["field"] == "inputs.message"


def test_malformed_requests_are_4xx_not_5xx(api):
    resp = api.post(
        "/v1/flows/text/runs", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == 400 and resp.json()["error"] == "invalid_json"
    resp = api.post("/v1/flows/text/runs", json={"inputs": "nope"})
    assert resp.status_code == 422 and resp.json()["field"] == "body.inputs"
    resp = api.post("/v1/flows/text/runs", json={"inputz": {}})
    assert resp.status_code == 422 and resp.json()["field"] == "body.inputz"
    resp = api.get("/v1/runs", params={"limit": "many"})
    assert resp.status_code == 422 and resp.json()["field"] == "query.limit"
    resp = api.get("/v1/runs", params={"status": "sleeping"})
    assert resp.status_code == 422 and resp.json()["field"] == "query.status"
    resp = api.post("/v1/runs/whatever/steps/s/approve", json={"comment": "no by"})
    assert resp.status_code == 422 and resp.json()["field"] == "body.by"


def test_unknown_flow_and_run_are_404(api):
    resp = api.post("/v1/flows/no-such-flow/runs", json={"inputs": {}})
    assert resp.status_code == 404 and resp.json()["error"] == "not_found"
    assert api.get("/v1/runs/no-such-run").status_code == 404
    assert api.get("/v1/runs/no-such-run/events").status_code == 404
    assert api.get("/v1/flows/no-such-flow/graph").status_code == 404


def test_stopped_flow_is_409(api, client):
    client.stop_flow("text")
    try:
        resp = api.post("/v1/flows/text/runs", json={"inputs": {"message": "x"}})
        assert resp.status_code == 409 and resp.json()["error"] == "flow_stopped"
    finally:
        client.start_flow("text")


def test_missing_or_bad_token_is_401(api):
    bare = {"Authorization": ""}
    resp = api.get("/v1/flows", headers=bare)
    assert resp.status_code == 401 and resp.json()["error"] == "unauthorized"
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert api.get("/v1/flows", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert api.get("/v1/flows", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    resp = api.post("/v1/flows/text/runs", json={"inputs": {"message": "x"}}, headers=bare)
    assert resp.status_code == 401
    assert api.get("/v1/flows", headers={"Authorization": "Bearer other"}).status_code == 200


def test_no_tokens_configured_refuses_everyone(settings, client):
    app = create_api(settings, client)  # api_tokens empty
    with TestClient(app) as tc:
        assert tc.get("/v1/flows").status_code == 401
        assert tc.get("/v1/flows", headers={"Authorization": "Bearer "}).status_code == 401
        # dev mode skips auth only on a loopback server address; "testserver" is not one
        dev = create_api(settings, client, dev=True)
        with TestClient(dev) as tdev:
            assert tdev.get("/v1/flows").status_code == 401


def test_healthz_needs_no_token(api):
    resp = api.get("/healthz", headers={"Authorization": ""})
    assert resp.status_code == 200 and resp.json()["status"] == "ok"


def test_approve_and_reject_by_a_non_approver_is_403(api):
    run_id = _trigger_expense(api)
    for verb in ("approve", "reject"):
        resp = api.post(f"/v1/runs/{run_id}/steps/manager_approval/{verb}", json={"by": "mallory"})
        assert resp.status_code == 403, resp.text
        assert resp.json()["error"] == "forbidden"
    resp = api.post(
        f"/v1/runs/{run_id}/steps/manager_approval/approve", json={"by": "alice", "comment": "ok"}
    )
    assert resp.status_code == 200 and resp.json()["decision"] == "approved"
    wait_for(lambda: _status(api, run_id) == "succeeded", timeout=30)
    again = api.post(f"/v1/runs/{run_id}/steps/manager_approval/reject", json={"by": "alice"})
    assert again.status_code == 409


def test_signal_events_and_cancel(api):
    run_id = _trigger_expense(api)
    resp = api.post(f"/v1/runs/{run_id}/signals/payment_confirmed", json={"amount": 10})
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"run": run_id, "signal": "payment_confirmed", "result": "kept"}
    events = api.get(f"/v1/runs/{run_id}/events").json()["events"]
    types = [e["type"] for e in events]
    assert "signal.received" in types
    assert all("id" in e for e in events)

    resp = api.post(f"/v1/runs/{run_id}/cancel")
    assert resp.status_code == 200 and resp.json()["status"] == "cancelled"
    assert api.post(f"/v1/runs/{run_id}/cancel").status_code == 409
    resp = api.post(f"/v1/runs/{run_id}/signals/late", json=None)
    assert resp.status_code == 409 and resp.json()["error"] == "invalid_state"
    assert api.post(f"/v1/runs/{run_id}/retry").status_code == 409
    assert api.post("/v1/runs/no-such-run/signals/x", json={}).status_code == 404


def test_runs_list_filtered_by_flow(api):
    resp = api.post("/v1/flows/text/runs", json={"inputs": {"message": "list me"}})
    text_id = resp.json()["id"]
    runs = api.get("/v1/runs", params={"flow": "text", "limit": 100}).json()["runs"]
    assert runs and all(r["flow"] == "text" for r in runs)
    assert text_id in [r["id"] for r in runs]
    others = api.get("/v1/runs", params={"flow": "expense-approval"}).json()["runs"]
    assert text_id not in [r["id"] for r in others]
    assert all(r["flow"] == "expense-approval" for r in others)
    wait_for(lambda: _status(api, text_id) == "succeeded", timeout=30)
    done = api.get("/v1/runs", params={"flow": "text", "status": "succeeded"}).json()["runs"]
    assert text_id in [r["id"] for r in done]
    assert all(r["status"] == "succeeded" for r in done)


def test_flows_and_graph(api):
    flows = api.get("/v1/flows").json()["flows"]
    assert {"text", "expense-approval"} <= {f["name"] for f in flows}
    resp = api.get("/v1/flows/text/graph")
    assert resp.status_code == 200
    body = resp.json()
    assert body["format"] == "mermaid" and "upper" in body["graph"]
    run_id = api.post("/v1/flows/text/runs", json={"inputs": {"message": "g"}}).json()["id"]
    wait_for(lambda: _status(api, run_id) == "succeeded", timeout=30)
    coloured = api.get("/v1/flows/text/graph", params={"run": run_id})
    assert coloured.status_code == 200 and coloured.json()["graph"]
    assert api.get("/v1/flows/expense-approval/graph", params={"run": run_id}).status_code == 404


def test_orchestrator_api_served_over_http(orch_env, api):
    port = free_port()
    env = {**os.environ, **orch_env, "ORCHESTRATOR_API_TOKENS": TOKEN}
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "api", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"

    def up():
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        try:
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(up, timeout=30, interval=0.1, message="orchestrator api never answered")
        assert httpx.get(f"{base}/v1/flows", timeout=5).status_code == 401
        resp = httpx.get(f"{base}/v1/flows", headers=AUTH, timeout=5)
        assert resp.status_code == 200
        assert "text" in {f["name"] for f in resp.json()["flows"]}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()


def test_api_refuses_dev_off_loopback(orch_env):
    env = {**os.environ, **orch_env}
    env.pop("ORCHESTRATOR_API_TOKENS", None)
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator", "api", "--host", "0.0.0.0", "--dev"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2 and "loopback" in out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator", "api", "--port", "1"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2 and "ORCHESTRATOR_API_TOKENS" in out.stderr


def test_dev_mode_skips_auth_on_loopback_only(settings, client):
    dev = create_api(settings, client, dev=True)
    with TestClient(dev, base_url="http://127.0.0.1") as local:
        assert local.get("/v1/flows").status_code == 200
    with TestClient(create_api(settings, client), base_url="http://127.0.0.1") as prod:
        assert prod.get("/v1/flows").status_code == 401


def test_healthz_is_503_when_redis_is_down(settings):
    down = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    with TestClient(create_api(down)) as tc:
        resp = tc.get("/healthz")
        assert resp.status_code == 503 and resp.json()["error"] == "unavailable"
