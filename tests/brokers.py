"""Brokers other than a private redis-server, for the tests: RabbitMQ vhosts, Redis Sentinel.

* :class:`RabbitVhosts` -- vhosts of their own on the machine's RabbitMQ (made and deleted
  with ``rabbitmqctl``), so each test module's queues and exchanges are its own.
* :class:`SentinelServer` -- a real ``redis-server --sentinel`` process on a free port
  watching a :class:`tests.support.RedisServer` master.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis

from tests.support import REDIS_SERVER_BIN, free_port, wait_for

#: The RabbitMQ the amqp test run uses (no vhost): ``$ORCHESTRATOR_TEST_AMQP_URL``.
AMQP_URL = os.environ.get("ORCHESTRATOR_TEST_AMQP_URL") or "amqp://guest:guest@127.0.0.1:5672"
RABBITMQCTL = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"


def rabbitmq_missing() -> str | None:
    """Why the amqp test run cannot go on here (no rabbitmqctl, nothing listening), or None."""
    if not os.access(RABBITMQCTL, os.X_OK):
        return f"rabbitmqctl not found ({RABBITMQCTL})"
    parts = urlsplit(AMQP_URL)
    host, port = parts.hostname or "127.0.0.1", parts.port or 5672
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError as exc:
        return f"no RabbitMQ listening on {host}:{port} ({exc})"
    return None


class RabbitVhosts:
    """Vhosts made for this test session; :meth:`cleanup` deletes them all."""

    def __init__(self, user: str | None = None) -> None:
        self.user = user or urlsplit(AMQP_URL).username or "guest"
        self.made: list[str] = []

    def _ctl(self, *args: str) -> None:
        proc = subprocess.run(
            [RABBITMQCTL, "-q", *args], capture_output=True, text=True, timeout=60, check=False
        )
        if proc.returncode != 0:
            raise AssertionError(
                f"rabbitmqctl {' '.join(args)} failed ({proc.returncode}): "
                f"{(proc.stderr or proc.stdout).strip()}"
            )

    def create(self, prefix: str = "orch-test") -> str:
        """A new vhost that :attr:`user` may use in full; returns the broker URL for it."""
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self._ctl("add_vhost", name)
        self.made.append(name)
        self._ctl("set_permissions", "-p", name, self.user, ".*", ".*", ".*")
        return f"{AMQP_URL.rstrip('/')}/{name}"

    def cleanup(self) -> None:
        """Delete every vhost made here (in parallel: each rabbitmqctl takes about a second)."""
        procs = [
            subprocess.Popen(
                [RABBITMQCTL, "-q", "delete_vhost", name],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for name in self.made
        ]
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=60)
        self.made.clear()


class SentinelServer:
    """A ``redis-server --sentinel`` on a free port, monitoring ``master`` at ``host:port``.

    ``down_after_ms`` and ``failover_timeout_ms`` are short, so a test's failover takes
    seconds. :meth:`stop` ends it and removes its directory.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        master_port: int,
        master: str = "mymaster",
        *,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
    ) -> None:
        self.master, self.master_port = master, master_port
        self.down_after_ms, self.failover_timeout_ms = down_after_ms, failover_timeout_ms
        self.dir = Path(tempfile.mkdtemp(prefix="orch-sentinel-"))
        self.port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "sentinel.log"

    @property
    def url(self) -> str:
        """The sentinel URL (kombu's form) with database 0."""
        return f"sentinel://{self.host}:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port, socket_timeout=5, decode_responses=True)

    def start(self) -> SentinelServer:
        """Start it and wait (at most 10 s) until it knows the master."""
        self.port = free_port()
        conf = self.dir / "sentinel.conf"  # the sentinel rewrites it: it must be writable
        conf.write_text(
            f"port {self.port}\n"
            f"bind {self.host}\n"
            f"dir {self.dir}\n"
            f"sentinel monitor {self.master} {self.host} {self.master_port} 1\n"
            f"sentinel down-after-milliseconds {self.master} {self.down_after_ms}\n"
            f"sentinel failover-timeout {self.master} {self.failover_timeout_ms}\n"
            f"sentinel parallel-syncs {self.master} 1\n"
        )
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [REDIS_SERVER_BIN, str(conf), "--sentinel"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for(
                lambda: self.master_address() == (self.host, self.master_port),
                timeout=10,
                interval=0.05,
                message=lambda: f"sentinel on port {self.port} not ready:\n{self.log_tail()}",
            )
        except BaseException:
            self.stop()
            raise
        return self

    def master_address(self) -> tuple[str, int] | None:
        """Where this sentinel says the master is, or None when it does not answer."""
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"sentinel exited with {self.proc.returncode}:\n{self.log_tail()}")
        client = self.client()
        try:
            addr = client.sentinel_get_master_addr_by_name(self.master)
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            return None
        finally:
            client.close()
        return (addr[0], int(addr[1])) if addr else None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        shutil.rmtree(self.dir, ignore_errors=True)


def queue_depth(app: Any, queue: str) -> int:
    """Messages waiting in ``queue`` (not taken by a worker), asked of whichever broker
    ``app`` uses; 0 for a queue never declared."""
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        try:
            return channel.queue_declare(queue=queue, passive=True).message_count
        except conn.channel_errors:
            return 0
