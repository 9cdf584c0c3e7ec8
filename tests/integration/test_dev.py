"""``orchestrator dev`` as a user runs it: one command brings up Redis, a worker per pool,
beat, the API and Flower; a flow runs on it; Ctrl-C leaves no process behind.

The command starts its own private redis-server (nothing of ``ORCHESTRATOR_*`` is
passed in), on a free port chosen here.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support import REPO_ROOT, free_port, wait_for

pytestmark = pytest.mark.integration


def _descendants(pid: int) -> dict[int, str]:
    """Every live process below ``pid`` (children, grandchildren, ...), with its command."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: dict[int, str] = {}
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = _cmdline(child)
            todo.append(child)
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _status(url: str, auth: str | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return 0


class Dev:
    """``python -m orchestrator dev ...`` in the background, output in two files."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.out = tmp_path / "dev.out"
        self.err = tmp_path / "dev.err"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "orchestrator", "dev", *args],
                cwd=REPO_ROOT,
                env=env,
                stdout=out,
                stderr=err,
            )

    def output(self) -> str:
        return self.out.read_text() + self.err.read_text()

    def wait_up(self) -> None:
        def up() -> bool:
            assert self.proc.poll() is None, f"dev exited {self.proc.returncode}:\n{self.output()}"
            return "the stack is up" in self.out.read_text()

        wait_for(up, timeout=120, interval=0.2, message=self.output)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture
def dev_runner(tmp_path: Path):
    """Start ``orchestrator dev`` with arguments; whatever is left is killed at the end."""
    made: list[Dev] = []

    def start(*args: str) -> Dev:
        made.append(Dev(tmp_path, *args))
        return made[-1]

    yield start
    for dev in made:  # a failed test still leaves nothing running
        below = _descendants(dev.proc.pid)
        dev.stop()
        for pid in below:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_dev_runs_a_flow_and_ctrl_c_stops_every_process(dev_runner, tmp_path: Path) -> None:
    from orchestrator.client import Client
    from orchestrator.settings import Settings

    redis_port, api_port, flower_port = free_port(), free_port(), free_port()
    data = tmp_path / "data"
    dev = dev_runner(
        "--redis-port", str(redis_port), "--api-port", str(api_port),
        "--flower-port", str(flower_port), "--data-dir", str(data),
    )  # fmt: skip
    dev.wait_up()
    out = dev.out.read_text()
    api = f"http://127.0.0.1:{api_port}"
    assert f"{api}/ui" in out and f"http://127.0.0.1:{flower_port}" in out
    assert _status(f"{api}/healthz") == 200
    assert _status(f"{api}/v1/flows") == 200  # loopback dev mode: no token

    # Flower asks for the generated credentials, which are printed once and logged nowhere.
    password = re.search(r"user admin, password (\S+)", out).group(1)
    flower = f"http://127.0.0.1:{flower_port}"
    assert _status(f"{flower}/workers") == 401
    assert _status(f"{flower}/workers", auth=f"admin:{password}") == 200
    assert dev.output().count(password) == 1
    for log in (data / "logs").iterdir():
        assert password not in log.read_text(errors="replace"), log

    url = f"redis://127.0.0.1:{redis_port}/0"
    client = Client(Settings(redis_url=url, broker_url=url, result_backend=url))
    try:
        client.deploy(REPO_ROOT / "flows" / "text.yaml")
        run = client.trigger("text", {"message": "hello dev stack"})
        assert run.wait(timeout=60) == {"message": "KCATS VED OLLEH", "spaces": 2}
        workers = {s.worker.split("@")[0] for s in client.get(run.id).steps.values()}
        assert workers == {"default"}  # the default pool's worker, named after its pool
    finally:
        client.close()

    below = _descendants(dev.proc.pid)
    commands = " | ".join(below.values())
    for part in ("redis-server", "worker --pool default", "worker --pool io", " beat",
                 " api --dev", "flower"):  # fmt: skip
        assert part in commands, commands
    assert (data / "redis" / "appendonlydir").is_dir()  # append-only file on

    dev.proc.send_signal(signal.SIGINT)
    assert dev.proc.wait(timeout=90) == 0, dev.output()
    wait_for(
        lambda: not [pid for pid in below if _alive(pid)],
        timeout=10,
        message=lambda: f"left running: {[below[p] for p in below if _alive(p)]}",
    )
    assert "stopped" in dev.out.read_text()
    assert "Warm shutdown" in (data / "logs" / "worker-default.log").read_text()


def test_dev_reports_a_process_that_dies_and_stops_the_rest(dev_runner, tmp_path: Path) -> None:
    pools = tmp_path / "pools.yaml"
    pools.write_text("pools:\n  solo: {queues: [default], concurrency: 1, pool: solo}\n")
    dev = dev_runner(
        "--redis-port", str(free_port()), "--api-port", str(free_port()), "--no-flower",
        "--pools-file", str(pools), "--data-dir", str(tmp_path / "data"),
    )  # fmt: skip
    dev.wait_up()
    below = _descendants(dev.proc.pid)
    beat = [pid for pid, cmd in below.items() if "orchestrator beat" in cmd]
    assert len(beat) == 1, below
    os.kill(beat[0], signal.SIGKILL)
    assert dev.proc.wait(timeout=60) == 1, dev.output()
    err = dev.err.read_text()
    assert f"beat (pid {beat[0]}) exited on its own with code -9" in err
    wait_for(
        lambda: not [pid for pid in below if _alive(pid)],
        timeout=10,
        message=lambda: f"left running: {[below[p] for p in below if _alive(p)]}",
    )


def test_dev_refuses_a_busy_port(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
        proc = subprocess.run(
            [sys.executable, "-m", "orchestrator", "dev", "--api-port", str(port),
             "--data-dir", str(tmp_path / "data")],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"port {port} is in use" in proc.stderr and "--api-port" in proc.stderr
