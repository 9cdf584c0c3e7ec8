"""A pytest plugin for testing flows in your own test suite (``orchestrator.testing``).

It is installed with the package (a ``pytest11`` entry point) and adds fixtures:

* ``orchestrator_client``: a :class:`FlowClient` (an :class:`~orchestrator.Client`)
  whose definitions are deployed and whose steps run on a real ``celery worker``
  subprocess importing your task modules; ``orchestrator_worker`` is that worker.
* ``orchestrator_inprocess``: the same, but the steps run in the test process (a Celery
  worker thread, solo pool) against the same Redis: fast, and ``monkeypatch``, coverage
  and breakpoints reach your tasks.
* ``orchestrator_redis``: the private ``redis-server`` (a free port, a temporary
  directory) both use, one per test session.

Each worker subprocess serves the tests of one module that ask for the same task
modules and settings, under its own key prefix and Celery key prefix (queues included);
every in-process test gets a prefix of its own. What to import and deploy comes from ini
options (``orchestrator_task_modules``, ``orchestrator_definitions``), the matching
``--orchestrator-*`` command-line options, and ``@pytest.mark.orchestrator(...)`` on a
test or module, the last one winning. See the README, "Testing your flows".

Importing this module starts nothing: the fixtures do, for the tests that use them.
pytest registers this module (not :mod:`.plugin`), so the hooks and fixtures are
imported here; :mod:`.config` resolves what a test deploys, :mod:`.client` is the client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import FlowTestConfig
from .plugin import _orchestrator_module_workers as _orchestrator_module_workers
from .plugin import orchestrator_client as orchestrator_client
from .plugin import orchestrator_inprocess as orchestrator_inprocess
from .plugin import orchestrator_redis as orchestrator_redis
from .plugin import orchestrator_worker as orchestrator_worker
from .plugin import pytest_addoption as pytest_addoption
from .plugin import pytest_configure as pytest_configure
from .plugin import pytest_runtest_makereport as pytest_runtest_makereport

if TYPE_CHECKING:
    from ..devstack.processes import RedisServer, WorkerProcess, wait_for
    from .client import FlowClient

__all__ = ["FlowClient", "FlowTestConfig", "RedisServer", "WorkerProcess", "wait_for"]

#: Imported on first use: pytest loads this module in every run, used or not.
_LAZY = {
    "FlowClient": ".client",
    "RedisServer": "..devstack.processes",
    "WorkerProcess": "..devstack.processes",
    "wait_for": "..devstack.processes",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, __package__), name)
