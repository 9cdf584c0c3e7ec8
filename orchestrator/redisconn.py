"""Connections to Redis from a URL, plain or through Redis Sentinel; broker kinds.

The state store, the broker and the result backend each take a URL. A plain Redis URL
(``redis://``, ``rediss://``, ``unix://``) is used as is. A Sentinel URL has kombu's and
Celery's own form, so the same value works for all three settings::

    sentinel://[:password@]host1:26379/0;sentinel://host2:26379/0

Each ``;``-separated part names one sentinel; the database, user name and password of the
first part are the *master's* (as in kombu), and ``ORCHESTRATOR_SENTINEL_MASTER`` names the
master the sentinels watch. A password for the sentinels themselves, if they require one,
is ``ORCHESTRATOR_SENTINEL_PASSWORD``. :func:`redis_client` builds the state store's client
(``Sentinel(...).master_for(...)``: it asks the sentinels for the master and asks again
after a failover); :func:`sentinel_transport_options` gives kombu and Celery the same.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.cluster import RedisCluster
from redis.sentinel import Sentinel

from .settings import Settings

#: URL schemes of a Redis server reached directly (redis-py's and kombu's spellings).
REDIS_SCHEMES = frozenset({"redis", "rediss", "unix", "redis+socket"})
SENTINEL_SCHEME = "sentinel"
#: URL schemes of an AMQP broker (RabbitMQ).
AMQP_SCHEMES = frozenset({"amqp", "amqps", "pyamqp"})
#: The highest step ``priority``; RabbitMQ queues are declared with it.
MAX_PRIORITY = 9
#: The port a sentinel listens on when its URL names none.
SENTINEL_PORT = 26379


def scheme(url: str) -> str:
    """The scheme of ``url`` in lower case (``redis``, ``sentinel``, ``amqp``...)."""
    return url.partition("://")[0].lower() if "://" in url else ""


def is_sentinel(url: str) -> bool:
    """Whether ``url`` reaches Redis through sentinels."""
    return scheme(url) == SENTINEL_SCHEME


def is_redis(url: str) -> bool:
    """Whether ``url`` is a Redis server, directly or through sentinels (a Redis broker)."""
    return scheme(url) in REDIS_SCHEMES or is_sentinel(url)


def sentinel_transport_options(settings: Settings) -> dict[str, Any]:
    """kombu's / Celery's transport options for a ``sentinel://`` broker or result backend."""
    options: dict[str, Any] = {"master_name": settings.sentinel_master}
    password = settings.sentinel_password.get_secret_value()
    if password:
        options["sentinel_kwargs"] = {"password": password}
    return options


def transport_options(url: str, settings: Settings) -> dict[str, Any]:
    """kombu's transport options for a broker, or Celery's for a result backend, at ``url``.

    A Redis one (direct or through sentinels) gets the visibility timeout and the key
    prefix, plus the master's name behind sentinels. An AMQP broker (RabbitMQ) gets publisher
    confirms: a publish returns once the broker has the message, as an LPUSH does on Redis.
    Others get none.
    """
    if is_redis(url):
        options: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout_s}
        if settings.celery_key_prefix:
            options["global_keyprefix"] = settings.celery_key_prefix
        if is_sentinel(url):
            options.update(sentinel_transport_options(settings))
        return options
    if scheme(url) in AMQP_SCHEMES:
        return {"confirm_publish": True}
    return {}


def queue_max_priority(broker_url: str) -> int | None:
    """Celery's ``task_queue_max_priority`` for this broker.

    RabbitMQ honours message priorities only in queues declared with ``x-max-priority``,
    so the queues Celery declares get 9 (the highest step priority). Redis needs none.
    """
    return MAX_PRIORITY if scheme(broker_url) in AMQP_SCHEMES else None


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """The sentinels' addresses and the master's connection keywords from a Sentinel URL.

    Raises :class:`ValueError` naming what is wrong: a part that is not ``sentinel://``, a
    part without a host, a database that is not a number.
    """
    hosts: list[tuple[str, int]] = []
    master: dict[str, Any] = {}
    for i, part in enumerate(p.strip() for p in url.split(";")):
        if not part:
            continue
        if not is_sentinel(part):
            raise ValueError(
                f"Sentinel URL part {i + 1} must start with sentinel:// (parts are "
                f"separated by ';')"
            )
        parts = urlsplit(part)
        try:
            port = parts.port or SENTINEL_PORT
        except ValueError:
            raise ValueError(f"Sentinel URL part {i + 1}: bad port") from None
        if not parts.hostname:
            raise ValueError(f"Sentinel URL part {i + 1} names no host")
        hosts.append((parts.hostname, port))
        if i == 0:  # the master's credentials and database, as kombu reads them
            if parts.username:
                master["username"] = unquote(parts.username)
            if parts.password:
                master["password"] = unquote(parts.password)
            db = parts.path.strip("/") or "0"
            if not db.isdigit():
                raise ValueError(f"Sentinel URL: database must be a number, not {db!r}")
            master["db"] = int(db)
    if not hosts:
        raise ValueError("Sentinel URL names no sentinel")
    return hosts, master


def redis_client(url: str, settings: Settings, **kwargs: Any) -> redis.Redis:
    """A redis-py client for ``url``: ``Redis.from_url``, the master the sentinels name,
    or a ``RedisCluster`` for ``redis+cluster://`` (the state store only).

    ``kwargs`` go to the client (``decode_responses``, timeouts, ``retry``...). With
    Sentinel the client is a ``master_for`` client: every new connection asks the sentinels
    where the master is, and a connection that finds the old master demoted reconnects.
    """
    if url.startswith(("redis+cluster://", "rediss+cluster://")):
        # A Cluster: the seed node's URL, with the scheme redis-py knows.
        seed = url.replace("+cluster", "", 1)
        return RedisCluster.from_url(seed, **kwargs)  # type: ignore[return-value]
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **kwargs)
    hosts, master = parse_sentinel_url(url)
    password = settings.sentinel_password.get_secret_value()
    sentinel_kwargs = {k: v for k, v in kwargs.items() if k.startswith("socket_")}
    if password:
        sentinel_kwargs["password"] = password
    sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_kwargs)
    return sentinel.master_for(settings.sentinel_master, **{**master, **kwargs})
