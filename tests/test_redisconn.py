"""Broker kinds without servers: Sentinel URLs, and the Celery settings each broker gets."""

from __future__ import annotations

import pytest
import redis
from redis.sentinel import SentinelConnectionPool

from orchestrator.app import celery_config
from orchestrator.redisconn import is_redis, parse_sentinel_url, redis_client
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
