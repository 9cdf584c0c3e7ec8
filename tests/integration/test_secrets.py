"""A secret Variable's value reaches no Redis key, no log, no API or CLI output and no
Flower page, whichever path carries it: a failing task's error (the run's error, its
``run.failing`` event, the task's traceback), ``onFailure``, a try's stored error and
its catch step's ``${error.message}``, a subflow's inputs, an approval's message and
decision, signals, events, step outputs, forEach items and a task's log line.

The secret lives in the environment of the worker (and of this test process, which
sends signals, decisions, events and inputs holding it); the CLI and Flower processes
run without it, so what they print comes from Redis as it was written.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient

from orchestrator.api import create_api
from orchestrator.errors import RunFailed
from tests.integration.flows import deploy, waiting
from tests.support import REPO_ROOT, flower_process, wait_for

SECRET = f"sec-{uuid.uuid4().hex}"
ENV = "SECRETS_TEST_TOKEN"
API_TOKEN = "secrets-api-token"
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
FLOWER_USERS = "admin:pw-secrets-1"


@pytest.fixture(scope="module")
def orch_env(orch_env):
    """Workers, Flower and the CLI get these; only the worker gets the secret too."""
    modules = orch_env["ORCHESTRATOR_TASK_MODULES"] + ",tests.secret_tasks"
    return {**orch_env, "ORCHESTRATOR_TASK_MODULES": modules, "ORCHESTRATOR_API_TOKENS": API_TOKEN}


@pytest.fixture(scope="module")
def secret_here():
    """This process has the secret too (it sends signals and inputs holding it), but
    never resolves the Variable: its store must learn it from the deployed Variables."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV, SECRET)
        yield


def _clean_env(orch_env: dict[str, str], **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ORCHESTRATOR_", "FLOWER_")) and k != ENV
    }
    return {**env, **orch_env, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", **extra}


@pytest.fixture
def flower(orch_env, tmp_path_factory):
    """``orchestrator flower`` (without the secret in its environment): (base URL, log)."""
    log = tmp_path_factory.mktemp("flower") / "flower.log"
    env = _clean_env(orch_env, ORCHESTRATOR_FLOWER_BASIC_AUTH=FLOWER_USERS)
    with flower_process(env, log) as (base, _pid):
        yield base, log


FLOWS = f"""
apiVersion: orchestrator/v1
kind: Variable
metadata: {{name: NAME-token}}
spec: {{value: "${{env.{ENV}}}", secret: true}}
---
apiVersion: orchestrator/v1
kind: Flow
metadata: {{name: NAME-child}}
spec:
  inputs: {{token: {{type: string, required: true}}}}
  steps:
    - id: got
      task: tests.echo
      with: {{given: "${{inputs.token}}", read: "${{vars['NAME-token']}}"}}
  outputs: {{given: "${{steps.got.output.given}}", read: "${{steps.got.output.read}}"}}
---
apiVersion: orchestrator/v1
kind: Flow
metadata: {{name: NAME-strict}}
spec:
  inputs: {{n: {{type: integer, required: true}}}}
  steps:
    - {{id: one, task: tests.noop}}
---
apiVersion: orchestrator/v1
kind: Flow
metadata: {{name: NAME}}
spec:
  inputs: {{note: {{type: string}}}}
  steps:
    - id: echo
      task: tests.echo
      with: {{value: "token=${{vars['NAME-token']}}", note: "${{inputs.note}}"}}
    - {{id: env, task: secrets.env_value, with: {{name: {ENV}}}}}
    - {{id: logs, task: tests.log, with: {{message: "the token is ${{vars['NAME-token']}}"}}}}
    - id: items
      forEach: "${{[vars['NAME-token'], 'plain']}}"
      do:
        - {{id: each, task: tests.echo, with: {{item: "${{item}}"}}}}
    - id: retried
      onError: continue
      retry: {{maxAttempts: 2, backoff: fixed, initialDelay: 50ms, jitter: false}}
      task: secrets.env_error
      with: {{name: {ENV}}}
    - id: chained
      onError: continue
      task: secrets.chained_error
      with: {{name: {ENV}}}
    - id: outer
      try:
        - id: inner
          try:
            - {{id: boom, task: tests.fail, with: {{message: "inner ${{vars['NAME-token']}}"}}}}
          finally:
            - {{id: tidy, task: tests.noop}}
      catch:
        - {{id: handle, task: tests.echo, with: {{seen: "${{error.message}}"}}}}
    - id: sub
      flow: NAME-child
      with: {{token: "${{vars['NAME-token']}}"}}
    - id: approve
      approval:
        approvers: [alice]
        message: "approve the use of ${{vars['NAME-token']}}"
    - {{id: first, wait: {{signal: first}}}}
    - {{id: kept, wait: {{signal: kept}}}}
  outputs:
    echoed: ${{steps.echo.output.value}}
    note: ${{steps.echo.output.note}}
    env: ${{steps.env.output}}
    items: ${{steps.items.output}}
    caught: ${{steps.handle.output.seen}}
    child: ${{steps.sub.output}}
    decision: ${{steps.approve.output.comment}}
    first: ${{steps.first.output}}
    kept: ${{steps.kept.output}}
---
apiVersion: orchestrator/v1
kind: Flow
metadata: {{name: NAME-failing}}
spec:
  steps:
    - {{id: doomed, task: tests.fail, with: {{message: "denied for ${{vars['NAME-token']}}"}}}}
  onFailure:
    - {{id: alert, task: tests.echo, with: {{text: "alert ${{vars['NAME-token']}}"}}}}
    - {{id: alert-fails, task: tests.fail, with: {{message: "alert ${{vars['NAME-token']}}"}}}}
---
apiVersion: orchestrator/v1
kind: Flow
metadata: {{name: NAME-envfail}}
spec:
  steps:
    - {{id: doomed, task: secrets.env_error, with: {{name: {ENV}}}}}
---
apiVersion: orchestrator/v1
kind: EventSubscription
metadata: {{name: NAME-sub}}
spec:
  channel: CHANNEL
  flow: NAME-child
  inputs: {{token: "${{event.data.token}}"}}
---
apiVersion: orchestrator/v1
kind: EventSubscription
metadata: {{name: NAME-dead}}
spec:
  channel: CHANNEL
  flow: NAME-strict
  inputs: {{n: "${{event.data.token}}"}}
"""


def assert_nowhere_in_redis(r, secret: str) -> int:
    """Every key of every type, its name and everything in it: strings, hash fields and
    values, list and set members, zset members, stream entries' fields and values."""
    readers = {
        "string": lambda k: [r.get(k)],
        "hash": lambda k: [x for kv in r.hgetall(k).items() for x in kv],
        "list": lambda k: r.lrange(k, 0, -1),
        "set": lambda k: list(r.smembers(k)),
        "zset": lambda k: r.zrange(k, 0, -1),
        "stream": lambda k: [x for i, f in r.xrange(k) for kv in f.items() for x in (i, *kv)],
    }
    scanned = 0
    for key in r.scan_iter(count=1000):
        assert secret not in key, key
        kind = r.type(key)
        if kind == "none":  # expired since the SCAN
            continue
        for v in readers[kind](key):
            assert secret not in str(v), f"the secret is in {kind} {key}: {v}"
        scanned += 1
    return scanned


def test_a_secret_reaches_no_redis_key_log_api_cli_or_flower(
    client, worker_factory, flower, secret_here, redis_server, orch_env
):
    worker = worker_factory(env={ENV: SECRET}, name="secrets")  # Flower listens already
    channel = f"secrets-{uuid.uuid4().hex[:6]}"
    name = deploy(client, FLOWS.replace("CHANNEL", channel))
    api = TestClient(create_api(client.settings, client=client))

    # A run holding the secret everywhere, its input included (sent by this process).
    resp = api.post(f"/v1/flows/{name}/runs", json={"inputs": {"note": SECRET}}, headers=AUTH)
    assert resp.status_code == 201, resp.text
    run_id = resp.json()["id"]
    waiting(client, run_id, "approve")
    # A signal that arrives before its wait is kept in a list; then the decision.
    kept = api.post(f"/v1/runs/{run_id}/signals/kept", json={"token": SECRET}, headers=AUTH)
    assert kept.status_code == 200 and kept.json()["result"] == "kept", kept.text
    decided = api.post(
        f"/v1/runs/{run_id}/steps/approve/approve",
        json={"by": "alice", "comment": f"fine, use {SECRET}"},
        headers=AUTH,
    )
    assert decided.status_code == 200, decided.text
    waiting(client, run_id, "first")
    first = api.post(f"/v1/runs/{run_id}/signals/first", json=[SECRET], headers=AUTH)
    assert first.status_code == 200 and first.json()["result"] == "resumed", first.text
    run = client.get(run_id)
    out = run.wait(timeout=60)
    assert out["echoed"] == "token=***" and out["note"] == "***"
    assert out["env"] == {"value": "***", "nested": ["x***y"], "***": 1}
    assert out["items"] == [{"item": "***"}, {"item": "plain"}]
    assert out["caught"] == "inner ***"
    # The secret passed in a subflow's `with` reaches the child masked; the child reads
    # the Variable itself to use it.
    assert out["child"] == {"given": "***", "read": "***"}
    assert out["decision"] == "fine, use ***"
    assert out["first"] == ["***"] and out["kept"] == {"token": "***"}
    run.refresh()
    assert run.steps["retried"].status == "failed"
    assert run.steps["retried"].error["message"] == "token *** rejected"
    assert run.steps["chained"].error["type"] == "RuntimeError"
    child = client.get(_child_of(client, run_id))
    assert child.inputs == {"token": "***"}
    # The try's stored errors (what ${error.message} reads) and the approval's wait.
    e_outer, pe_inner = client.store.read_fields(run_id, ["e:outer", "pe:inner"])
    assert json.loads(e_outer)["message"] == json.loads(pe_inner)["message"] == "inner ***"
    [parked] = [e for e in client.events(run_id) if e["type"] == "step.waiting"][:1]
    assert parked["wait"]["message"] == "approve the use of ***"

    # A failing run: its error, its run.failing event, onFailure's steps.
    failing = client.trigger(f"{name}-failing")
    with pytest.raises(RunFailed) as info:
        failing.wait(timeout=30)
    assert info.value.run.error["message"] == "denied for ***"
    [failing_event] = [e for e in client.events(failing.id) if e["type"] == "run.failing"]
    assert failing_event["error"]["message"] == "denied for ***"
    assert info.value.run.steps["alert"].output == {"text": "alert ***"}
    assert info.value.run.steps["alert-fails"].error["message"] == "alert ***"
    envfail = client.trigger(f"{name}-envfail")
    with pytest.raises(RunFailed) as info:
        envfail.wait(timeout=30)
    assert info.value.run.error["message"] == "token *** rejected"

    # An event holding the secret: one run of the child, one dead letter.
    published = api.post(f"/v1/events/{channel}", json={"data": {"token": SECRET}}, headers=AUTH)
    assert published.status_code == 202, published.text
    wait_for(lambda: client.dead_events(channel), timeout=20, message="a dead letter")
    [evrun] = wait_for(
        lambda: [r for r in client.runs(flow=f"{name}-child") if r.id != child.id],
        timeout=20,
        message="the event's run",
    )
    assert evrun.wait(timeout=20) == {"given": "***", "read": "***"}

    runs = [run_id, failing.id, envfail.id, child.id, evrun.id]
    flows = [name, f"{name}-child", f"{name}-failing", f"{name}-envfail"]

    # Redis: every key of every type.
    assert assert_nowhere_in_redis(redis_server.client(decode_responses=True), SECRET) > 10

    # The API's JSON.
    texts = [api.get("/v1/runs?limit=100", headers=AUTH).text]
    for rid in runs:
        texts += [
            api.get(f"/v1/runs/{rid}", headers=AUTH).text,
            api.get(f"/v1/runs/{rid}/events", headers=AUTH).text,
        ]
    for f in flows:
        texts.append(api.get(f"/v1/flows/{f}/events", headers=AUTH).text)
    texts += [
        api.get(f"/v1/events/{channel}", headers=AUTH).text,
        api.get(f"/v1/events/{channel}/dead", headers=AUTH).text,
    ]
    assert all(t and "***" in t for t in texts[:2])
    for t in texts:
        assert SECRET not in t

    # The CLI, in processes of its own without the secret (a few at a time).
    env = _clean_env(orch_env)
    commands = [
        ("runs", "show", run_id),
        ("runs", "show", "--json", failing.id),
        ("runs", "logs", run_id),
        ("runs", "ls", "--limit", "100"),
        ("flows", "logs", "--json", name),
        ("events", "dead", channel),
    ]

    def cli(args: tuple[str, ...]) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "orchestrator", *args],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, f"{args}: {proc.stdout}{proc.stderr}"
        return proc.stdout + proc.stderr

    with ThreadPoolExecutor(max_workers=2) as pool:
        outputs = list(zip(commands, pool.map(cli, commands), strict=True))
    for args, text in outputs:
        assert SECRET not in text, args
    assert all("***" in text for args, text in outputs if args[:2] == ("runs", "show"))

    # Flower: every task of these runs; a failure's and a retry's exception, traceback.
    base, flower_log = flower

    def tasks() -> dict[str, dict]:
        return httpx.get(f"{base}/api/tasks", auth=("admin", "pw-secrets-1"), timeout=5).json()

    def reported() -> dict[str, dict] | None:
        found = {
            t["name"]: t
            for t in tasks().values()
            if (args := ast.literal_eval(t.get("args") or "[]")) and args[0] in runs
        }
        wanted = {f"{name}.retried", f"{name}-failing.doomed", f"{name}-envfail.doomed"}
        if wanted <= set(found) and all(found[w].get("exception") for w in wanted):
            return found
        return None

    seen = wait_for(reported, timeout=20, message=lambda: f"Flower lists: {tasks()}")
    doomed = seen[f"{name}-failing.doomed"]
    assert doomed["exception"] == "StepError('ValueError: denied for ***')"
    # The StepError does not chain the task's own error (its traceback, its message).
    assert "During handling of the above exception" not in doomed["traceback"]
    assert seen[f"{name}-envfail.doomed"]["exception"] == (
        "StepError('TokenRejected: token *** rejected')"
    )
    # task-retried: the error retried after, whose repr showed the secret, and the
    # traceback of the retry (which chains that error).
    assert "TokenRejected: token *** rejected" in seen[f"{name}.retried"]["exception"]
    assert "Retry in" in seen[f"{name}.retried"]["traceback"]
    assert SECRET not in json.dumps(tasks())

    # Logs: the worker's (it did log the token, masked) and Flower's.
    log = worker.log_text()
    assert "the token is ***" in log
    assert SECRET not in log
    assert SECRET not in flower_log.read_text(errors="replace")


def _child_of(client, run_id: str) -> str:
    raw = client.store.read_fields(run_id, ["c:sub"])[0]
    assert raw, "the subflow step recorded no child"
    return raw


def _variable(r, prefix: str, name: str, env: str) -> None:
    """A secret Variable as another process deploys it (a reference to ``env`` only)."""
    spec = {"value": f"${{env.{env}}}", "secret": True}
    r.hset(f"{prefix}res:Variable", name, json.dumps(spec))


def test_every_store_write_masks_secrets_this_process_never_resolved(
    settings, redis_server, monkeypatch
):
    """A store learns the deployed secret Variables itself (resolving them from this
    process's environment) and masks every write; none was resolved by a step here."""
    from orchestrator import store as store_module
    from orchestrator.store import RedisStore

    secret = f"store-{uuid.uuid4().hex}"
    monkeypatch.setenv("SECRETS_STORE_TOKEN", secret)
    prefix = f"ts{uuid.uuid4().hex[:8]}:"
    r = redis_server.client(decode_responses=True)
    _variable(r, prefix, "token", "SECRETS_STORE_TOKEN")
    s = RedisStore(settings.model_copy(update={"key_prefix": prefix}))
    try:
        now = time.time()
        s.save_definition("f", "v1", {"steps": [{"with": {"t": secret}}]}, "running")
        s.save_resource("Service", "svc", {"headers": {"X-Key": secret}})
        s.save_schedule("sch", {"cron": "* * * * *", "inputs": {"t": secret}}, now + 60, True)
        s.set_schedule_state("sch", error=f"could not start: {secret}")
        run = {
            "id": "r1",
            "flow": "f",
            "version": "v1",
            "status": "pending",
            "inputs": {"t": secret},
            "created_at": now,
            "idempotency_key": f"idem-{secret}",
            "parent": None,
        }
        assert s.claim_idempotency("f", f"idem-{secret}", "r1") == "r1"
        assert s.create_run(run, {"ts": now, "type": "run.created", "step": "", "x": secret})
        err = {"type": "ValueError", "message": f"bad {secret}", "step": "a"}
        s.complete_step(
            "r1",
            [("a", {"status": "failed", "error": err, "input": {"t": secret}}, {"o": secret})],
            [{"ts": now, "type": "step.failed", "step": "a", "error": err}],
        )
        s.set_fields("r1", {"e:t": err, "pe:t": err, "w:x": {"message": secret}})
        s.foreach_start("r1", "fe", [secret, {"k": secret}], 1)
        wait = {"kind": "approval", "approvers": ["alice"], "message": secret, "deadline": None}
        event = {"ts": now, "type": "step.waiting", "step": "ok", "wait": wait}
        assert s.park("r1", "ok", {"status": "waiting"}, wait, event, None)[0] == "parked"
        decision = {"decision": "approved", "by": "alice", "comment": secret}
        assert s.decide("r1", "ok", "alice", decision, {"ts": now, "comment": secret}) == ["ok"]
        assert s.signal("r1", "sig", {"t": secret}, {"ts": now, "p": secret}) == ["kept"]
        s.add_timer(["r1", "f", "v1", secret, []], now + 60)
        s.add_watcher("r2", ["r1", "f", "v1", secret, []])
        s.add_event("chan", {"id": "e1", "data": {"t": secret}})
        s.add_event("chan", {"event": {"data": secret}, "reason": secret}, dead=True)
        assert s.begin_recovery("r1", err, {"ts": now, "type": "run.failing", "error": err}) == []
        s.move_run(
            "r1",
            ("running", "pending", "waiting"),
            "failed",
            {"ts": now, "type": "run.failed", "step": "", "error": err},
            {"error": err, "finished_at": now},
        )
        written = s.run_hash("r1")
        assert json.loads(written["inputs"]) == {"t": "***"}
        assert json.loads(written["error"])["message"] == "bad ***"
        assert json.loads(written["w:ok"])["message"] == "***"
        assert json.loads(written["o:a"]) == {"o": "***"}

        # A secret Variable deployed elsewhere later: learned when this process reads
        # the Variables (as a step reading ${vars.NAME} does) ...
        later = f"later-{uuid.uuid4().hex}"
        monkeypatch.setenv("SECRETS_STORE_LATER", later)
        _variable(r, prefix, "later", "SECRETS_STORE_LATER")
        assert set(s.resources("Variable")) == {"token", "later"}
        s.set_fields("r1", {"note": f"later {later}"})
        # ... or, at the latest, when its refresh interval has passed.
        latest = f"latest-{uuid.uuid4().hex}"
        monkeypatch.setenv("SECRETS_STORE_LATEST", latest)
        _variable(r, prefix, "latest", "SECRETS_STORE_LATEST")
        monkeypatch.setattr(store_module, "SECRETS_REFRESH_S", 0.0)
        s._secrets_due = 0.0  # the interval has passed
        s.set_fields("r1", {"note2": f"latest {latest}"})
        assert s.read_fields("r1", ["note", "note2"]) == ["later ***", "latest ***"]

        keys = list(r.scan_iter(match=f"{prefix}*", count=1000))
        assert len(keys) > 10
        for value in (secret, later, latest):
            assert assert_nowhere_in_redis(r, value) > 10
    finally:
        s.close()
