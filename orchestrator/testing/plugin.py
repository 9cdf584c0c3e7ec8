"""The plugin's hooks (options, ini options, the marker, failure reports) and its fixtures.

Importing this module starts nothing: the fixtures do, for the tests that use them, and
they import Celery, Redis and the orchestrator proper only then.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .config import (
    MARKER,
    FlowTestConfig,
    check_importable,
    deploy,
    fail,
    namespace,
    resolve_config,
)

if TYPE_CHECKING:
    from ..devstack.processes import RedisServer, WorkerProcess
    from ..settings import Settings
    from .client import FlowClient

#: The worker subprocesses a test used, for its failure report.
_WORKERS = pytest.StashKey[list["WorkerProcess"]]()


# -- hooks -------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("orchestrator", "celery-orchestrator flow tests")
    group.addoption(
        "--orchestrator-task-modules",
        metavar="MODULES",
        help="comma-separated modules the test workers import (overrides the ini option "
        "orchestrator_task_modules)",
    )
    group.addoption(
        "--orchestrator-definitions",
        metavar="PATHS",
        help="comma-separated flow files or folders deployed for each test (overrides the "
        "ini option orchestrator_definitions)",
    )
    group.addoption(
        "--orchestrator-redis-server",
        metavar="PATH",
        help="the redis-server binary to start (default: $REDIS_SERVER_BIN, else the PATH)",
    )
    parser.addini(
        "orchestrator_task_modules",
        "modules the test workers import (ORCHESTRATOR_TASK_MODULES), one a line or "
        "comma-separated",
        type="linelist",
        default=[],
    )
    parser.addini(
        "orchestrator_definitions",
        "flow files or folders deployed for each test, relative to the ini file",
        type="linelist",
        default=[],
    )
    parser.addini("orchestrator_redis_server", "the redis-server binary to start", default="")
    parser.addini(
        "orchestrator_worker_pool", "Celery pool of the worker subprocesses", default="prefork"
    )
    parser.addini(
        "orchestrator_worker_concurrency", "concurrency of the worker subprocesses", default="2"
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(definitions=None, task_modules=None, settings=None): what the orchestrator "
        "fixtures deploy (paths, YAML text or DSL flows), which task modules their worker "
        "imports, and Settings fields to override",
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failed test's report ends with the log tail of each worker subprocess it used."""
    report = yield
    if report.failed:
        for w in item.stash.get(_WORKERS, []):
            state = "running" if w.running else f"exited {w.returncode}"
            report.sections.append(
                (f"orchestrator worker {w.name} (pid {w.pid}, {state}) log tail", w.log_tail())
            )
    return report


# -- fixtures: a private Redis and worker subprocesses ----------------------------------


@pytest.fixture(scope="session")
def orchestrator_redis(pytestconfig: pytest.Config) -> Iterator[RedisServer]:
    """A private ``redis-server`` (a free port, a temporary directory) for the session."""
    binary = (
        pytestconfig.getoption("orchestrator_redis_server")
        or pytestconfig.getini("orchestrator_redis_server")
        or os.environ.get("REDIS_SERVER_BIN")
        or shutil.which("redis-server")
    )
    if not binary:
        fail(
            "orchestrator_redis: redis-server is not on the PATH; install it or name it with "
            "--orchestrator-redis-server, the ini option orchestrator_redis_server or "
            "$REDIS_SERVER_BIN"
        )
    from ..devstack.processes import RedisServer  # lazy: Redis, for the tests that use it

    server = RedisServer(binary=binary)
    try:
        server.start()
    except RuntimeError as exc:
        fail(f"orchestrator_redis: {exc}")
    try:
        yield server
    finally:
        server.cleanup()


class _Stack:
    """A namespace and the worker subprocesses serving it (one per set of queues)."""

    def __init__(self, settings: Settings, env: dict[str, str], make: Any):
        self.settings, self.env, self._make = settings, env, make
        self.workers: list[WorkerProcess] = []
        self.queues: set[str] = set()

    def serve(self, queues: set[str]) -> None:
        """Start a worker for the queues no worker of this namespace consumes yet."""
        missing = sorted(queues - self.queues)
        if missing:
            self.workers.append(self._make(missing, self.env))
            self.queues.update(missing)


class _ModuleWorkers:
    """The stacks of one test module, by configuration; their workers stop with the module."""

    def __init__(self, config: pytest.Config, redis: RedisServer, log_dir: Path):
        self.config, self.redis, self.log_dir = config, redis, log_dir
        self.stacks: dict[tuple[Any, ...], _Stack] = {}
        self.pool = str(config.getini("orchestrator_worker_pool") or "prefork")
        try:
            self.concurrency = int(config.getini("orchestrator_worker_concurrency") or 2)
        except ValueError:
            fail(
                "ini option orchestrator_worker_concurrency: expected a whole number, got "
                f"{config.getini('orchestrator_worker_concurrency')!r}"
            )
        # The worker imports what this process imports: the rootdir, then sys.path.
        self.pythonpath = [str(config.rootpath), *(p for p in sys.path if p)]

    def stack(self, test: FlowTestConfig) -> _Stack:
        key = (test.task_modules, test.settings)
        if key not in self.stacks:
            check_importable(test.task_modules)
            settings, env = namespace(self.redis.url, test)
            self.stacks[key] = _Stack(settings, env, self._start)
        return self.stacks[key]

    def _start(self, queues: list[str], env: dict[str, str]) -> WorkerProcess:
        from ..devstack.processes import WorkerProcess  # lazy: Redis, as above

        w = WorkerProcess(
            queues,
            env=env,
            concurrency=self.concurrency,
            pool=self.pool,
            name="orchestrator-test",
            log_dir=self.log_dir,
            cwd=self.config.rootpath,
            pythonpath=self.pythonpath,
        )
        w.start(timeout=60)
        return w

    def close(self) -> None:
        errors: list[BaseException] = []
        for stack in self.stacks.values():
            for w in stack.workers:
                try:
                    w.stop()
                except BaseException as exc:  # stop them all, then report
                    errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture(scope="module")
def _orchestrator_module_workers(
    pytestconfig: pytest.Config,
    orchestrator_redis: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[_ModuleWorkers]:
    workers = _ModuleWorkers(
        pytestconfig, orchestrator_redis, tmp_path_factory.mktemp("orchestrator-workers")
    )
    try:
        yield workers
    finally:
        workers.close()


@pytest.fixture
def orchestrator_client(
    request: pytest.FixtureRequest, _orchestrator_module_workers: _ModuleWorkers
) -> Iterator[FlowClient]:
    """A client with the test's definitions deployed and a worker subprocess running them.

    The worker (prefork, concurrency 2 by default: ini options ``orchestrator_worker_pool``
    and ``orchestrator_worker_concurrency``) imports the task modules and consumes every
    queue the definitions route to. It is shared by the tests of the module with the same
    task modules and settings, and so is its namespace: such tests see each other's runs.
    """
    from .client import FlowClient  # lazy: Celery and Redis, for the tests that use it

    config = resolve_config(request)
    stack = _orchestrator_module_workers.stack(config)
    client = FlowClient(stack.settings)
    try:
        queues = deploy(client, config)
        request.node.stash[_WORKERS] = stack.workers
        stack.serve(queues)
        client.workers = list(stack.workers)
        yield client
    finally:
        client.close()


@pytest.fixture
def orchestrator_worker(orchestrator_client: FlowClient) -> WorkerProcess:
    """The worker subprocess running ``orchestrator_client``'s steps (its default queue's)."""
    return orchestrator_client.workers[0]


# -- fixtures: in-process ----------------------------------------------------------------


def _worker_controller() -> type:
    # lazy: Celery, for the in-process fixture only
    from celery.contrib.testing.worker import TestWorkController

    from ..publishing import results_untracked  # lazy: Celery, as above

    class InProcessWorkController(TestWorkController):
        """The embedded worker; its thread publishes without tracking Celery results.

        Steps keep no Celery results (see :func:`orchestrator.publishing.results_untracked`);
        a chord started from a chain link would otherwise subscribe to result channels
        that outlive the test and its Redis.
        """

        def start(self) -> Any:
            with results_untracked():
                return super().start()

    return InProcessWorkController


@contextmanager
def _current_app_kept() -> Iterator[None]:
    """Give Celery back its current and default app when the embedded worker is done."""
    from celery import _state  # lazy: Celery, only for the in-process fixture

    default, current = _state.default_app, getattr(_state._tls, "current_app", None)
    try:
        yield
    finally:
        _state.set_default_app(default)
        _state._set_current_app(current)


@pytest.fixture
def orchestrator_inprocess(
    request: pytest.FixtureRequest, orchestrator_redis: RedisServer
) -> Iterator[FlowClient]:
    """A client whose flows' steps run in this process, under a key prefix of the test's own.

    A Celery worker thread (solo pool: one step at a time) runs the steps against the
    private Redis, so what a task calls can be monkeypatched and a breakpoint in a task
    stops the test. Step timeouts are not enforced (the solo pool has no time limits).
    """
    from celery.contrib.testing.worker import start_worker  # lazy: Celery, only for this fixture

    from ..app import create_app, import_task_modules  # lazy: Celery, as above
    from ..runtime import drop_engine  # lazy: Celery, as above
    from .client import FlowClient  # lazy: Celery and Redis, as above

    config = resolve_config(request)
    settings, _ = namespace(orchestrator_redis.url, config)
    check_importable(config.task_modules)
    import_task_modules(settings)
    with _current_app_kept():
        app = create_app(settings, main="orchestrator-test", set_as_current=False)
        # BRPOP returns every 0.1 s instead of 1 s, so the worker stops quickly.
        app.conf.broker_transport_options = {
            **app.conf.broker_transport_options,
            "polling_interval": 0.1,
        }
        client = FlowClient(settings, app=app)
        try:
            queues = deploy(client, config)
            with start_worker(
                app,
                pool="solo",
                concurrency=1,
                perform_ping_check=False,
                queues=sorted(queues),
                loglevel="WARNING",
                WorkController=_worker_controller(),
            ):
                yield client
        finally:
            drop_engine(app)
            client.close()
