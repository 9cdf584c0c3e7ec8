"""Processes from outside: a private ``redis-server``, Celery workers and beat, any child
process of a stack, and bounded waits.

Used by the pytest plugin (:mod:`orchestrator.testing`), this repository's own test suite
(``tests/support.py`` re-exports it), the benchmarks, ``orchestrator demo`` and
``orchestrator dev``. Everything here drives real processes from outside; nothing imports
the rest of the orchestrator.

* :class:`RedisServer` -- a throw-away ``redis-server`` on a free port with its own
  data directory (never a shared Redis).
* :class:`WorkerProcess` -- a real ``celery worker`` subprocess in its own process
  group, with its output in a log file; :class:`BeatProcess` the same for ``celery beat``.
* :class:`Child` -- any command of a stack (a worker, beat, the API, Flower) started
  without waiting, for a supervisor that polls its readiness test and its exit.
* :func:`wait_for` -- the one way to wait for something: a bounded poll.
* :func:`redis_answers`, :func:`http_ok` -- one-second readiness probes;
  :func:`redact` -- a URL without its password, for messages.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = [
    "FLOWER_USER",
    "REDIS_SERVER_BIN",
    "BeatProcess",
    "Child",
    "RedisServer",
    "WorkerProcess",
    "free_port",
    "http_ok",
    "redact",
    "redis_answers",
    "wait_for",
]

T = TypeVar("T")

#: The ``redis-server`` binary: ``$REDIS_SERVER_BIN``, else the one on the PATH.
REDIS_SERVER_BIN = (
    os.environ.get("REDIS_SERVER_BIN") or shutil.which("redis-server") or "/usr/bin/redis-server"
)
#: The Flower user of the demo's and the dev stack's Flower (its password is generated).
FLOWER_USER = "admin"

# Every process started here is stopped when the interpreter exits, even if a
# fixture's teardown never ran (Ctrl-C, a crashed benchmark).
_LIVE: weakref.WeakSet[Any] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    for proc in list(_LIVE):
        with contextlib.suppress(Exception):
            if isinstance(proc, WorkerProcess):
                proc.kill()
            else:
                proc.stop()


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 30,
    interval: float = 0.05,
    message: str | Callable[[], str] = "condition not met",
) -> T:
    """Poll ``predicate`` until it returns a truthy value, and return that value.

    Raises :class:`AssertionError` with ``message`` (a string, or a callable giving
    one, evaluated only on failure) when ``timeout`` seconds pass first. The
    predicate is always evaluated at least once, and once more at the deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            text = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout:g}s: {text}")
        time.sleep(min(interval, remaining))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***``."""
    return re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:***@", url)


def redis_answers(url: str) -> bool:
    """Whether a Redis at ``url`` answers PING within a second (no retries)."""
    try:
        client = redis.Redis.from_url(
            url, socket_timeout=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
        )
    except ValueError:
        return False
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def http_ok(url: str) -> Callable[[], bool]:
    """A readiness test: whether a GET of ``url`` answers 200 within a second."""

    def probe() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError, ValueError):
            return False

    return probe


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    # The process leads its own session, so its pid is the group id.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class RedisServer:
    """A private ``redis-server`` subprocess on a free port.

    The port and the data directory are chosen once and kept across
    :meth:`restart`, so with ``appendonly=True`` the data survives a restart.
    :meth:`cleanup` stops the server and removes the data directory. ``binary`` is
    the ``redis-server`` to run (default :data:`REDIS_SERVER_BIN`).
    """

    host = "127.0.0.1"

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        binary: str | None = None,
        extra_args: Iterable[str] = (),
    ) -> None:
        self.binary = binary or REDIS_SERVER_BIN
        self.extra_args = list(extra_args)  # more redis-server options, e.g. cluster mode
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="orch-redis-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port: int | None = None
        self.appendonly = False
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir / "redis.log"

    # -- addresses --------------------------------------------------------------

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("RedisServer has not been started")
        return f"redis://{self.host}:{self.port}/0"

    def client(self, **kwargs: Any) -> redis.Redis:
        """A new ``redis.Redis`` on DB 0 of this server (kwargs go to ``redis.Redis``)."""
        if self.port is None:
            raise RuntimeError("RedisServer has not been started")
        kwargs.setdefault("socket_timeout", 10)
        return redis.Redis(host=self.host, port=self.port, db=0, **kwargs)

    # -- lifecycle --------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, appendonly: bool = False) -> RedisServer:
        """Start the server and wait (at most 10 s) until it answers PING."""
        if self.running:
            raise RuntimeError(f"redis-server already running on port {self.port}")
        self.appendonly = appendonly
        if self.port is not None:  # a restart keeps its port
            try:
                self._spawn_and_wait()
            except _StartFailed as exc:
                raise AssertionError(f"redis-server would not restart: {exc}") from None
            return self
        # A free port can be taken between probing and binding: try a few.
        last_error: Exception | None = None
        for _ in range(5):
            self.port = free_port()
            try:
                self._spawn_and_wait()
                return self
            except _StartFailed as exc:
                last_error = exc
                self.port = None
        raise AssertionError(f"redis-server would not start: {last_error}")

    def stop(self) -> None:
        """SHUTDOWN NOSAVE (terminate / kill as fallbacks) and wait for the exit."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            self._send_shutdown()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        self.proc = None
        _LIVE.discard(self)

    def _send_shutdown(self) -> None:
        # A raw socket, not redis-py: its retry-on-disconnect would reconnect to the
        # dying server with back-off and make every stop take seconds.
        with (
            contextlib.suppress(OSError),
            socket.create_connection((self.host, self.port), timeout=5) as sock,
        ):
            sock.sendall(b"SHUTDOWN NOSAVE\r\n")
            while sock.recv(4096):  # the server closes the connection when it exits
                pass

    def restart(self) -> RedisServer:
        """Stop and start again on the same port, data dir and appendonly setting."""
        self.stop()
        return self.start(appendonly=self.appendonly)

    def cleanup(self) -> None:
        """Stop, and remove the data directory if this object created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> RedisServer:
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"<RedisServer port={self.port} running={self.running} dir={self.data_dir}>"

    # -- internals --------------------------------------------------------------

    def _spawn_and_wait(self) -> None:
        assert self.port is not None
        cmd = [
            self.binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--dir", str(self.data_dir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--daemonize", "no",
            *self.extra_args,
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            try:
                self.proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
                )
            except OSError as exc:  # not installed, not executable: no retry helps
                raise RuntimeError(f"cannot run redis-server ({self.binary}): {exc}") from None
        _LIVE.add(self)
        proc = self.proc
        # No retries: redis-py's default retry back-off would stretch each probe.
        probe = redis.Redis(
            host=self.host,
            port=self.port,
            socket_timeout=1,
            socket_connect_timeout=1,
            retry=Retry(NoBackoff(), 0),
        )

        def ready() -> bool:
            if proc.poll() is not None:
                raise _StartFailed(
                    f"redis-server exited with {proc.returncode} on port {self.port}:\n"
                    + _tail(self.log_path, 20)
                )
            try:
                return bool(probe.ping())
            except (redis.ConnectionError, redis.TimeoutError):  # incl. BusyLoadingError
                return False

        try:
            wait_for(
                ready,
                timeout=10,
                interval=0.02,
                message=lambda: (
                    f"redis-server on port {self.port} did not answer PING:\n"
                    + _tail(self.log_path, 20)
                ),
            )
        except AssertionError:
            self.stop()
            raise
        except _StartFailed:
            self.proc = None
            _LIVE.discard(self)
            raise
        finally:
            probe.close()


class _StartFailed(Exception):
    pass


class WorkerProcess:
    """A real ``celery worker`` (prefork by default) as a subprocess.

    The worker gets the inherited environment minus any ``ORCHESTRATOR_*``
    variables, then ``env``, then ``ORCHESTRATOR_REDIS_URL`` /
    ``ORCHESTRATOR_TASK_MODULES`` from ``redis_url`` / ``task_modules`` when given.
    It runs in ``cwd`` (default: the current directory) with ``pythonpath`` put in
    front of ``PYTHONPATH``, so the task modules import there. It runs in a new
    session (its own process group), so :meth:`kill` takes the pool children down
    with it. stdout and stderr go to :attr:`log_path`.
    """

    #: The log text that says the process is ready.
    READY_MARK = " ready."

    def __init__(
        self,
        queues: str | Iterable[str],
        *,
        redis_url: str | None = None,
        task_modules: str | Iterable[str] | None = None,
        env: Mapping[str, str] | None = None,
        concurrency: int = 2,
        name: str | None = None,
        pool: str = "prefork",
        loglevel: str = "INFO",
        app: str = "orchestrator.worker",
        extra_args: Iterable[str] = (),
        log_dir: str | os.PathLike[str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        pythonpath: Iterable[str | os.PathLike[str]] = (),
    ) -> None:
        self.queues = [queues] if isinstance(queues, str) else list(queues)
        if not self.queues:
            raise ValueError("a worker needs at least one queue")
        self.concurrency = concurrency
        self.name = f"{name or 'w'}-{uuid.uuid4().hex[:8]}"
        #: The node name Celery reports (``%h`` expands to the host name).
        self.hostname = f"{self.name}@{socket.gethostname()}"
        self.pool = pool
        self.loglevel = loglevel
        self.app = app
        self.extra_args = list(extra_args)
        self.cwd = Path(cwd or os.getcwd())
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="orch-worker-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_dir / f"{self.name}.log"
        self.env = self._build_env(redis_url, task_modules, env, pythonpath)
        self.proc: subprocess.Popen[bytes] | None = None
        self._ready_offset = 0

    @staticmethod
    def _build_env(
        redis_url: str | None,
        task_modules: str | Iterable[str] | None,
        env: Mapping[str, str] | None,
        pythonpath: Iterable[str | os.PathLike[str]] = (),
    ) -> dict[str, str]:
        out = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
        out.update(env or {})
        if redis_url is not None:
            out["ORCHESTRATOR_REDIS_URL"] = redis_url
        if task_modules is not None:
            if not isinstance(task_modules, str):
                task_modules = ",".join(task_modules)
            out["ORCHESTRATOR_TASK_MODULES"] = task_modules
        if not out.get("ORCHESTRATOR_REDIS_URL"):
            raise ValueError("WorkerProcess needs ORCHESTRATOR_REDIS_URL (redis_url or env)")
        # The caller's paths first, whatever the worker's cwd; unbuffered output.
        path = [str(p) for p in pythonpath]
        path += [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p]
        out["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))
        out["PYTHONUNBUFFERED"] = "1"
        return out

    @property
    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "celery",
            "-A", self.app,
            "worker",
            "-l", self.loglevel,
            "-P", self.pool,
            "-c", str(self.concurrency),
            "-Q", ",".join(self.queues),
            "-n", f"{self.name}@%h",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            *self.extra_args,
        ]  # fmt: skip

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def start(self, timeout: float = 30) -> WorkerProcess:
        """Spawn the worker and wait (bounded) for its ``ready.`` log line."""
        if self.running:
            raise RuntimeError(f"worker {self.name} already running (pid {self.pid})")
        self._ready_offset = self._log_size()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _LIVE.add(self)
        try:
            wait_for(
                self._is_ready,
                timeout=timeout,
                interval=0.1,
                message=lambda: (
                    f"worker {self.name} not ready (pid {self.pid}); log tail:\n" + self.log_tail()
                ),
            )
        except BaseException:
            self.kill()
            raise
        return self

    def _is_ready(self) -> bool:
        proc = self.proc
        assert proc is not None
        text = self._read_log(self._ready_offset)
        if self.READY_MARK in text:
            return True
        if proc.poll() is not None:
            raise AssertionError(
                f"worker {self.name} exited with {proc.returncode} before it was ready; "
                f"log tail:\n{self.log_tail()}"
            )
        return False

    def stop(self, timeout: float = 15) -> None:
        """Warm shutdown: SIGTERM, wait up to ``timeout`` s, then SIGKILL the group."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=timeout)
        # Kill whatever is left of the group (a hung main process, orphaned children).
        self._kill_group()
        self._reap()

    def kill(self) -> None:
        """SIGKILL the whole process group (main process and pool children) at once."""
        if self.proc is None:
            return
        self._kill_group()
        self._reap()

    def _kill_group(self) -> None:
        assert self.proc is not None
        _kill_group(self.proc)

    def _reap(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        if self.proc.poll() is not None:
            _LIVE.discard(self)

    # -- logs -------------------------------------------------------------------

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def _read_log(self, offset: int = 0) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(offset)
                return fh.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_text(self) -> str:
        """Everything the worker wrote so far (all starts of this object)."""
        return self._read_log()

    def log_tail(self, lines: int = 80) -> str:
        return _tail(self.log_path, lines)

    def __enter__(self) -> WorkerProcess:
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"<WorkerProcess {self.name} pid={self.pid} queues={','.join(self.queues)} "
            f"running={self.running}>"
        )


class BeatProcess(WorkerProcess):
    """``celery beat`` with the orchestrator's scheduler (it sends the tick), as a subprocess."""

    READY_MARK = "beat: Starting..."

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("name", "beat")
        super().__init__(["-"], **kwargs)

    @property
    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "celery", "-A", self.app, "beat",
            "-S", "orchestrator.scheduler:Scheduler", "-l", self.loglevel,
        ]  # fmt: skip


@dataclass
class Child:
    """One process of a stack: its command, environment, log file and readiness test.

    Unlike :class:`WorkerProcess`, :meth:`start` does not wait: a supervisor starts
    several and polls each one's :attr:`ready` and :meth:`exited`. The child leads a
    session of its own (Ctrl-C in the terminal reaches only the supervisor), and on
    Linux gets SIGTERM when the supervisor dies.
    """

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    ready: Callable[[], bool]
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, cwd: Path) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent(),
            )

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def exited(self) -> int | None:
        """The exit code, or None while it runs (or before it started)."""
        return self.proc.poll() if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self) -> None:
        if self.running():
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the child's whole process group (it leads one) and reap it."""
        if self.proc is None:
            return
        _kill_group(self.proc)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)

    def tail(self, lines: int = 20) -> str:
        return _tail(self.log_path, lines)


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGTERM the child when this process dies; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl: act as if it fired
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec
