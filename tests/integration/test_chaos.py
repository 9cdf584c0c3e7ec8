"""Chaos: runs in flight while worker nodes are SIGKILLed and Redis restarts.

Every step's task (``tests/recovery_tasks.py``) records each execution in Redis, so the
tests count executions per step, duplicates, and any two executions of one step running
at once. Delivery is at least once: a step whose worker died runs again (a duplicate);
its outcome is recorded once, and the run goes on. The figures (kills, duplicates,
recovery times) are printed with ``pytest -rP``.
"""

from __future__ import annotations

import re
import statistics
import time
import uuid

import pytest
from fastapi.testclient import TestClient

from orchestrator.api import create_api
from orchestrator.client import Client
from orchestrator.settings import Settings
from tests.integration.flows import deploy, key
from tests.support import RedisServer, wait_for

#: Runs in flight in the SIGKILL test, and how often a worker node is killed.
RUNS = 200
KILL_EVERY_S = 2.5
#: Runs in flight while Redis restarts.
REDIS_RUNS = 100
#: Worker heartbeat and lease (production defaults: 5 s and 15 s).
HEARTBEAT_S = 0.5
LEASE_S = 2.0
#: Each test must be done within this (the suite's budget is 90 s per chaos test).
DEADLINE_S = 75.0

FLOW = """
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: NAME}
spec:
  defaults: {queue: QUEUE}
  inputs: {ns: {type: string}}
  steps:
    - id: one
      task: rec.effect
      with: {ns: "${inputs.ns}", value: 0, seconds: 0.1}
    MIDDLE
    - id: two
      task: rec.effect
      with: {ns: "${inputs.ns}", value: "${steps.one.output}", seconds: 0.1}
    - id: three
      task: rec.effect
      with: {ns: "${inputs.ns}", value: "${steps.two.output}", seconds: 0.1}
  outputs: {n: "${steps.three.output}"}
"""
STEPS = ("one", "two", "three")


def worker_env(orch_env: dict[str, str], queue: str, **extra: str) -> dict[str, str]:
    return {
        "ORCHESTRATOR_DEFAULT_QUEUE": queue,
        "ORCHESTRATOR_TASK_MODULES": orch_env["ORCHESTRATOR_TASK_MODULES"]
        + ",tests.recovery_tasks",
        "ORCHESTRATOR_HEARTBEAT_S": str(HEARTBEAT_S),
        "ORCHESTRATOR_LEASE_S": str(LEASE_S),
        **extra,
    }


class Ledger:
    """The executions ``tests/recovery_tasks.py`` recorded for the runs of one test."""

    def __init__(self, r, ns: str):
        self.r, self.ns = r, ns

    def starts(self, run_ids: list[str]) -> dict[tuple[str, str], list[tuple[float, str]]]:
        pipe = self.r.pipeline(transaction=False)
        for rid in run_ids:
            for step in STEPS:
                pipe.lrange(f"{self.ns}:{rid}:{step}:starts", 0, -1)
        out, raw = {}, iter(pipe.execute())
        for rid in run_ids:
            for step in STEPS:
                out[(rid, step)] = [(float(t), w) for t, w in (s.split(" ", 1) for s in next(raw))]
        return out

    def overlaps(self) -> dict[str, list[str]]:
        """Steps that two executions ran at once, with their executions' starts."""
        keys = list(self.r.scan_iter(f"{self.ns}:*:overlap", count=1000))
        return {
            k: self.r.lrange(k.replace(":overlap", ":starts"), 0, -1)
            for k in keys
            if int(self.r.get(k) or 0)
        }

    def effects(self) -> set[str]:
        return self.r.smembers(f"{self.ns}:effects")


def check_runs(
    client, ledger: Ledger, run_ids: list[str], waits: tuple[str, ...] = ()
) -> dict[str, int]:
    """Every run succeeded, every step (and wait) succeeded once and ran; executions counted."""
    statuses = {rid: client.get(rid).status for rid in run_ids}
    assert set(statuses.values()) == {"succeeded"}, statuses
    for rid in run_ids:
        assert client.get(rid).outputs == {"n": 3}
        succeeded = [e["step"] for e in client.events(rid) if e["type"] == "step.succeeded"]
        assert sorted(succeeded) == sorted(STEPS + waits), (rid, succeeded)
    starts = ledger.starts(run_ids)
    assert all(starts.values()), [k for k, v in starts.items() if not v]
    assert ledger.effects() == {f"{rid}:{step}" for rid in run_ids for step in STEPS}
    assert not ledger.overlaps(), ledger.overlaps()
    executions = sum(len(v) for v in starts.values())
    return {"executions": executions, "duplicates": executions - len(starts)}


def recovery_times(starts: dict, kills: list[tuple[float, str]]) -> list[float]:
    """For each step that ran again after its worker node was killed: kill -> next start."""
    out = []
    for execs in starts.values():
        for (t0, w0), (t1, _) in zip(execs, execs[1:], strict=False):
            killed = [k for k, node in kills if w0.startswith(node + ":") and t0 < k < t1]
            if killed:
                out.append(t1 - killed[0])
    return out


def test_runs_survive_worker_nodes_sigkilled_every_few_seconds(
    client, worker_factory, orch_env, r
) -> None:
    queue = f"chaos-{uuid.uuid4().hex[:8]}"
    env = worker_env(orch_env, queue)
    name = deploy(client, FLOW.replace("QUEUE", queue).replace("    MIDDLE\n", ""))
    nodes = [worker_factory(queues=[queue], env=env, name=f"node{i}") for i in (0, 1)]
    ns = key()
    began = time.monotonic()
    run_ids = [client.trigger(name, {"ns": ns}).id for _ in range(RUNS)]
    kills: list[tuple[float, str]] = []
    next_kill = [time.monotonic() + KILL_EVERY_S]
    done: set[str] = set()

    def all_ended_killing_on_schedule() -> bool:
        done.update(client.store.run_ids(status="succeeded", limit=RUNS + 1))
        if len(done & set(run_ids)) == RUNS:
            return True
        if time.monotonic() >= next_kill[0]:
            victim = nodes[len(kills) % 2]
            kills.append((time.time(), victim.hostname))
            victim.kill()  # SIGKILL: the main process and its pool children
            victim.start()  # same node name, as a restarted container would have
            next_kill[0] = time.monotonic() + KILL_EVERY_S
        return False

    wait_for(
        all_ended_killing_on_schedule,
        timeout=DEADLINE_S,
        interval=0.1,
        message=lambda: f"{len(done & set(run_ids))} of {RUNS} runs ended",
    )
    elapsed = time.monotonic() - began
    ledger = Ledger(r, ns)
    counts = check_runs(client, ledger, run_ids)
    times = recovery_times(ledger.starts(run_ids), kills)
    print(
        f"{RUNS} runs in {elapsed:.1f} s, {len(kills)} SIGKILLs, {counts['executions']} "
        f"step executions ({counts['duplicates']} run again after a kill); recovery after "
        f"a kill: median {statistics.median(times) if times else 0:.2f} s, max "
        f"{max(times, default=0):.2f} s over {len(times)} steps"
    )
    assert len(kills) >= 2, "the runs ended before the chaos began: raise RUNS"
    assert max(times, default=0) < LEASE_S + 2 * HEARTBEAT_S + 3.0


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of this test's own, with AOF, that the test stops and restarts."""
    server = RedisServer(tmp_path / "redis")
    server.start(appendonly=True)
    yield server
    server.cleanup()


def test_runs_survive_a_redis_restart_with_aof(
    own_redis, worker_factory, beat_factory, orch_env
) -> None:
    # own_redis first: set up before the workers and beat, so stopped after them.
    queue = f"chaos-{uuid.uuid4().hex[:8]}"
    env = worker_env(
        orch_env,
        queue,
        ORCHESTRATOR_REDIS_URL=own_redis.url,
        ORCHESTRATOR_KEY_PREFIX="chaos:",
        ORCHESTRATOR_TICK_S="0.2",
    )
    settings = Settings(
        redis_url=own_redis.url, key_prefix="chaos:", default_queue=queue, api_tokens="t0k3n"
    )
    client = Client(settings)
    api = TestClient(create_api(settings, client), headers={"Authorization": "Bearer t0k3n"})
    r = own_redis.client(decode_responses=True)
    try:
        # A sleep between the steps: its timer needs beat's tick after the restart.
        flow = FLOW.replace("QUEUE", queue).replace("MIDDLE", "- {id: nap, sleep: 1s}")
        name = deploy(client, flow)
        nodes = [worker_factory(queues=[queue], env=env, name=f"node{i}") for i in (0, 1)]
        beat = beat_factory(env)
        ns = key()
        run_ids = [client.trigger(name, {"ns": ns}).id for _ in range(REDIS_RUNS)]
        ledger = Ledger(r, ns)
        wait_for(
            lambda: len(ledger.effects()) >= REDIS_RUNS // 2,
            timeout=30,
            message="the load never got going",
        )
        r.close()
        down_at = time.monotonic()
        own_redis.stop()  # SHUTDOWN NOSAVE: the AOF keeps every write acknowledged so far
        for p in nodes:  # down until each worker failed to reconnect twice (~2 s)
            wait_for(
                lambda p=p: re.search(r"Connection refused.*\n.*\(2/\d+\)", p.log_text()),
                timeout=20,
                message=f"{p.name} did not try to reconnect",
            )
        outage = time.monotonic() - down_at
        own_redis.start(appendonly=True)  # same port and data directory
        up_at = time.monotonic()
        # The API (and this client) reconnect by themselves: one more run through it.
        resp = api.post(f"/v1/flows/{name}/runs", json={"inputs": {"ns": ns}})
        assert resp.status_code == 201, resp.text
        run_ids.append(resp.json()["id"])
        wait_for(
            lambda: (
                len(set(client.store.run_ids(status="succeeded", limit=len(run_ids) + 1)))
                == len(run_ids)
            ),
            timeout=DEADLINE_S - 30,
            interval=0.2,
            message=lambda: f"runs still going: {client.store.run_ids(status='running')}",
        )
        finished = time.monotonic() - up_at
        counts = check_runs(client, ledger, run_ids, waits=("nap",))
        print(
            f"Redis down {outage:.1f} s with {REDIS_RUNS} runs in flight; all ended "
            f"{finished:.1f} s after it came back; {counts['executions']} step executions "
            f"({counts['duplicates']} duplicates)"
        )
        for p in (*nodes, beat):
            assert p.running, f"{p.name} did not survive the restart"
        assert api.get(f"/v1/runs/{run_ids[-1]}").json()["status"] == "succeeded"
    finally:
        client.close()
        r.close()
