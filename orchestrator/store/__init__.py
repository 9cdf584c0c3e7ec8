"""Run state in Redis: the store (:class:`RedisStore`), its key table (:mod:`.keys`) and
its Lua scripts (:mod:`.scripts`, ``lua/``). Nothing else sends commands on orchestrator
keys; nothing here knows Celery."""

from __future__ import annotations

from ..status import ACTIVE, ENDED, TERMINAL_STEP
from .redis import NO_OUTPUT, SECRETS_REFRESH_S, RedisStore, dumps
from .scripts import script as _script

__all__ = [
    "ACTIVE",
    "ENDED",
    "NO_OUTPUT",
    "SECRETS_REFRESH_S",
    "TERMINAL_STEP",
    "RedisStore",
    "_script",
    "dumps",
]
