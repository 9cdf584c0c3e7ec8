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
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shutil
import sys
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

if TYPE_CHECKING:
    from ._processes import RedisServer, WorkerProcess, wait_for
    from ._testclient import FlowClient
    from .settings import Settings

__all__ = ["FlowClient", "FlowTestConfig", "RedisServer", "WorkerProcess", "wait_for"]

#: Imported on first use: pytest loads this module in every run, used or not.
_LAZY = {
    "FlowClient": "._testclient",
    "RedisServer": "._processes",
    "WorkerProcess": "._processes",
    "wait_for": "._processes",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, __package__), name)


MARKER = "orchestrator"
_MARKER_ARGS = ("definitions", "task_modules", "settings")
#: Settings the fixtures set themselves (the private Redis and the test's namespace).
_FIXED_SETTINGS = frozenset(
    {"redis_url", "broker_url", "result_backend", "key_prefix", "celery_key_prefix", "task_modules"}
)
#: The worker subprocesses a test used, for its failure report.
_WORKERS = pytest.StashKey[list["WorkerProcess"]]()


def _fail(message: str) -> NoReturn:
    """Error the test with ``message`` alone (a configuration mistake, not a bug)."""
    __tracebackhide__ = True
    pytest.fail(message, pytrace=False)


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


# -- configuration -----------------------------------------------------------------------


@dataclass(frozen=True)
class FlowTestConfig:
    """What a test's orchestrator fixtures import and deploy (ini < command line < marker)."""

    #: Modules the worker imports so the steps' Celery tasks are registered.
    task_modules: tuple[str, ...] = ()
    #: Deployed before the test: paths (files or folders), YAML text or DSL flows.
    definitions: tuple[Any, ...] = ()
    #: :class:`~orchestrator.settings.Settings` fields to override, as ``(name, value)``.
    settings: tuple[tuple[str, Any], ...] = ()


def _split(values: Iterable[str], pattern: str) -> list[str]:
    return [part.strip() for v in values for part in re.split(pattern, v) if part.strip()]


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str | os.PathLike) or not isinstance(value, Iterable):
        return [value]
    return list(value)


def _resolve(item: Any, base: Path, origin: str) -> Any:
    """A definition: a path made absolute (it must exist), YAML text or a flow object."""
    if isinstance(item, str) and "\n" in item:
        return item  # YAML text
    if isinstance(item, str | os.PathLike):
        path = Path(item)
        path = path if path.is_absolute() else base / path
        if not path.exists():
            _fail(f"{origin}: no such flow file or folder: {path}")
        return str(path)
    return item  # a DSL Flow or a model resource: Client.deploy checks it


def _config(request: pytest.FixtureRequest) -> FlowTestConfig:
    """The test's configuration: ini options, then command-line options, then the marker."""
    config = request.config
    ini_base = config.inipath.parent if config.inipath else config.rootpath
    modules = _split(config.getini("orchestrator_task_modules"), r"[,\s]+")
    definitions = [
        _resolve(p, ini_base, "ini option orchestrator_definitions")
        for p in _split(config.getini("orchestrator_definitions"), r",")
    ]
    if config.getoption("orchestrator_task_modules"):
        modules = _split([config.getoption("orchestrator_task_modules")], r"[,\s]+")
    if config.getoption("orchestrator_definitions"):
        cwd = config.invocation_params.dir
        definitions = [
            _resolve(p, cwd, "--orchestrator-definitions")
            for p in _split([config.getoption("orchestrator_definitions")], r",")
        ]
    settings: dict[str, Any] = {}
    marker = request.node.get_closest_marker(MARKER)
    if marker is not None:
        where = f"@pytest.mark.{MARKER} on {request.node.nodeid}"
        if marker.args:
            _fail(f"{where}: takes keyword arguments only ({', '.join(_MARKER_ARGS)})")
        unknown = sorted(set(marker.kwargs) - set(_MARKER_ARGS))
        if unknown:
            _fail(
                f"{where}: unknown argument {unknown[0]!r}; expected one of "
                f"{', '.join(_MARKER_ARGS)}"
            )
        if "task_modules" in marker.kwargs:
            modules = _split(_as_list(marker.kwargs["task_modules"]), r"[,\s]+")
        if "definitions" in marker.kwargs:
            definitions = [
                _resolve(d, config.rootpath, f"{where}: definitions")
                for d in _as_list(marker.kwargs["definitions"])
            ]
        settings = dict(marker.kwargs.get("settings") or {})
    _check_settings(settings)
    return FlowTestConfig(
        tuple(dict.fromkeys(modules)), tuple(definitions), tuple(sorted(settings.items()))
    )


def _check_settings(overrides: dict[str, Any]) -> None:
    from .settings import Settings

    for name in overrides:
        if name == "task_modules":
            _fail(f"@pytest.mark.{MARKER}: give task modules as task_modules=, not in settings")
        if name in _FIXED_SETTINGS:
            _fail(
                f"@pytest.mark.{MARKER}: settings.{name} is set by the fixtures (the private "
                "Redis and the test's own key prefix)"
            )
        if name not in Settings.model_fields:
            _fail(
                f"@pytest.mark.{MARKER}: settings.{name} is not a setting; known: "
                + ", ".join(sorted(set(Settings.model_fields) - _FIXED_SETTINGS))
            )


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    get = getattr(value, "get_secret_value", None)
    return str(get() if callable(get) else value)


# -- the test's namespace ----------------------------------------------------------------


def _namespace(redis_url: str, config: FlowTestConfig) -> tuple[Settings, dict[str, str]]:
    """Settings under a fresh key prefix, and the ``ORCHESTRATOR_*`` variables saying the same.

    The Celery key prefix keeps the queues (any name a definition routes to) and results
    of this namespace apart from every other one on the private Redis.
    """
    from .settings import Settings

    prefix = f"ot{uuid.uuid4().hex[:10]}:"
    fixed = {
        "redis_url": redis_url,
        "broker_url": redis_url,
        "result_backend": redis_url,
        "key_prefix": prefix,
        "celery_key_prefix": f"{prefix}celery:",
        "task_modules": ",".join(config.task_modules),
    }
    values = {**dict(config.settings), **fixed}
    settings = Settings(**values)
    # The worker reads the same environment as this process, plus what was set here.
    env = {k: v for k, v in os.environ.items() if k.startswith("ORCHESTRATOR_")}
    env.update({f"ORCHESTRATOR_{k.upper()}": _env_value(v) for k, v in values.items()})
    return settings, env


def _check_importable(modules: Iterable[str]) -> None:
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError) as exc:
            found, why = False, f": {exc}"
        else:
            why = ""
        if not found:
            _fail(
                f"orchestrator task module {name!r} cannot be imported{why} (from "
                "orchestrator_task_modules, --orchestrator-task-modules or the marker)"
            )


def _deploy(client: FlowClient, config: FlowTestConfig) -> set[str]:
    """Deploy the test's definitions; the queues their steps route to."""
    if config.definitions:
        client.deployed = client.deploy(*config.definitions)
    queues = {client.settings.default_queue}
    for d in client.deployed:
        if d.kind == "Flow":
            plan = client.plan(d.name, d.version)
            queues.update(str(n.options["queue"]) for n in plan.nodes.values())
    return queues


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
        _fail(
            "orchestrator_redis: redis-server is not on the PATH; install it or name it with "
            "--orchestrator-redis-server, the ini option orchestrator_redis_server or "
            "$REDIS_SERVER_BIN"
        )
    from ._processes import RedisServer

    server = RedisServer(binary=binary)
    try:
        server.start()
    except RuntimeError as exc:
        _fail(f"orchestrator_redis: {exc}")
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
            _fail(
                "ini option orchestrator_worker_concurrency: expected a whole number, got "
                f"{config.getini('orchestrator_worker_concurrency')!r}"
            )
        # The worker imports what this process imports: the rootdir, then sys.path.
        self.pythonpath = [str(config.rootpath), *(p for p in sys.path if p)]

    def stack(self, test: FlowTestConfig) -> _Stack:
        key = (test.task_modules, test.settings)
        if key not in self.stacks:
            _check_importable(test.task_modules)
            settings, env = _namespace(self.redis.url, test)
            self.stacks[key] = _Stack(settings, env, self._start)
        return self.stacks[key]

    def _start(self, queues: list[str], env: dict[str, str]) -> WorkerProcess:
        from ._processes import WorkerProcess

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
    from ._testclient import FlowClient

    config = _config(request)
    stack = _orchestrator_module_workers.stack(config)
    client = FlowClient(stack.settings)
    try:
        queues = _deploy(client, config)
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
    from celery.contrib.testing.worker import TestWorkController

    from .app import results_untracked

    class InProcessWorkController(TestWorkController):
        """The embedded worker; its thread publishes without tracking Celery results.

        Steps keep no Celery results (see :func:`orchestrator.app.results_untracked`);
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
    from celery import _state

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
    from celery.contrib.testing.worker import start_worker

    from ._testclient import FlowClient
    from .app import create_app, import_task_modules
    from .runtime import drop_engine

    config = _config(request)
    settings, _ = _namespace(orchestrator_redis.url, config)
    _check_importable(config.task_modules)
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
            queues = _deploy(client, config)
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
