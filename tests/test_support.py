"""Tests of the test infrastructure itself (tests/support.py)."""

from __future__ import annotations

import socket
import time

import pytest

from tests.support import RedisServer, wait_for


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As a server (redis-server itself) binds: connections in TIME_WAIT don't count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.fixture
def server():
    srv = RedisServer()
    try:
        yield srv
    finally:
        srv.cleanup()


def test_redis_server_private_port_set_get(server: RedisServer) -> None:
    server.start()
    assert server.port != 6379
    assert server.url == f"redis://127.0.0.1:{server.port}/0"
    r = server.client()
    assert r.connection_pool.connection_kwargs["port"] == server.port
    assert r.set("k", "v")
    assert r.get("k") == b"v"
    assert r.config_get("appendonly")["appendonly"] == "no"
    assert r.config_get("save")["save"] == ""
    r.close()


def test_redis_server_restart_with_appendonly_keeps_data(server: RedisServer) -> None:
    server.start(appendonly=True)
    port, pid = server.port, server.proc.pid
    r = server.client()
    r.set("durable", "yes")
    r.close()

    server.restart()

    assert server.port == port
    assert server.proc.pid != pid
    r = server.client()
    assert r.config_get("appendonly")["appendonly"] == "yes"
    assert r.get("durable") == b"yes"
    r.close()


def test_redis_server_stop_frees_port(server: RedisServer) -> None:
    server.start()
    port = server.port
    assert not _port_is_free(port)

    server.stop()

    assert not server.running
    assert _port_is_free(port)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_session_redis_server_is_private(redis_server: RedisServer) -> None:
    assert redis_server.running
    assert redis_server.port != 6379
    assert redis_server.client().ping()


def test_orch_env_isolates_module(orch_env: dict[str, str], redis_server: RedisServer) -> None:
    assert orch_env["ORCHESTRATOR_REDIS_URL"] == redis_server.url
    assert orch_env["ORCHESTRATOR_KEY_PREFIX"].startswith("t")
    assert orch_env["ORCHESTRATOR_KEY_PREFIX"].endswith(":")
    assert orch_env["ORCHESTRATOR_DEFAULT_QUEUE"].startswith("q")
    assert (
        orch_env["ORCHESTRATOR_TASK_MODULES"] == "workers.examples,tests.tasks,tests.control_tasks"
    )


def test_wait_for_returns_truthy_value() -> None:
    calls = []

    def pred():
        calls.append(1)
        return len(calls) >= 3 and "done"

    assert wait_for(pred, timeout=5, interval=0.001) == "done"
    assert len(calls) == 3


def test_wait_for_times_out_with_message() -> None:
    start = time.monotonic()
    with pytest.raises(AssertionError, match="the thing never happened"):
        wait_for(lambda: False, timeout=0.2, interval=0.01, message="the thing never happened")
    elapsed = time.monotonic() - start
    assert 0.2 <= elapsed < 5


def test_wait_for_lazy_message() -> None:
    with pytest.raises(AssertionError, match="state=42"):
        wait_for(lambda: None, timeout=0.05, interval=0.01, message=lambda: "state=42")
