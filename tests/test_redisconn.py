"""Broker kinds without servers: Sentinel URLs, and the Celery settings each broker gets;
and, with private redis-servers, the start-up check of Redis's ``maxmemory-policy``."""

from __future__ import annotations

import os

import pytest
import redis
from redis.sentinel import SentinelConnectionPool

from orchestrator.app import celery_config
from orchestrator.redisconn import (
    EvictingRedis,
    check_eviction,
    is_redis,
    maxmemory_policy,
    parse_sentinel_url,
    redis_client,
)
from orchestrator.settings import Settings

SENTINELS = "sentinel://:s3cret@10.0.0.1:26380/2;sentinel://10.0.0.2;sentinel://h3:5000/9"


def test_sentinel_url_names_every_sentinel_and_the_masters_db_and_password() -> None:
    hosts, master = parse_sentinel_url(SENTINELS)
    assert hosts == [("10.0.0.1", 26380), ("10.0.0.2", 26379), ("h3", 5000)]
    assert master == {"password": "s3cret", "db": 2}  # the first part's, as kombu reads it


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("sentinel://a:26379;redis://b:6379", "part 2 must start with sentinel://"),
        ("sentinel://a:26379/zero", "database must be a number"),
        ("sentinel://:pw@/0", "part 1 names no host"),
        ("sentinel://a:port/0", "part 1: bad port"),
        (";", "names no sentinel"),
    ],
)
def test_a_bad_sentinel_url_says_what_is_wrong(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_sentinel_url(url)


def test_the_state_client_asks_the_sentinels_for_the_named_master() -> None:
    settings = Settings(
        redis_url=SENTINELS, sentinel_master="orders", sentinel_password="sentinel-pw"
    )
    client = redis_client(settings.redis_url, settings, decode_responses=True, socket_timeout=3)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "orders"
    kwargs = pool.connection_kwargs
    assert (kwargs["db"], kwargs["password"], kwargs["decode_responses"]) == (2, "s3cret", True)
    sentinel = pool.sentinel_manager
    assert [s.connection_pool.connection_kwargs["port"] for s in sentinel.sentinels] == [
        26380,
        26379,
        5000,
    ]
    # The sentinels get their own password and the socket timeouts, not the master's.
    first = sentinel.sentinels[0].connection_pool.connection_kwargs
    assert first["password"] == "sentinel-pw" and first["socket_timeout"] == 3
    assert "sentinel-pw" not in repr(settings)
    client.close()


def test_a_plain_url_is_used_as_is() -> None:
    settings = Settings(redis_url="redis://:pw@127.0.0.1:6390/3")
    client = redis_client(settings.redis_url, settings, decode_responses=True)
    assert not isinstance(client.connection_pool, SentinelConnectionPool)
    assert client.connection_pool.connection_kwargs["db"] == 3
    client.close()
    assert isinstance(client, redis.Redis)


def test_redis_brokers_keep_the_visibility_timeout_and_key_prefix() -> None:
    conf = celery_config(
        Settings(redis_url="redis://127.0.0.1:6390/0", celery_key_prefix="cp:", heartbeat_s=0)
    )
    expected = {"visibility_timeout": 3600, "global_keyprefix": "cp:"}
    assert conf["broker_transport_options"] == expected
    assert conf["result_backend_transport_options"] == expected
    assert conf["task_queue_max_priority"] is None


def test_sentinel_broker_and_backend_get_the_master_name() -> None:
    conf = celery_config(
        Settings(redis_url=SENTINELS, sentinel_master="orders", sentinel_password="pw")
    )
    for options in (conf["broker_transport_options"], conf["result_backend_transport_options"]):
        assert options["master_name"] == "orders"
        assert options["sentinel_kwargs"] == {"password": "pw"}
        assert options["visibility_timeout"] == 3600
    assert conf["broker_url"] == conf["result_backend"] == SENTINELS


def test_a_rabbitmq_broker_gets_confirms_and_priority_queues_but_no_redis_options() -> None:
    conf = celery_config(
        Settings(
            redis_url="redis://127.0.0.1:6390/0",
            broker_url="amqp://guest:guest@127.0.0.1:5672/orch",
            celery_key_prefix="cp:",
        )
    )
    assert conf["broker_transport_options"] == {"confirm_publish": True}
    assert conf["task_queue_max_priority"] == 9
    # Results stay in Redis, with its options.
    assert conf["result_backend"] == "redis://127.0.0.1:6390/0"
    assert conf["result_backend_transport_options"]["global_keyprefix"] == "cp:"


@pytest.mark.parametrize(
    ("url", "redis_like"),
    [
        ("redis://h:6379/0", True),
        ("rediss://h:6380/0", True),
        ("unix:///run/redis.sock", True),
        ("SENTINEL://h:26379", True),
        ("amqp://guest@h//", False),
        ("sqs://", False),
    ],
)
def test_broker_kind(url: str, redis_like: bool) -> None:
    assert is_redis(url) is redis_like


# -- eviction: every process checks maxmemory-policy at start ---------------------------------


@pytest.fixture(scope="module")
def redis_servers():
    """Private redis-servers started with extra args, by name; stopped after the module."""
    from tests.support import RedisServer

    started: dict[tuple[str, ...], RedisServer] = {}

    def server(*args: str) -> RedisServer:
        if args not in started:
            started[args] = RedisServer(extra_args=args).start()
        return started[args]

    yield server
    for s in started.values():
        s.cleanup()


def evicting(redis_servers, *more: str):
    return redis_servers("--maxmemory-policy", "allkeys-lru", *more)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("args", "policy"),
    [
        ((), "allkeys-lru"),
        (("--rename-command", "CONFIG", ""), "allkeys-lru"),  # managed Redis: no CONFIG
        (("--user", "default", "on", "nopass", "~*", "&*", "+@all", "-config"), "allkeys-lru"),
        (("--rename-command", "CONFIG", "", "--rename-command", "INFO", ""), None),
    ],
    ids=["config", "info-no-config", "info-acl-denies-config", "neither"],
)
def test_maxmemory_policy_reads_config_else_info(redis_servers, args, policy) -> None:
    client = evicting(redis_servers, *args).client(decode_responses=True)
    try:
        assert maxmemory_policy(client) == policy
    finally:
        client.close()


@pytest.mark.integration
def test_check_eviction_warns_refuses_or_ignores(redis_servers, redis_server) -> None:
    url = evicting(redis_servers).url
    warned: list[str] = []
    problems = check_eviction(Settings(redis_url=url), "worker", warned.append)
    assert warned == problems and len(problems) == 1
    assert "maxmemory-policy allkeys-lru" in problems[0] and "silently lost" in problems[0]
    assert "(run state, step messages, results)" in problems[0]
    with pytest.raises(EvictingRedis, match="beat not started.*allkeys-lru"):
        check_eviction(Settings(redis_url=url, redis_eviction="refuse"), "beat")
    assert check_eviction(Settings(redis_url=url, redis_eviction="ignore"), "api") == []
    # Only the evicting one of two servers is named; noeviction (the default) passes.
    both = Settings(redis_url=redis_server.url, broker_url=url, redis_eviction="refuse")
    with pytest.raises(EvictingRedis) as exc:
        check_eviction(both, "worker")
    assert f"{url} (step messages)" in str(exc.value) and redis_server.url not in str(exc.value)
    assert check_eviction(Settings(redis_url=redis_server.url, redis_eviction="refuse"), "x") == []


def test_an_unreachable_redis_is_left_to_the_process_own_connection() -> None:
    from tests.support import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"
    assert check_eviction(Settings(redis_url=url, redis_eviction="refuse"), "worker") == []


@pytest.mark.integration
def test_the_password_never_shows_in_the_message(redis_servers) -> None:
    # nopass: the server takes any password, so the URL may carry one.
    server = redis_servers(
        "--maxmemory-policy", "volatile-lru", "--user", "default", "on", "nopass", "~*", "&*",
        "+@all",
    )  # fmt: skip
    url = f"redis://default:s3cret@127.0.0.1:{server.port}/0"
    (problem,) = check_eviction(Settings(redis_url=url), "api", lambda _: None)
    assert "s3cret" not in problem and "default:***@" in problem and "volatile-lru" in problem


SCHEDULER = "orchestrator.scheduler:Scheduler"
#: How each process is started: the orchestrator's commands, and Celery's own for the worker.
COMMANDS = {
    "worker": ["-m", "orchestrator", "worker", "-P", "solo", "-Q", "evict-q"],
    "beat": ["-m", "orchestrator", "beat"],
    "api": ["-m", "orchestrator", "api", "--dev", "--port", "0"],
    "celery-worker": ["-m", "celery", "-A", "orchestrator.worker", "worker", "-P", "solo"],
    "celery-beat": ["-m", "celery", "-A", "orchestrator.worker", "beat", "-S", SCHEDULER],
}
#: What each prints once it runs (after the check).
STARTED = {
    "worker": " ready.",
    "beat": "Starting...",
    "api": "Uvicorn running",
    "celery-worker": " ready.",
    "celery-beat": "Starting...",  # logged before Celery's beat_init, where it checks
}


@pytest.mark.integration
@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("mode", ["warn", "refuse"])
def test_every_process_warns_or_refuses_at_start(redis_servers, tmp_path, command, mode) -> None:
    import subprocess
    import sys
    import uuid

    from tests.support import REPO_ROOT, wait_for

    url = evicting(redis_servers).url
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
    env.update(
        ORCHESTRATOR_REDIS_URL=url,
        ORCHESTRATOR_KEY_PREFIX=f"ev{uuid.uuid4().hex[:6]}:",
        ORCHESTRATOR_REDIS_EVICTION=mode,
        PYTHONPATH=str(REPO_ROOT),
        PYTHONUNBUFFERED="1",
    )
    log = tmp_path / "out.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, *COMMANDS[command], *([] if command == "api" else ["-l", "INFO"])],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=out,
        )
    try:
        if mode == "refuse":
            assert proc.wait(timeout=60) == 1
            text = log.read_text()
            assert "error: " in text and "not started" in text and "allkeys-lru" in text, text
            assert command == "celery-beat" or STARTED[command] not in text
        else:
            # Started, and warned (beat logs "Starting..." before its check runs).
            wait_for(
                lambda: (
                    (STARTED[command] in (t := log.read_text()) and "silently lost" in t)
                    or proc.poll() is not None
                ),
                timeout=60,
                message=lambda: log.read_text(),
            )
            text = log.read_text()
            assert proc.poll() is None, text
            assert text.count("maxmemory-policy allkeys-lru") == 1, text  # once per process
            assert "warning: Redis at " in text and "silently lost" in text, text
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
