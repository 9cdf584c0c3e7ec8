"""The store's catalog: what is deployed and what is published, apart from any run.

Flow definitions (immutable versions and the pointer to the current one), resources
(Variables, Services, EventSubscriptions), event channels and schedules. A mixin of
:class:`~.redis.RedisStore`, whose connection, key prefix, settings and secret masking it
uses; its keys are in the table of :mod:`.keys`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, cast

import redis

from ..settings import Settings
from ..variables import learn_secrets

# The store's client decodes replies (``decode_responses=True``): every key, field and value
# it reads is a str. redis-py annotates a sync client's replies as ``bytes | str`` whatever
# the client, so the read sites cast to these.
Hash = dict[str, str]
#: A stream's entries: (entry id, fields).
Entries = list[tuple[str, dict[str, str]]]


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class Catalog:
    """Definitions, resources, channels and schedules: the methods of RedisStore for them."""

    # provided by RedisStore, which mixes this in
    r: redis.Redis
    p: str
    settings: Settings
    _masked: Callable[[Any], Any]
    _fresh_secrets: Callable[[], None]
    _learn_secrets: Callable[..., None]

    # -- definitions --------------------------------------------------------------------

    def save_definition(
        self, name: str, version: str, document: dict[str, Any], initial_state: str
    ) -> bool:
        """Store a version (immutable) and make it current; True if the flow is new."""
        # Not a MULTI: the keys live on different Cluster slots. The version is written
        # before the pointer to it, so a reader never finds a version it cannot load.
        document = self._masked(document)
        pipe = self.r.pipeline(transaction=False)
        pipe.set(f"{self.p}flowdef:{name}:{version}", dumps(document), nx=True)
        pipe.sadd(f"{self.p}flows", name)
        pipe.hsetnx(f"{self.p}flow:{name}", "state", initial_state)
        pipe.hset(f"{self.p}flow:{name}", mapping={"version": version, "deployed_at": time.time()})
        _, _, created, _ = pipe.execute()
        return bool(created)

    def get_definition(self, name: str, version: str) -> dict[str, Any] | None:
        # A worker process loads a plan before its first step runs: learn the secrets
        # then, so that step's log lines are masked too (``_masked``: on every write).
        self._fresh_secrets()
        raw = self.r.get(f"{self.p}flowdef:{name}:{version}")
        return json.loads(raw) if raw else None

    def flow_info(self, name: str) -> dict[str, str] | None:
        info = cast(Hash, self.r.hgetall(f"{self.p}flow:{name}"))
        return info or None

    def flow_names(self) -> list[str]:
        return sorted(cast(set[str], self.r.smembers(f"{self.p}flows")))

    def set_flow_state(self, name: str, state: str) -> None:
        self.r.hset(f"{self.p}flow:{name}", "state", state)

    # -- resources: variables, services, event subscriptions ----------------------------

    def save_resource(self, kind: str, name: str, spec: dict[str, Any]) -> bool:
        """Store (or replace) a resource's spec; True when it is new."""
        new = bool(self.r.hset(f"{self.p}res:{kind}", name, dumps(self._masked(spec))))
        if kind == "Variable":  # a secret deployed from here is masked from now on
            learn_secrets({name: spec})
        return new

    def resources(self, kind: str) -> dict[str, dict[str, Any]]:
        specs = cast(Hash, self.r.hgetall(f"{self.p}res:{kind}"))
        found = {k: json.loads(v) for k, v in specs.items()}
        if kind == "Variable":  # read anyway (a step reads ``${vars...}``): learn them
            self._learn_secrets(found)
        return found

    def resource(self, kind: str, name: str) -> dict[str, Any] | None:
        raw = self.r.hget(f"{self.p}res:{kind}", name)
        spec = json.loads(raw) if raw else None
        if kind == "Variable" and spec is not None:
            learn_secrets({name: spec})
        return spec

    # -- event channels -----------------------------------------------------------------

    def channel_key(self, channel: str, dead: bool = False) -> str:
        return f"{self.p}channel:{channel}" + (":dead" if dead else "")

    def add_event(self, channel: str, entry: dict[str, Any], dead: bool = False) -> str:
        """Append to a channel (or its dead-letter stream), trimmed to ~``channel_maxlen``."""
        entry_id = self.r.xadd(
            self.channel_key(channel, dead),
            {"e": dumps(self._masked(entry))},
            maxlen=self.settings.channel_maxlen,
            approximate=True,
        )
        return cast(str, entry_id)

    def channel_entry(self, channel: str, entry_id: str, dead: bool = False) -> dict | None:
        found = cast(Entries, self.r.xrange(self.channel_key(channel, dead), entry_id, entry_id))
        return json.loads(found[0][1]["e"]) if found else None

    def channel_entries(
        self, channel: str, count: int = 50, dead: bool = False
    ) -> list[tuple[str, dict[str, Any]]]:
        """The newest ``count`` entries, oldest first."""
        found = cast(Entries, self.r.xrevrange(self.channel_key(channel, dead), count=count))
        return [(i, json.loads(f["e"])) for i, f in reversed(found)]

    def remove_dead(self, channel: str, entry_id: str) -> bool:
        return bool(self.r.xdel(self.channel_key(channel, dead=True), entry_id))

    # -- schedules ----------------------------------------------------------------------------

    def save_schedule(self, name: str, spec: dict[str, Any], next_fire: float, reset: bool) -> None:
        spec = self._masked(spec)
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(f"{self.p}schedules", name, dumps(spec))
        if reset:
            pipe.hset(f"{self.p}schedule:{name}", mapping={"next": next_fire})
            pipe.hdel(f"{self.p}schedule:{name}", "error")
        pipe.execute()

    def schedules(self) -> dict[str, dict[str, Any]]:
        specs = cast(Hash, self.r.hgetall(f"{self.p}schedules"))
        return {k: json.loads(v) for k, v in specs.items()}

    def schedule_state(self, name: str) -> dict[str, str]:
        return cast(Hash, self.r.hgetall(f"{self.p}schedule:{name}"))

    def set_schedule_state(self, name: str, **fields: Any) -> None:
        self.r.hset(f"{self.p}schedule:{name}", mapping=self._masked(fields))

    def claim_fire(self, name: str, fire: float) -> bool:
        """True for the one caller that fires ``name`` at ``fire`` (a lock per fire time)."""
        return bool(
            self.r.set(
                f"{self.p}fired:{name}:{int(fire)}",
                "1",
                nx=True,
                ex=max(self.settings.retention_s, 86400),
            )
        )
