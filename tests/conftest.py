"""Shared fixtures: the only place where tests start services.

* One private ``redis-server`` per test session (``redis_server``); never the
  shared Redis on 6379, never FLUSHALL.
* Each test module is isolated on that server by its own key prefix and queue
  names (``orch_env``), since Celery and the run state all live in DB 0.
* Workers are real ``celery worker`` subprocesses (``worker``, ``worker_factory``).

Integration tests are marked ``@pytest.mark.integration`` (everything under
``tests/integration/`` is marked automatically); run without them with
``pytest -m "not integration"`` or ``pytest --skip-integration``.

``--broker amqp`` (or ``ORCHESTRATOR_TEST_BROKER=amqp``) runs them with the machine's
RabbitMQ as the broker, each module on a vhost of its own (``rabbit_vhosts``); run state
and results stay in the private Redis. Tests marked ``redis_broker`` (they read the Redis
broker's own keys) are skipped there.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import pytest

from tests.brokers import RabbitVhosts, rabbitmq_missing
from tests.support import BeatProcess, RedisServer, WorkerProcess

# Workers owned by fixtures and not yet torn down; a failing test's report gets
# the tail of each one's log.
_LIVE_WORKERS: list[WorkerProcess] = []


# -- pytest hooks ------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--skip-integration",
        action="store_true",
        default=False,
        help="skip tests marked 'integration' (those needing redis-server and Celery workers)",
    )
    parser.addoption(
        "--broker",
        choices=("redis", "amqp"),
        default=os.environ.get("ORCHESTRATOR_TEST_BROKER") or "redis",
        help="the Celery broker of integration tests: the private redis-server (default) or "
        "the machine's RabbitMQ on a vhost per module (env ORCHESTRATOR_TEST_BROKER)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "integration: needs a private redis-server and real Celery worker processes",
    )
    config.addinivalue_line(
        "markers",
        "redis_broker(reason): reads the Redis broker's own keys; skipped with --broker amqp",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    integration_dir = config.rootpath / "tests" / "integration"
    skip = pytest.mark.skip(reason="--skip-integration given")
    amqp = config.getoption("--broker") == "amqp"
    missing = rabbitmq_missing() if amqp else None
    if missing and os.environ.get("CI"):
        raise pytest.UsageError(f"--broker amqp: {missing}")
    for item in items:
        if item.path.is_relative_to(integration_dir):
            item.add_marker(pytest.mark.integration)
        if config.getoption("--skip-integration") and item.get_closest_marker("integration"):
            item.add_marker(skip)
        elif missing and item.get_closest_marker("integration"):
            item.add_marker(pytest.mark.skip(reason=f"--broker amqp: {missing}"))
        elif amqp and (mark := item.get_closest_marker("redis_broker")):
            why = mark.args[0] if mark.args else "reads the Redis broker's keys"
            item.add_marker(pytest.mark.skip(reason=f"Redis broker only: {why}"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    report = yield
    if report.failed:
        for w in list(_LIVE_WORKERS):
            state = "running" if w.running else f"exited {w.returncode}"
            report.sections.append(
                (f"worker {w.name} (pid {w.pid}, {state}) log tail", w.log_tail())
            )
    return report


# -- services ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server (free port, temporary dir) for the whole session."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def rabbit_vhosts() -> Iterator[RabbitVhosts]:
    """RabbitMQ vhosts for ``--broker amqp``, all deleted when the session ends."""
    vhosts = RabbitVhosts()
    try:
        yield vhosts
    finally:
        vhosts.cleanup()


@pytest.fixture(scope="session")
def redis_cluster():
    """A private three-node Redis Cluster (started on first use, for the whole session)."""
    from tests.cluster import RedisCluster

    cluster = RedisCluster().start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def orch_env(redis_server: RedisServer, request: pytest.FixtureRequest) -> dict[str, str]:
    """``ORCHESTRATOR_*`` variables for this test module: own key prefix and queue.

    With ``--broker amqp`` the broker is RabbitMQ, on a vhost of the module's own.
    """
    if not redis_server.running:  # a test stopped it and did not restart it
        redis_server.start(appendonly=redis_server.appendonly)
    tag = uuid.uuid4().hex[:8]
    env = {
        "ORCHESTRATOR_REDIS_URL": redis_server.url,
        "ORCHESTRATOR_KEY_PREFIX": f"t{tag}:",
        "ORCHESTRATOR_DEFAULT_QUEUE": f"q{tag}",
        "ORCHESTRATOR_TASK_MODULES": "workers.examples,tests.tasks,tests.control_tasks",
    }
    if request.config.getoption("--broker") == "amqp":
        env["ORCHESTRATOR_BROKER_URL"] = request.getfixturevalue("rabbit_vhosts").create()
    return env


@pytest.fixture(scope="module")
def settings(orch_env: dict[str, str]):
    """``orchestrator.settings.Settings`` matching ``orch_env``."""
    from orchestrator.settings import Settings

    return Settings(**{k.removeprefix("ORCHESTRATOR_").lower(): v for k, v in orch_env.items()})


def _start_worker(
    tmp_path_factory: pytest.TempPathFactory,
    orch_env: Mapping[str, str],
    queues: str | Iterable[str],
    concurrency: int,
    env: Mapping[str, str] | None,
    **kwargs: Any,
) -> WorkerProcess:
    w = WorkerProcess(
        queues,
        env={**orch_env, **(env or {})},
        concurrency=concurrency,
        log_dir=tmp_path_factory.mktemp("worker-logs", numbered=True),
        **kwargs,
    )
    _LIVE_WORKERS.append(w)
    try:
        w.start()
    except BaseException:
        # start() killed it and its error carries the log tail already.
        _LIVE_WORKERS.remove(w)
        raise
    return w


def _stop_worker(w: WorkerProcess) -> None:
    try:
        w.stop()
    finally:
        if w in _LIVE_WORKERS:
            _LIVE_WORKERS.remove(w)


@pytest.fixture(scope="module")
def worker(
    orch_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[WorkerProcess]:
    """A started worker (prefork, concurrency 2) on the module's queue and ``<queue>-slow``."""
    queue = orch_env["ORCHESTRATOR_DEFAULT_QUEUE"]
    w = _start_worker(
        tmp_path_factory,
        orch_env,
        [queue, f"{queue}-slow"],
        concurrency=2,
        env=None,
        name="worker",
    )
    try:
        yield w
    finally:
        _stop_worker(w)


@pytest.fixture
def worker_factory(
    orch_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., WorkerProcess]]:
    """Start extra workers: ``worker_factory(queues=None, concurrency=2, env=None, **kw)``.

    ``queues`` defaults to the module's default queue; ``env`` is layered over
    ``orch_env``; other keywords go to :class:`WorkerProcess` (``name``, ``pool``,
    ``extra_args``, ...). Pass ``start=False`` to get an unstarted worker. Every
    worker made here is stopped when the test ends.
    """
    made: list[WorkerProcess] = []

    def factory(
        queues: str | Iterable[str] | None = None,
        concurrency: int = 2,
        env: Mapping[str, str] | None = None,
        start: bool = True,
        **kwargs: Any,
    ) -> WorkerProcess:
        queues = queues if queues is not None else orch_env["ORCHESTRATOR_DEFAULT_QUEUE"]
        kwargs.setdefault("name", "extra")
        if start:
            w = _start_worker(tmp_path_factory, orch_env, queues, concurrency, env, **kwargs)
        else:
            w = WorkerProcess(
                queues,
                env={**orch_env, **(env or {})},
                concurrency=concurrency,
                log_dir=tmp_path_factory.mktemp("worker-logs", numbered=True),
                **kwargs,
            )
            _LIVE_WORKERS.append(w)
        made.append(w)
        return w

    try:
        yield factory
    finally:
        errors: list[BaseException] = []
        for w in reversed(made):
            try:
                _stop_worker(w)
            except BaseException as exc:  # stop them all, then report
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture
def beat_factory(
    orch_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., BeatProcess]]:
    """Start ``celery beat`` processes with the orchestrator's scheduler (stopped at the end).

    ``beat_factory(env=None)``: ``env`` is layered over ``orch_env`` (e.g. a faster
    ``ORCHESTRATOR_TICK_S``).
    """
    made: list[BeatProcess] = []

    def factory(env: Mapping[str, str] | None = None) -> BeatProcess:
        b = BeatProcess(
            env={**orch_env, **(env or {})},
            log_dir=tmp_path_factory.mktemp("beat-logs", numbered=True),
        )
        _LIVE_WORKERS.append(b)
        made.append(b)
        b.start()
        return b

    try:
        yield factory
    finally:
        for b in reversed(made):
            _stop_worker(b)


@pytest.fixture(scope="module")
def client(settings):
    """``orchestrator.client.Client(settings)``, closed after the module."""
    from orchestrator.client import Client

    c = Client(settings)
    try:
        yield c
    finally:
        close = getattr(c, "close", None)
        if callable(close):
            close()


@pytest.fixture
def r(redis_server: RedisServer):
    """A plain client of the test's Redis, for gates, counters and traces tasks leave."""
    conn = redis_server.client(decode_responses=True)
    yield conn
    conn.close()


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Callable[[str, float], None]:
    """Keep a measured figure in the test's report (``pytest -rP`` prints it)."""

    def keep(name: str, value: float) -> None:
        request.node.user_properties.append((name, value))
        print(f"{request.node.name}: {name} = {value}")

    return keep
