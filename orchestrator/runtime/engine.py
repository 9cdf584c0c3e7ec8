"""Per worker process: the store, the plan cache, and the errors the runtime raises."""

from __future__ import annotations

import os

from celery import Celery

from .. import expressions
from ..errors import NotFound, PermanentError
from ..errors import WorkerLost as WorkerLost  # its old import path, kept
from ..plan import Plan, PlanCache
from ..settings import Settings, get_settings
from ..store import RedisStore


class Engine:
    """Per worker process: the store and a cache of plans by flow version."""

    def __init__(self, app: Celery, settings: Settings):
        self.app, self.settings = app, settings
        self.store = RedisStore(settings)
        self._plans = PlanCache(settings, self.store.get_definition)
        expressions.configure(settings.expression_max_work, settings.expression_max_seconds)

    def plan(self, flow: str, version: str) -> Plan:
        try:
            return self._plans.get(flow, version)
        except NotFound as exc:
            raise PermanentError(str(exc)) from exc


_engines: dict[tuple[int, int], Engine] = {}


def engine_for(app: Celery) -> Engine:
    """The process's engine for ``app`` (one per process: connections do not cross a fork)."""
    key = (os.getpid(), id(app))
    eng = _engines.get(key)
    if eng is None:
        settings = getattr(app.conf, "orchestrator_settings", None)
        if settings is None:
            settings = get_settings()
        eng = _engines[key] = Engine(app, settings)
    return eng


def drop_engine(app: Celery) -> None:
    """Forget and close this process's engine for ``app``, an app being thrown away.

    The cache is keyed by ``id(app)``, which a later app may reuse; the in-process
    test worker (:mod:`orchestrator.testing`) calls this when its app is done.
    """
    eng = _engines.pop((os.getpid(), id(app)), None)
    if eng is not None:
        eng.store.close()
