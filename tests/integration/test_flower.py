"""``orchestrator flower``: Flower behind basic auth, showing each step as ``flow.step``."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from orchestrator.cli import cli
from tests.support import REPO_ROOT, flower_process, free_port, wait_for

pytestmark = pytest.mark.integration

ADMIN = ("admin", "pw-admin-1")
OPS = ("ops", "pw-ops-2")
USERS = f"{ADMIN[0]}:{ADMIN[1]},{OPS[0]}:{OPS[1]}"


def _env(orch_env: dict[str, str], **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCHESTRATOR_", "FLOWER_"))}
    return {**env, **orch_env, **extra}


@pytest.fixture(scope="module")
def flower(orch_env, worker, tmp_path_factory):
    """``orchestrator flower`` on a free port; yields its base URL, pid and log file."""
    log = tmp_path_factory.mktemp("flower") / "flower.log"
    env = _env(orch_env, ORCHESTRATOR_FLOWER_BASIC_AUTH=USERS)
    with flower_process(env, log) as (base, pid):
        yield base, pid, log


def test_flower_needs_basic_auth(flower):
    base, pid, log = flower
    assert httpx.get(f"{base}/api/tasks", timeout=5).status_code == 401
    assert httpx.get(f"{base}/api/tasks", auth=(ADMIN[0], "wrong"), timeout=5).status_code == 401
    assert httpx.get(f"{base}/", timeout=5).status_code == 401
    for user in (ADMIN, OPS):
        assert httpx.get(f"{base}/api/tasks", auth=user, timeout=5).status_code == 200
    assert httpx.get(f"{base}/", auth=ADMIN, timeout=5).status_code == 200
    # The passwords are on no command line and in no log.
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    assert "flower" in cmdline
    for secret in (ADMIN[1], OPS[1]):
        assert secret not in cmdline and secret not in log.read_text()


def test_steps_show_as_flow_step_with_the_run_id(flower, client):
    """Workers send task events (app.py), so the first run's steps are in Flower."""
    base, _, _ = flower
    client.deploy(REPO_ROOT / "flows" / "text.yaml")
    run = client.trigger("text", {"message": "a b"})
    run.wait(timeout=30)

    def tasks() -> dict[str, dict]:
        return httpx.get(f"{base}/api/tasks", auth=ADMIN, timeout=5).json()

    def of_run() -> dict[str, dict]:
        found = {}
        for task in tasks().values():
            args = ast.literal_eval(task.get("args") or "[]")
            if args and args[0] == run.id and task.get("state") == "SUCCESS":
                found[task["name"]] = task
        return found if {"text.upper", "text.reverse", "text.spaces"} <= set(found) else {}

    found = wait_for(of_run, timeout=15, message=lambda: f"Flower lists: {tasks()}")
    run_id, flow, _version, step = ast.literal_eval(found["text.upper"]["args"])[:4]
    assert (run_id, flow, step) == (run.id, "text", "upper")


def test_flower_refuses_to_start_without_credentials(orch_env):
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator", "flower", "--port", str(free_port())],
        cwd=REPO_ROOT,
        env=_env(orch_env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "ORCHESTRATOR_FLOWER_BASIC_AUTH" in out.stderr and "authentication" in out.stderr


@pytest.mark.parametrize(
    ("value", "args", "expected"),
    [
        ("admin:s3cret-x,broken", [], "entry 2 of 2 must be user:password"),
        ("admin:", [], "entry 1 of 1 must be user:password"),
        (":s3cret-x", [], "entry 1 of 1 must be user:password"),
        ("admin:s3cret-x", ["--basic-auth=admin:s3cret-x"], "set ORCHESTRATOR_FLOWER_BASIC_AUTH"),
        (
            "admin:s3cret-x",
            ["--basic_auth", "admin:s3cret-x"],
            "set ORCHESTRATOR_FLOWER_BASIC_AUTH",
        ),
    ],
)
def test_malformed_credentials_are_refused_without_showing_them(orch_env, value, args, expected):
    result = CliRunner().invoke(
        cli, ["flower", *args], env={**orch_env, "ORCHESTRATOR_FLOWER_BASIC_AUTH": value}
    )
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert "s3cret-x" not in result.output
