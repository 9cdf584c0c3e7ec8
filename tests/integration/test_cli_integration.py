"""The ``orchestrator`` command as a user runs it: a subprocess against a real Redis and
real Celery workers (the ``worker`` fixture), configured only through ORCHESTRATOR_*.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.support import REPO_ROOT, wait_for

pytestmark = pytest.mark.integration

FLOWS = REPO_ROOT / "flows"

FAILING = """\
apiVersion: orchestrator/v1
kind: Flow
metadata:
  name: cli-always-fails
spec:
  steps:
    - id: extract
      task: etl.extract
      with: {pages: 1, page_size: 1, flaky_failures: 9}
      retry: {maxAttempts: 1}
"""


class Cli:
    """Runs ``python -m orchestrator ...`` with the module's ORCHESTRATOR_* settings."""

    def __init__(self, orch_env: dict[str, str]):
        self.env = {**os.environ, **orch_env, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}

    def __call__(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "orchestrator", *args],
            cwd=REPO_ROOT,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def ok(self, *args: str, **kwargs) -> str:
        proc = self(*args, **kwargs)
        assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}"
        return proc.stdout


@pytest.fixture(scope="module")
def cli(orch_env: dict[str, str], worker) -> Cli:
    runner = Cli(orch_env)
    out = runner.ok("deploy", str(FLOWS))
    for name in ("text", "etl"):
        assert f"{name}  version " in out
    return runner


def test_deploy_says_new_then_unchanged(orch_env: dict[str, str], worker) -> None:
    # A key prefix of its own: "new" depends on this being the first deploy there.
    runner = Cli({**orch_env, "ORCHESTRATOR_KEY_PREFIX": f"t{uuid.uuid4().hex[:8]}:"})
    first = json.loads(runner.ok("deploy", "--json", str(FLOWS / "text.yaml")))
    assert [(d["name"], d["change"]) for d in first] == [("text", "new")]
    again = runner.ok("deploy", str(FLOWS / "text.yaml"))
    assert again.strip() == f"text  version {first[0]['version']}  unchanged"


def test_run_wait_shows_steps_and_outputs(cli: Cli) -> None:
    proc = cli("run", "text", "--input", "message=hello big world", "--wait", "--timeout", "30")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for step in ("upper", "fan", "reverse", "spaces"):
        assert step in out
    assert "succeeded" in out
    outputs = json.loads(out.split("outputs:\n", 1)[1])
    assert outputs == {"message": "DLROW GIB OLLEH", "spaces": 2}
    assert proc.stderr == ""


def test_run_inputs_are_typed_from_json(cli: Cli) -> None:
    proc = cli("run", "etl", "-i", "pages=2", "-i", "page_size=7", "--wait", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = json.loads(proc.stdout)
    assert run["status"] == "succeeded"
    assert run["inputs"]["pages"] == 2 and run["inputs"]["page_size"] == 7
    assert run["outputs"]["extract_attempts"] == 3
    assert run["steps"]["extract"]["attempts"] == 3


def test_run_with_bad_inputs_names_the_field(cli: Cli) -> None:
    proc = cli("run", "text")
    assert proc.returncode == 1
    assert "'message'" in proc.stderr and "required" in proc.stderr
    proc = cli("run", "text", "--input", "message=hi", "--input", "colour=red")
    assert proc.returncode == 1
    assert "'colour'" in proc.stderr
    proc = cli("run", "etl", "--input", "pages=many")
    assert proc.returncode == 1
    assert "'pages'" in proc.stderr and "integer" in proc.stderr
    assert proc.stdout == ""


def test_run_unknown_flow(cli: Cli) -> None:
    proc = cli("run", "no-such-flow")
    assert proc.returncode == 1
    assert "no-such-flow" in proc.stderr and "not deployed" in proc.stderr


def test_failed_run_exits_1_with_its_error(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "fails.yaml"
    path.write_text(FAILING)
    cli.ok("deploy", str(path))
    proc = cli("run", "cli-always-fails", "--wait", "--timeout", "30")
    assert proc.returncode == 1
    assert "failed" in proc.stdout  # the step table
    assert "ended failed" in proc.stderr and "source timed out" in proc.stderr


def test_run_then_inspect_it(cli: Cli) -> None:
    started = json.loads(
        cli.ok("run", "text", "--input", "message=a b", "--idempotency-key", "k1", "--json")
    )
    run_id = started["id"]
    assert started["flow"] == "text"
    # Same key, same run.
    assert cli.ok("run", "text", "--input", "message=a b", "--idempotency-key", "k1").strip() == (
        run_id
    )

    # --follow returns by itself once the run has ended; its last event says how.
    logs = cli.ok("runs", "logs", run_id, "--follow", timeout=60).strip().splitlines()
    assert "run.created" in logs[0]
    assert logs[-1].split()[1] == "run.succeeded"
    started_lines = [line for line in logs if " step.started " in line]
    assert {line.split()[2] for line in started_lines} >= {"upper", "reverse", "spaces"}
    assert all("worker=" in line for line in started_lines)
    events = [json.loads(line) for line in cli.ok("runs", "logs", run_id, "--json").splitlines()]
    assert [e["type"] for e in events] == [line.split()[1] for line in logs]

    shown = cli.ok("runs", "show", run_id)
    assert run_id in shown and "succeeded" in shown
    for step in ("upper", "reverse", "spaces"):
        assert step in shown
    as_json = json.loads(cli.ok("runs", "show", run_id, "--json"))
    assert as_json["outputs"] == {"message": "B A", "spaces": 1}
    assert as_json["steps"]["upper"]["status"] == "succeeded"

    listed = cli.ok("runs", "ls", "--flow", "text", "--status", "succeeded", "--limit", "50")
    assert run_id in listed
    listed = json.loads(cli.ok("runs", "ls", "--flow", "etl", "--json"))
    assert run_id not in {r["id"] for r in listed}

    graph = cli.ok("graph", "--run", run_id)
    assert "class s_upper succeeded" in graph


def test_runs_of_unknown_id(cli: Cli) -> None:
    for args in (["runs", "show", "nope"], ["runs", "logs", "nope"]):
        proc = cli(*args)
        assert proc.returncode == 1
        assert "'nope'" in proc.stderr


def test_flows_ls_view_status(cli: Cli) -> None:
    listed = cli.ok("flows", "ls")
    assert "text" in listed and "etl" in listed and "started" in listed
    flows = {f["name"]: f for f in json.loads(cli.ok("flows", "ls", "--json"))}
    version = flows["text"]["version"]

    view = cli.ok("flows", "view", "text")
    assert view.startswith(f"# flow text: version {version}, started\n")
    assert "kind: Flow" in view and "name: text" in view and "task: text.upper" in view

    cli.ok("run", "text", "--input", "message=x", "--wait")
    status = json.loads(cli.ok("flows", "status", "text", "--json"))
    assert status["state"] == "started" and status["version"] == version
    assert status["runs"].get("succeeded", 0) >= 1
    assert "succeeded" in cli.ok("flows", "status", "text")


def test_flows_stop_refuses_runs_until_started(cli: Cli) -> None:
    assert cli.ok("flows", "stop", "etl").strip() == "flow etl stopped"
    try:
        proc = cli("run", "etl")
        assert proc.returncode == 1
        assert "stopped" in proc.stderr and "flows start etl" in proc.stderr
        assert "stopped" in cli.ok("flows", "ls")
    finally:
        assert cli.ok("flows", "start", "etl").strip() == "flow etl started"
    proc = cli("run", "etl", "--wait", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "succeeded"


def test_flows_of_unknown_name(cli: Cli) -> None:
    for args in (["flows", "view", "nope"], ["flows", "stop", "nope"], ["compile", "nope"]):
        proc = cli(*args)
        assert proc.returncode == 1, args
        assert "'nope' is not deployed" in proc.stderr


def test_compile_and_graph_of_a_deployed_flow(cli: Cli) -> None:
    out = cli.ok("compile", "text")
    assert "chord(" in out and "# flow text version " in out
    assert "local" not in out.splitlines()[0]
    assert "digraph" in cli.ok("graph", "etl", "--format", "dot")


def test_worker_command_runs_steps_of_its_pool(
    orch_env: dict[str, str], cli: Cli, tmp_path: Path
) -> None:
    queue = f"{orch_env['ORCHESTRATOR_DEFAULT_QUEUE']}-pool"
    pools = tmp_path / "pools.yaml"
    pools.write_text(f"pools:\n  mine: {{queues: [{queue}], concurrency: 1, pool: threads}}\n")
    name = f"cli-{uuid.uuid4().hex[:6]}"
    log = tmp_path / "worker.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "worker", "--pool", "mine",
             "--pools-file", str(pools), "-l", "INFO", "-n", f"{name}@%h",
             "--without-gossip", "--without-mingle", "--without-heartbeat"],
            cwd=REPO_ROOT, env=cli.env, stdout=fh, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        wait_for(
            lambda: " ready." in log.read_text() or proc.poll() is not None,
            timeout=30,
            message=lambda: log.read_text(),
        )
        assert proc.poll() is None, log.read_text()
        text = log.read_text()
        assert "concurrency: 1 (thread)" in text
        assert queue in text
        # Steps go to the queue of the triggering side's settings.
        done = json.loads(
            cli.ok(
                "run", "text", "--input", "message=via pool", "--wait", "--json",
                env={"ORCHESTRATOR_DEFAULT_QUEUE": queue},
            )
        )  # fmt: skip
        assert {s["worker"].split("@")[0] for s in done["steps"].values()} == {name}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def test_demo_on_a_shared_redis_leaves_nothing_behind(
    orch_env: dict[str, str], redis_server
) -> None:
    r = redis_server.client()
    try:
        sentinel = f"{orch_env['ORCHESTRATOR_KEY_PREFIX']}sentinel"
        r.set(sentinel, "mine")
        before = {k for k in r.scan_iter(count=1000) if not k.startswith(b"demo-")}
        proc = subprocess.run(
            [sys.executable, "-m", "orchestrator", "demo"],
            cwd=REPO_ROOT,
            env={**os.environ, "ORCHESTRATOR_REDIS_URL": redis_server.url},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"{redis_server.url} (shared)" in proc.stdout
        for name in ("text", "etl", "customer-sync", "trip-booking"):
            assert f"\n{name}  run " in proc.stdout
        assert "All example runs ended as expected." in proc.stdout
        assert not list(r.scan_iter(match="demo-*", count=1000))
        assert r.get(sentinel) == b"mine"
        after = {k for k in r.scan_iter(count=1000)}
        assert before <= after
    finally:
        r.close()
