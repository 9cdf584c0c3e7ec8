"""Redis Sentinel: state store, broker and result backend all behind one ``sentinel://`` URL.

The module starts a private master, a replica of it and a real sentinel process
(``redis-server --sentinel``) watching them (the replica first, so the sentinel knows it from
its first look at the master). A worker and a client get only the sentinel URL, run the
example ``text`` flow (a parallel step compiled to a native chord: the result backend is
behind the sentinel too); then the master dies, the sentinel promotes the replica, and a
second run completes on the new master, with the first run's state still there.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from orchestrator.client import Client
from orchestrator.settings import Settings
from tests.brokers import SentinelServer
from tests.support import RedisServer, wait_for

REPO = Path(__file__).resolve().parents[2]
MASTER = "orchmaster"  # not the default, so the setting is what finds it


def _info(server: RedisServer) -> dict:
    client = server.client()
    try:
        return client.info("replication")
    finally:
        client.close()


def _in_sync(master: RedisServer) -> bool:
    """Whether the master has a replica online that has every write so far."""
    info = _info(master)
    replica = info.get("slave0")
    return bool(
        replica
        and replica.get("state") == "online"
        and replica.get("offset") == info.get("master_repl_offset")
    )


def _reaches_master(client: Client) -> bool:
    try:
        return bool(client.store.r.ping())
    except redis.ConnectionError:
        return False


@pytest.fixture(scope="module")
def servers():
    """(master, replica, sentinel), all private; everything is stopped at the end."""
    master, replica = RedisServer(), RedisServer()
    sentinel = None
    try:
        master.start()
        replica.start()
        client = replica.client()
        client.replicaof(master.host, master.port)
        client.close()
        wait_for(lambda: _in_sync(master), timeout=10, message="the replica never synced")
        sentinel = SentinelServer(master.port, MASTER).start()
        wait_for(
            lambda: int(sentinel.client().sentinel_master(MASTER)["num-slaves"]) == 1,
            timeout=10,
            message="the sentinel does not know the replica",
        )
        yield master, replica, sentinel
    finally:
        if sentinel is not None:
            sentinel.stop()
        replica.cleanup()
        master.cleanup()


@pytest.fixture(scope="module")
def env(orch_env, servers) -> dict[str, str]:
    _, _, sentinel = servers
    return {
        **orch_env,
        "ORCHESTRATOR_REDIS_URL": sentinel.url,
        "ORCHESTRATOR_BROKER_URL": sentinel.url,
        "ORCHESTRATOR_RESULT_BACKEND": sentinel.url,
        "ORCHESTRATOR_SENTINEL_MASTER": MASTER,
    }


@pytest.fixture(scope="module")
def sclient(env):
    c = Client(Settings(**{k.removeprefix("ORCHESTRATOR_").lower(): v for k, v in env.items()}))
    try:
        c.deploy(REPO / "flows" / "text.yaml")
        yield c
    finally:
        c.close()


def test_a_flow_runs_and_survives_a_failover(sclient, env, servers, worker_factory) -> None:
    master, replica, sentinel = servers
    w = worker_factory(env=env, name="sentinel")
    assert f"Connected to sentinel://:**@127.0.0.1:{sentinel.port}/0" in w.log_text()

    first = sclient.trigger("text", {"message": "hello big world"})
    assert first.wait(timeout=30) == {"message": "DLROW GIB OLLEH", "spaces": 2}
    # The state went to the master the sentinel named.
    assert master.client().exists(sclient.store.run_key(first.id)) == 1

    wait_for(lambda: _in_sync(master), timeout=10, message="the replica fell behind")
    master.stop()  # the master dies; the sentinel promotes the replica
    wait_for(
        lambda: sentinel.master_address() == (replica.host, replica.port),
        timeout=20,
        message=lambda: f"no failover:\n{sentinel.log_tail()}",
    )
    # Until the sentinel has looked at its new master, clients are told there is none
    # (MasterNotFoundError, a ConnectionError: a worker gives its message back).
    wait_for(lambda: _reaches_master(sclient), timeout=20, message="no master to reach")

    # The client and the worker (broker, state, results) follow the sentinel.
    second = sclient.trigger("text", {"message": "after the failover"})
    assert second.wait(timeout=45) == {"message": "REVOLIAF EHT RETFA", "spaces": 2}
    assert replica.client().exists(sclient.store.run_key(second.id)) == 1
    assert sclient.get(first.id).status == "succeeded"  # replicated before the crash
