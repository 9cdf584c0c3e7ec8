"""Signals to a worker node and to its whole process group, with real worker processes.

A supervisor may signal the worker's process group rather than its main process
(``kill -- -PGID``, supervisord's ``stopasgroup``/``killasgroup``, ``tini -g``). Each pool
process leads a group of its own (``orchestrator/procgroup.py``), so a group SIGTERM is
the warm shutdown of a SIGTERM to the main process: the running step finishes, once. A
SIGKILL to either leaves no pool process behind, and what Celery itself signals to a pool
process (a run's cancel, the cold shutdown, the hard time limit) still reaches it.

The steps (``tests/recovery_tasks.py``, ``tests/signal_tasks.py``) record every execution
in Redis; every wait is a bounded poll on state.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from typing import Any

import psutil
import pytest

from tests.integration.flows import deploy, key
from tests.support import wait_for

HEARTBEAT_S = 0.5
LEASE_S = 2.0
#: How long the step of the SIGTERM tests runs.
STEP_S = 2.0

WORK_THEN_EFFECT = """
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: NAME}
spec:
  defaults: {queue: QUEUE}
  inputs: {ns: {type: string}}
  steps:
    - {id: work, task: rec.work, with: {ns: "${inputs.ns}", seconds: SECONDS}}
    - {id: after, task: rec.effect, with: {ns: "${inputs.ns}", value: 1}}
  outputs: {after: "${steps.after.output}"}
"""

HOLD_THEN_EFFECT = """
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: NAME}
spec:
  defaults: {queue: QUEUE}
  inputs: {ns: {type: string}, release: {type: string}}
  steps:
    - {id: hold, task: rec.hold, with: {ns: "${inputs.ns}", release: "${inputs.release}"}}
    - {id: after, task: rec.effect, with: {ns: "${inputs.ns}", value: 1}}
  outputs: {after: "${steps.after.output}"}
"""


@pytest.fixture
def queue() -> str:
    return f"sig-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def env(orch_env: dict[str, str], queue: str) -> dict[str, str]:
    """Worker environment: this test's queue, the recording tasks, fast heartbeats."""
    return {
        "ORCHESTRATOR_DEFAULT_QUEUE": queue,
        "ORCHESTRATOR_TASK_MODULES": orch_env["ORCHESTRATOR_TASK_MODULES"]
        + ",tests.recovery_tasks,tests.signal_tasks",
        "ORCHESTRATOR_HEARTBEAT_S": str(HEARTBEAT_S),
        "ORCHESTRATOR_LEASE_S": str(LEASE_S),
    }


def starts(r, ns: str, run_id: str, step: str) -> list[str]:
    """The workers (``<node>:<pid>``) of each recorded execution of ``step``, in order."""
    return [s.split(" ", 1)[1] for s in r.lrange(f"{ns}:{run_id}:{step}:starts", 0, -1)]


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped yet is dead)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def pool_pids(w) -> list[int]:
    """The pool processes of a prefork worker node (its main process's children)."""
    return [p.pid for p in psutil.Process(w.pid).children()]


def send(w, to: str, sig: signal.Signals) -> None:
    """``sig`` to the node's main process, or to its whole process group."""
    if to == "group":
        os.killpg(w.pid, sig)  # the main process leads its group (a session of its own)
    else:
        os.kill(w.pid, sig)


@pytest.mark.parametrize("to", ["main", "group"])
def test_sigterm_lets_the_running_step_finish_exactly_once(
    to, client, worker_factory, env, queue, r, record
) -> None:
    w = worker_factory(
        queues=[queue],
        env={**env, "ORCHESTRATOR_SHUTDOWN_TIMEOUT_S": "30"},
        concurrency=1,
        name=f"term-{to}",
    )
    name = deploy(client, WORK_THEN_EFFECT.replace("QUEUE", queue).replace("SECONDS", str(STEP_S)))
    ns = key()
    run = client.trigger(name, {"ns": ns})
    wait_for(lambda: starts(r, ns, run.id, "work"), timeout=20, message="work never started")
    pool = pool_pids(w)
    term_at = time.monotonic()
    send(w, to, signal.SIGTERM)
    wait_for(lambda: not w.running, timeout=STEP_S + 20, message="the worker did not exit")
    record("exit_after_sigterm_s", round(time.monotonic() - term_at, 2))
    assert w.returncode == 0, w.log_tail()
    assert "Warm shutdown" in w.log_text()
    assert client.get(run.id).steps["work"].status == "succeeded", w.log_tail()
    assert not [p for p in pool if alive(p)]
    worker_factory(queues=[queue], env=env, concurrency=1, name="next")
    assert run.wait(timeout=30) == {"after": 2}
    assert starts(r, ns, run.id, "work") == [starts(r, ns, run.id, "work")[0]]  # once
    assert starts(r, ns, run.id, "work")[0].startswith(w.hostname)


def test_a_group_sigterm_past_the_shutdown_limit_gives_the_step_back(
    client, worker_factory, env, queue, r, record
) -> None:
    # Celery's cold shutdown (the limit's SIGQUIT) stops pool processes of their own group.
    w = worker_factory(
        queues=[queue], env={**env, "ORCHESTRATOR_SHUTDOWN_TIMEOUT_S": "2"}, concurrency=1
    )
    name = deploy(client, HOLD_THEN_EFFECT.replace("QUEUE", queue))
    ns, release = key(), key()
    run = client.trigger(name, {"ns": ns, "release": release})
    wait_for(lambda: starts(r, ns, run.id, "hold"), timeout=20, message="hold never started")
    pool = pool_pids(w)
    nxt = worker_factory(queues=[queue], env=env, concurrency=1, name="next")
    term_at = time.monotonic()
    os.killpg(w.pid, signal.SIGTERM)
    wait_for(lambda: "Warm shutdown" in w.log_text(), timeout=10, message="no warm shutdown")
    assert [p for p in pool if alive(p)] == pool  # the step runs on, up to the limit
    wait_for(lambda: not w.running, timeout=15, message="the worker ignored its shutdown limit")
    record("shutdown_s", round(time.monotonic() - term_at, 2))
    assert "still running after 2 s" in w.log_text(), w.log_tail()
    wait_for(lambda: not [p for p in pool if alive(p)], timeout=10, message="pool left behind")
    wait_for(
        lambda: len(starts(r, ns, run.id, "hold")) == 2,
        timeout=20,
        message="the stopped step did not run again",
    )
    assert starts(r, ns, run.id, "hold")[1].startswith(nxt.hostname)
    r.set(release, "1")
    assert run.wait(timeout=30) == {"after": 2}


@pytest.mark.parametrize("to", ["main", "group"])
def test_a_sigkilled_node_leaves_no_pool_process_and_its_step_runs_elsewhere(
    to, client, worker_factory, env, queue, r, record
) -> None:
    doomed = worker_factory(queues=[queue], env=env, concurrency=2, name=f"doomed-{to}")
    name = deploy(client, HOLD_THEN_EFFECT.replace("QUEUE", queue))
    ns, release = key(), key()
    run = client.trigger(name, {"ns": ns, "release": release})
    wait_for(lambda: starts(r, ns, run.id, "hold"), timeout=20, message="hold never started")
    pool = pool_pids(doomed)
    assert len(pool) == 2
    survivor = worker_factory(queues=[queue], env=env, concurrency=1, name="survivor")
    killed_at = time.monotonic()
    send(doomed, to, signal.SIGKILL)
    wait_for(
        lambda: not [p for p in pool if alive(p)],
        timeout=10,
        message=lambda: f"pool processes outlived their node: {[p for p in pool if alive(p)]}",
    )
    record("pool_gone_after_s", round(time.monotonic() - killed_at, 3))
    wait_for(
        lambda: len(starts(r, ns, run.id, "hold")) == 2,
        timeout=LEASE_S + 15,
        message="the step did not run again elsewhere",
    )
    assert starts(r, ns, run.id, "hold")[1].startswith(survivor.hostname)
    r.set(release, "1")
    assert run.wait(timeout=30) == {"after": 2}


def test_cancel_still_stops_a_step_whose_pool_process_leads_its_own_group(
    client, worker_factory, env, queue, r
) -> None:
    w = worker_factory(queues=[queue], env=env, concurrency=1, name="cancel")
    name = deploy(client, HOLD_THEN_EFFECT.replace("QUEUE", queue))
    ns, release = key(), key()
    run = client.trigger(name, {"ns": ns, "release": release})
    wait_for(lambda: starts(r, ns, run.id, "hold"), timeout=20, message="hold never started")
    pid = int(r.get(f"{ns}:{run.id}:hold:runner"))
    assert os.getpgid(pid) == pid  # a group of its own: a group signal misses it
    assert os.getpgid(w.pid) == w.pid
    client.cancel(run.id)  # revoke(terminate=True): SIGTERM from the main process
    wait_for(lambda: not alive(pid), timeout=10, message="the cancelled step kept running")
    assert client.get(run.id).status == "cancelled"
    # The node replaced the process and goes on.
    again = client.trigger(
        deploy(client, WORK_THEN_EFFECT.replace("QUEUE", queue).replace("SECONDS", "0")),
        {"ns": key()},
    )
    assert again.wait(timeout=30) == {"after": 2}
    assert w.running


def spawning_step(client, r, queue: str, task: str) -> tuple[Any, str, int, int]:
    """Trigger a one-step flow whose ``task`` starts a subprocess and outlives its 1 s soft
    limit: the run, the task's key, and the pids of its pool process and its subprocess."""
    k = key()
    name = deploy(
        client,
        f"""
apiVersion: orchestrator/v1
kind: Flow
metadata: {{name: NAME}}
spec:
  defaults: {{queue: {queue}}}
  steps:
    - {{id: spawn, task: {task}, with: {{key: {k}}}, timeout: 1s}}
""",
    )
    run = client.trigger(name)
    pool, grandchild = map(
        int, wait_for(lambda: r.lindex(k, 0), timeout=20, message="spawn never ran").split()
    )
    return run, k, pool, grandchild


def test_the_hard_time_limit_kills_what_the_step_started(
    client, worker_factory, env, queue, r
) -> None:
    # sig.spawn starts `sleep 60` and outlasts its soft limit (1 s); the hard limit (2 s)
    # kills its pool process, and with it the pool process's group (billiard signals the
    # group of a pool process that leads one).
    worker_factory(queues=[queue], env=env, concurrency=1, name="limit")
    run, k, pool, grandchild = spawning_step(client, r, queue, "sig.spawn")
    try:
        wait_for(lambda: not alive(pool), timeout=15, message="the hard limit never struck")
        assert r.llen(f"{k}:soft") == 1  # it outlived its soft limit, as meant
        wait_for(
            lambda: not alive(grandchild),
            timeout=5,
            message="the step's subprocess outlived its time limit",
        )
        wait_for(
            lambda: client.get(run.id).status in ("failed", "succeeded"),
            timeout=20,
            message="the run did not end",
        )
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(grandchild).kill()


def test_kill_descendants_at_the_soft_limit_ends_the_steps_subprocesses_in_a_pool_process(
    client, worker_factory, env, queue, r
) -> None:
    # What the step runtime does when a step ends by its soft timeout, in a real pool
    # process: its subprocess goes, the pool process stays and serves the next step.
    worker_factory(queues=[queue], env=env, concurrency=1, name="soft")
    run, k, pool, grandchild = spawning_step(client, r, queue, "sig.spawn_and_clean")
    try:
        killed = wait_for(lambda: r.lrange(f"{k}:killed", 0, -1), timeout=15, message="no kill")
        assert killed == [str(grandchild)]
        wait_for(lambda: not alive(grandchild), timeout=5, message="the subprocess lived on")
        wait_for(lambda: client.get(run.id).status == "failed", timeout=20, message="no failed run")
        assert client.get(run.id).error["type"] == "Timeout"
        assert alive(pool)  # a soft timeout ends the step, not its pool process
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(grandchild).kill()
