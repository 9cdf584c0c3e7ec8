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

Every process checks at start that no Redis it uses evicts keys (:func:`check_eviction`):
a ``maxmemory-policy`` other than ``noeviction`` deletes keys when Redis is full, run
state and queued messages among them, without an error anywhere.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry
from redis.sentinel import Sentinel

from .errors import OrchestratorError
from .settings import Settings

log = logging.getLogger("orchestrator.redisconn")

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


# -- eviction -------------------------------------------------------------------------------

#: The one ``maxmemory-policy`` under which a full Redis refuses writes instead of
#: deleting keys.
NO_EVICTION = "noeviction"
#: Seconds the start-up check waits for each Redis (it never delays a start for longer).
EVICTION_CHECK_TIMEOUT_S = 3.0


class EvictingRedis(OrchestratorError):
    """A Redis of the deployment may evict keys and ``ORCHESTRATOR_REDIS_EVICTION=refuse``."""


def maxmemory_policy(client: redis.Redis) -> str | None:
    """The server's ``maxmemory-policy``: ``CONFIG GET``, else ``INFO memory`` (managed
    Redis often forbids CONFIG); None when neither tells."""
    try:
        policy = client.config_get("maxmemory-policy").get("maxmemory-policy")
        if policy:
            return str(policy)
    except redis.ResponseError as exc:  # CONFIG renamed, disabled or denied by an ACL
        log.debug("CONFIG GET maxmemory-policy refused (%s); reading INFO memory", exc)
    try:
        policy = client.info("memory").get("maxmemory_policy")
    except redis.ResponseError as exc:
        log.debug("INFO memory refused too (%s)", exc)
        return None
    return str(policy) if policy else None


def _redact(url: str) -> str:
    return re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:***@", url)


def _redis_roles(settings: Settings) -> dict[str, list[str]]:
    """Each Redis URL of the deployment, with what it holds."""
    roles: dict[str, list[str]] = {settings.redis_url: ["run state"]}
    if is_redis(settings.broker_url):
        roles.setdefault(settings.broker_url, []).append("step messages")
    if is_redis(settings.result_backend):
        roles.setdefault(settings.result_backend, []).append("results")
    return roles


def _policies(url: str, settings: Settings) -> list[tuple[str, str | None]]:
    """(server, maxmemory-policy) of the Redis at ``url``: every primary of a Cluster."""
    client = redis_client(
        url,
        settings,
        decode_responses=True,
        socket_timeout=EVICTION_CHECK_TIMEOUT_S,
        socket_connect_timeout=EVICTION_CHECK_TIMEOUT_S,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        if isinstance(client, RedisCluster):
            return [
                (node.name, maxmemory_policy(client.get_redis_connection(node)))
                for node in client.get_primaries()
            ]
        return [(_redact(url), maxmemory_policy(client))]
    finally:
        client.close()


def eviction_problems(settings: Settings) -> list[str]:
    """A message for each Redis of the deployment (state store, a Redis broker, the result
    backend) whose ``maxmemory-policy`` lets it delete keys. A Redis that cannot be reached
    or will not tell its policy is skipped (debug log): the process's own connection
    reports an unreachable Redis."""
    problems: list[str] = []
    for url, roles in _redis_roles(settings).items():
        try:
            policies = _policies(url, settings)
        except (redis.RedisError, OSError, ValueError) as exc:
            log.debug("could not read the maxmemory-policy of %s: %s", _redact(url), exc)
            continue
        for server, policy in policies:
            if policy is None:
                log.debug("%s does not tell its maxmemory-policy: not checked", server)
            elif policy != NO_EVICTION:
                problems.append(
                    f"Redis at {server} ({', '.join(roles)}) has maxmemory-policy {policy}: "
                    "when full it deletes keys to make room, so runs would be silently lost "
                    "(their state, queued steps and timers gone). Set maxmemory-policy "
                    "noeviction (a full Redis then refuses writes, and they fail loudly), or "
                    "ORCHESTRATOR_REDIS_EVICTION=refuse|ignore"
                )
    return problems


def check_eviction(
    settings: Settings, process: str, warn: Callable[[str], None] | None = None
) -> list[str]:
    """The start-up check of ``process`` (worker, beat, api): per
    ``ORCHESTRATOR_REDIS_EVICTION``, ``warn`` about each evicting Redis (default: a
    logged warning), raise :class:`EvictingRedis` (``refuse``), or skip it (``ignore``).
    Returns the problems found."""
    mode = settings.redis_eviction
    if mode == "ignore":
        return []
    problems = eviction_problems(settings)
    if problems and mode == "refuse":
        raise EvictingRedis(
            f"{process} not started (ORCHESTRATOR_REDIS_EVICTION=refuse): " + "; ".join(problems)
        )
    for problem in problems:
        (warn or log.warning)(problem)
    return problems


def print_warning(message: str) -> None:
    """``warning: <message>`` on stderr (commands warn so before any logging is set up)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


#: Start-up checks done in this process, so a command and Celery's hook check once.
_checked: set[tuple[str, str, str, str]] = set()


def check_eviction_once(
    settings: Settings, process: str, warn: Callable[[str], None] | None = None
) -> list[str]:
    """:func:`check_eviction`, at most once per process for the same Redis URLs."""
    s = settings
    key = (s.redis_url, s.broker_url, s.result_backend, s.redis_eviction)
    if key in _checked:
        return []
    _checked.add(key)
    return check_eviction(settings, process, warn)
