"""Worker pools (SPEC §8): ``orchestrator worker --pool io`` with the real
``workers/pools.yaml`` consumes only the io queue, on threads; steps route by ``queue``;
a second worker process on the same pool shares the load.

The pools' queue names (``default``, ``io``) are the real ones; Celery's keys are put
under this module's own prefix (``ORCHESTRATOR_CELERY_KEY_PREFIX``) so no other test
module sees these queues.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Iterator

import pytest

from tests.commands import CommandProcess
from tests.support import REPO_ROOT, wait_for

pytestmark = pytest.mark.integration

POOLS = REPO_ROOT / "workers" / "pools.yaml"

ROUTED = """\
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: pool-routing}
spec:
  steps:
    - {id: fetch, task: tests.context, queue: io}
    - {id: after, task: tests.context}
"""

SHARED = """\
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: pool-sharing}
spec:
  inputs:
    items: {type: array, required: true}
    gate: {type: string, required: true}
  defaults: {queue: io}  # the forEach step itself too
  steps:
    - id: each
      forEach: "${inputs.items}"
      do:
        - {id: hold, task: tests.gate, with: {key: "${inputs.gate}", value: "${item}"}}
  outputs:
    held: "${steps.each.output}"
"""


@pytest.fixture(scope="module")
def pool_env(orch_env: dict[str, str]) -> dict[str, str]:
    return {
        **orch_env,
        "ORCHESTRATOR_CELERY_KEY_PREFIX": f"{orch_env['ORCHESTRATOR_KEY_PREFIX']}celery:",
        "ORCHESTRATOR_DEFAULT_QUEUE": "default",
    }


@pytest.fixture(scope="module")
def pool_client(pool_env: dict[str, str]):
    from orchestrator.client import Client
    from orchestrator.settings import Settings

    client = Client(
        Settings(**{k.removeprefix("ORCHESTRATOR_").lower(): v for k, v in pool_env.items()})
    )
    client.deploy(ROUTED)
    client.deploy(SHARED)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def pool_worker(
    pool_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[str], CommandProcess]]:
    """Start ``orchestrator worker --pool NAME`` processes (node ``NAME-<tag>@host``)."""
    made: list[CommandProcess] = []

    def start(pool: str) -> CommandProcess:
        node = f"{pool}-{uuid.uuid4().hex[:6]}"
        w = CommandProcess(
            [sys.executable, "-m", "orchestrator", "worker", "--pool", pool,
             "--pools-file", str(POOLS), "-n", f"{node}@%h", "-l", "INFO"],
            env=pool_env,
            name=node,
            log_dir=tmp_path_factory.mktemp("pool-logs", numbered=True),
            cwd=REPO_ROOT,
            pythonpath=[REPO_ROOT],
        )  # fmt: skip
        w.node = node
        made.append(w)
        w.start()
        return w

    try:
        yield start
    finally:
        for w in made:  # SIGTERM to all at once, then wait for each
            if w.running:
                w.proc.terminate()
        for w in made:
            w.stop()


def _node(worker: str | None) -> str:
    return (worker or "").split("@")[0]


def test_io_pool_runs_only_io_steps_with_threads(pool_worker, pool_client, redis_server) -> None:
    io = pool_worker("io")
    log = io.log_text()
    assert "concurrency: 8 (thread)" in log
    assert ".> io " in log and ".> default " not in log

    run = pool_client.trigger("pool-routing", {})

    def fetch_done():
        state = pool_client.get(run.id)
        fetch = state.steps.get("fetch")
        return fetch is not None and fetch.status == "succeeded" and state

    state = wait_for(fetch_done, timeout=30, message=io.log_tail)
    assert _node(state.steps["fetch"].worker) == io.node
    assert state.steps["fetch"].output["worker"].startswith(f"{io.node}@")
    # The next step waits in the default queue: the io worker does not take it.
    prefix = pool_client.settings.celery_key_prefix
    r = redis_server.client()
    try:
        wait_for(lambda: r.llen(f"{prefix}default") == 1, timeout=10)
    finally:
        r.close()
    waiting = pool_client.get(run.id)
    assert waiting.status == "running"
    assert "after" not in waiting.steps or waiting.steps["after"].status == "pending"

    # (`orchestrator worker --pool default`, prefork, runs in test_compose_commands.py.)
    pool_client.cancel(run.id)


def test_a_second_io_worker_shares_a_foreach(pool_worker, pool_client, redis_server) -> None:
    first, second = pool_worker("io"), pool_worker("io")
    gate = f"{pool_client.settings.key_prefix}gate-{uuid.uuid4().hex[:6]}"
    items = list(range(10))
    run = pool_client.trigger("pool-sharing", {"items": items, "gate": gate})

    # Ten items, each held at a gate; one io worker holds at most 8 (its concurrency,
    # prefetch 1), so both must be running some before any gate opens.
    def all_running():
        steps = pool_client.get(run.id).steps
        held = [steps.get(f"hold[{i}]") for i in items]
        return all(s is not None and s.status == "running" for s in held) and held

    held = wait_for(
        all_running,
        timeout=30,
        message=lambda: f"{first.log_tail(20)}\n---\n{second.log_tail(20)}",
    )
    nodes = {_node(s.worker) for s in held}
    assert nodes == {first.node, second.node}
    r = redis_server.client()
    try:
        r.rpush(gate, *["open"] * len(items))
    finally:
        r.close()
    assert run.wait(timeout=30) == {"held": items}
