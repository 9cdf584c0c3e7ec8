"""The processes of docker-compose.yml, run as plain processes (no Docker here).

Each ``orchestrator ...`` service (every worker pool, beat, api, flower) starts with its
compose ``command`` and ``environment``, interpolated the way compose would, with only
what a single host needs changed: the Redis URL (this session's private redis-server
instead of the ``redis`` service), the key prefixes (this module's own), one liveness
file per process, and loopback addresses and free ports instead of 0.0.0.0:8000/5555.
A flow then runs through them: triggered through the API with a bearer token, a
durable sleep woken by beat's tick, steps on both pools' workers.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from tests.commands import CommandProcess, http_ok
from tests.support import REPO_ROOT, free_port

pytestmark = pytest.mark.integration

COMPOSE = REPO_ROOT / "docker-compose.yml"

FLOW = """\
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: compose-check}
spec:
  inputs:
    message: {type: string, required: true}
  steps:
    - {id: nap, sleep: 1s}
    - {id: shout, task: text.upper, queue: io, with: {message: "${inputs.message}"}}
    - {id: turn, task: text.reverse, with: {message: "${steps.shout.output}"}}
  outputs:
    message: "${steps.turn.output}"
"""


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}``."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if env.get(name):
            return env[name]
        if op == ":-":
            return arg
        if op == ":?":
            raise AssertionError(f"compose would refuse to start: {arg}")
        return ""

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, value)


def _replace_option(argv: list[str], option: str, value: str) -> list[str]:
    argv = list(argv)
    argv[argv.index(option) + 1] = value
    return argv


def _request(url: str, *, data: dict | None = None, headers: dict | None = None):
    request = urllib.request.Request(
        url,
        data=json.dumps(data).encode() if data is not None else None,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_compose_services_run_a_flow_as_plain_processes(
    orch_env: dict[str, str], tmp_path: Path
) -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    token = uuid.uuid4().hex
    flower_auth = f"admin:{uuid.uuid4().hex}"
    secrets = {"ORCHESTRATOR_API_TOKENS": token, "ORCHESTRATOR_FLOWER_BASIC_AUTH": flower_auth}
    prefix = orch_env["ORCHESTRATOR_KEY_PREFIX"]
    api_port, flower_port = free_port(), free_port()
    procs: dict[str, CommandProcess] = {}
    try:
        for name, service in services.items():
            argv = service["command"]
            if argv[0] != "orchestrator":
                continue  # redis: the session's redis-server stands in for it
            env = {k: _interpolate(str(v), secrets) for k, v in service["environment"].items()}
            assert env.pop("ORCHESTRATOR_REDIS_URL") == "redis://redis:6379/0"
            env.update(
                ORCHESTRATOR_REDIS_URL=orch_env["ORCHESTRATOR_REDIS_URL"],
                ORCHESTRATOR_KEY_PREFIX=prefix,
                ORCHESTRATOR_CELERY_KEY_PREFIX=f"{prefix}celery:",
            )
            ready = None
            if "ORCHESTRATOR_LIVENESS_FILE" in env:
                alive = tmp_path / f"{name}.alive"
                env["ORCHESTRATOR_LIVENESS_FILE"] = str(alive)
                ready = alive.exists
            if argv[1] == "api":
                argv = _replace_option(
                    _replace_option(argv, "--host", "127.0.0.1"), "--port", str(api_port)
                )
                ready = http_ok(f"http://127.0.0.1:{api_port}/healthz")
            if argv[1] == "flower":
                argv = _replace_option(argv, "--address", "127.0.0.1")
                argv = _replace_option(argv, "--port", str(flower_port))
                ready = http_ok(f"http://127.0.0.1:{flower_port}/healthcheck")
            assert ready is not None, f"{name}: no way to tell it is ready"
            proc = CommandProcess(
                [sys.executable, "-m", *argv],
                ready=ready,
                env=env,
                name=name,
                log_dir=tmp_path / "logs",
                cwd=REPO_ROOT,
                pythonpath=[REPO_ROOT],
            )
            procs[name] = proc
        assert set(procs) == {"worker-default", "worker-io", "beat", "api", "flower"}
        for proc in procs.values():  # all at once, as compose starts them
            proc.spawn()
        for proc in procs.values():
            proc.wait_ready(timeout=60)

        # The compose health checks of workers and beat, run as the processes they are.
        checks = {}
        for name in ("worker-default", "worker-io", "beat"):
            test = services[name]["healthcheck"]["test"]
            assert test[0] == "CMD"
            checks[name] = subprocess.Popen(
                [sys.executable, "-m", *test[1:]],
                cwd=REPO_ROOT,
                env=procs[name].env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        for name, check in checks.items():
            out, _ = check.communicate(timeout=60)
            assert check.returncode == 0, f"{name}: {out}"

        api = f"http://127.0.0.1:{api_port}"
        from orchestrator.client import Client
        from orchestrator.settings import Settings

        client = Client(
            Settings(
                redis_url=orch_env["ORCHESTRATOR_REDIS_URL"],
                key_prefix=prefix,
                celery_key_prefix=f"{prefix}celery:",
            )
        )
        try:
            client.deploy(FLOW)
            status, _ = _request(
                f"{api}/v1/flows/compose-check/runs", data={"inputs": {"message": "x"}}
            )
            assert status == 401  # the compose API wants its token
            status, body = _request(
                f"{api}/v1/flows/compose-check/runs",
                data={"inputs": {"message": "plain processes"}},
                headers={"Authorization": f"Bearer {token}"},
            )
            assert status == 201, body
            run_id = json.loads(body)["id"]
            assert client.wait(run_id, timeout=60) == {"message": "SESSECORP NIALP"}
            steps = client.get(run_id).steps
            assert steps["shout"].worker.startswith("io@")
            assert steps["turn"].worker.startswith("default@")
            assert steps["nap"].status == "succeeded"  # woken by beat's tick
        finally:
            client.close()

        auth = base64.b64encode(flower_auth.encode()).decode()
        flower = f"http://127.0.0.1:{flower_port}/workers"
        assert _request(flower)[0] == 401
        assert _request(flower, headers={"Authorization": f"Basic {auth}"})[0] == 200
    except AssertionError as exc:
        logs = "\n".join(f"--- {n} log tail:\n{p.log_tail(30)}" for n, p in procs.items())
        raise AssertionError(f"{exc}\n{logs}") from exc
    finally:
        for proc in procs.values():  # SIGTERM to all at once, then wait for each
            if proc.running:
                proc.proc.terminate()
        for proc in procs.values():
            proc.stop()
