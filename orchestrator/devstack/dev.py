"""``orchestrator dev``: the whole stack on one machine, in one command, for trying it out.

It starts, as child processes, the same commands a production deployment runs:

* a private ``redis-server`` (append-only file on, data under ``--data-dir``), unless a
  Redis is configured (``--redis-url`` or ``ORCHESTRATOR_REDIS_URL``);
* one ``orchestrator worker --pool NAME`` per pool of the pools file;
* ``orchestrator beat``;
* ``orchestrator api`` in loopback dev mode (no token), with the dashboard at ``/ui``;
* ``orchestrator flower`` with basic auth, its generated password printed once, on the terminal.

Each child runs in a session of its own, so Ctrl-C in the terminal reaches only this
process, which then stops the children in order: API, Flower and beat first, then the
workers with a warm shutdown (running steps finish), then Redis, and exits 0. A child
that exits on its own is reported with the tail of its log, and the rest of the stack
is stopped (exit 1): a half-running stack would only leave runs waiting. On Linux the
children also get SIGTERM if this process is killed outright. Their output goes to
``--data-dir/logs/NAME.log``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

from ..client import Client
from ..errors import DefinitionError, DevError, PoolsFileError
from ..health import check as liveness_check
from ..pools import load_pools
from ..settings import Settings
from .processes import FLOWER_USER, Child, free_port, http_ok, redact, redis_answers

#: How long the whole stack may take to come up.
READY_TIMEOUT_S = 90.0
#: How long each group of children has to stop after SIGTERM before it is killed.
STOP_TIMEOUT_S = 30.0
POLL_S = 0.1


class DevStack:
    """Starts, supervises and stops the processes of ``orchestrator dev``."""

    def __init__(
        self,
        settings: Settings,
        *,
        pools: dict[str, list[str]],
        pools_file: str,
        redis_url: str | None = None,
        redis_port: int = 0,
        api_port: int = 8000,
        flower_port: int = 5555,
        flower: bool = True,
        data_dir: str | os.PathLike[str] = ".orchestrator-dev",
        task_modules: str = "workers.examples",
        deploy: Iterable[str] = (),
        stop_timeout: float = STOP_TIMEOUT_S,
        console: Console | None = None,
        err_console: Console | None = None,
    ) -> None:
        self.settings = settings
        self.pools = pools
        self.pools_file = pools_file
        self.redis_url = redis_url
        self.redis_port = redis_port
        self.api_port = api_port
        self.flower_port = flower_port
        self.flower = flower
        self.data_dir = Path(data_dir).resolve()
        self.task_modules = task_modules
        self.deploy_paths = list(deploy)
        self.stop_timeout = stop_timeout
        self.out = console or Console(highlight=False, soft_wrap=True)
        self.err = err_console or Console(stderr=True, highlight=False, soft_wrap=True)
        self.cwd = Path.cwd()
        self.redis_child: Child | None = None
        self.stack_redis_url = ""
        self.workers: list[Child] = []
        self.services: list[Child] = []  # beat, api, flower
        self.flower_password = secrets.token_urlsafe(12)
        self._stopping = False
        self._force = False

    # -- the whole life ---------------------------------------------------------------

    def run(self) -> int:
        """Start everything, supervise until Ctrl-C/SIGTERM or a child's death, stop all."""
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            try:
                self._start()
            except DevError as exc:
                if self._stopping:
                    return 0
                self.err.print(f"[red]dev: {escape(str(exc))}[/red]")
                return 1
            self._deploy()
            self._banner()
            return self._supervise()
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self._stopping:
            self._force = True
            self.err.print("dev: killing what is left now")
            return
        self._stopping = True
        self.err.print(
            f"dev: {signal.Signals(signum).name}: stopping the stack "
            "(workers finish their running steps; Ctrl-C again to kill now)"
        )

    # -- start ----------------------------------------------------------------------------

    def _start(self) -> None:
        logs = self.data_dir / "logs"
        run = self.data_dir / "run"
        for folder in (logs, run):
            folder.mkdir(parents=True, exist_ok=True)
        for stale in run.glob("*.alive"):
            stale.unlink()
        self._check_port(self.api_port, "--api-port")
        if self.flower:
            self._check_port(self.flower_port, "--flower-port")
        url = self._redis(logs)
        env = self._base_env(url)
        for name in self.pools:
            alive = run / f"worker-{name}.alive"
            self.workers.append(
                Child(
                    f"worker-{name}",
                    [sys.executable, "-m", "orchestrator", "worker", "--pool", name,
                     "--pools-file", self.pools_file, "-n", f"{name}@%h", "-l", "INFO"],
                    {**env, "ORCHESTRATOR_LIVENESS_FILE": str(alive)},
                    logs / f"worker-{name}.log",
                    _fresh(alive),
                )
            )  # fmt: skip
        beat_alive = run / "beat.alive"
        self.services.append(
            Child(
                "beat",
                [sys.executable, "-m", "orchestrator", "beat", "-l", "INFO"],
                {**env, "ORCHESTRATOR_LIVENESS_FILE": str(beat_alive)},
                logs / "beat.log",
                _fresh(beat_alive),
            )
        )
        api = f"http://127.0.0.1:{self.api_port}"
        self.services.append(
            Child(
                "api",
                [sys.executable, "-m", "orchestrator", "api", "--dev",
                 "--host", "127.0.0.1", "--port", str(self.api_port)],
                env,
                logs / "api.log",
                http_ok(f"{api}/healthz"),
            )
        )  # fmt: skip
        if self.flower:
            self.services.append(self._flower_child(env, logs))
        for child in [*self.workers, *self.services]:
            child.start(self.cwd)
        self._wait_ready([*self.workers, *self.services])

    def _check_port(self, port: int, option: str) -> None:
        if port == 0:
            raise DevError(f"{option} needs a fixed port, not 0")
        with socket.socket() as sock:
            # As the servers bind: only a listening socket, not TIME_WAIT, makes it busy.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError as exc:
                raise DevError(
                    f"port {port} is in use ({exc.strerror}): choose another with {option}"
                ) from None

    def _redis(self, logs: Path) -> str:
        if self.redis_url:
            if not redis_answers(self.redis_url):
                raise DevError(
                    f"no Redis answers at {redact(self.redis_url)}; start it, or leave "
                    "ORCHESTRATOR_REDIS_URL and --redis-url unset for a private redis-server"
                )
            return self.redis_url
        binary = shutil.which("redis-server")
        if binary is None:
            raise DevError(
                "redis-server is not on the PATH: install it (apt install redis-server, "
                "brew install redis) or point ORCHESTRATOR_REDIS_URL at a Redis"
            )
        if self.redis_port:
            self._check_port(self.redis_port, "--redis-port")
        else:
            self.redis_port = free_port()
        data = self.data_dir / "redis"
        data.mkdir(parents=True, exist_ok=True)
        url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.redis_child = Child(
            "redis",
            [binary, "--port", str(self.redis_port), "--bind", "127.0.0.1",
             "--dir", str(data), "--appendonly", "yes", "--save", "", "--daemonize", "no"],
            dict(os.environ),
            logs / "redis.log",
            lambda: redis_answers(url),
        )  # fmt: skip
        self.redis_child.start(self.cwd)
        self._wait_ready([self.redis_child], timeout=15)
        return url

    def _base_env(self, redis_url: str) -> dict[str, str]:
        # The children get this environment: ours, with the stack's Redis and task
        # modules, the working directory importable, and no liveness file of ours.
        env = dict(os.environ)
        env.pop("ORCHESTRATOR_LIVENESS_FILE", None)
        env["ORCHESTRATOR_REDIS_URL"] = redis_url
        for name, value in self._stack_settings(redis_url).items():
            env[f"ORCHESTRATOR_{name.upper()}"] = value
        env["ORCHESTRATOR_TASK_MODULES"] = self.task_modules
        path = [str(self.cwd), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))
        env["PYTHONUNBUFFERED"] = "1"
        self.stack_redis_url = redis_url
        return env

    def _flower_child(self, env: dict[str, str], logs: Path) -> Child:
        # The credentials go through the environment, never on a command line (ps shows it).
        credentials = f"{FLOWER_USER}:{self.flower_password}"
        argv = [sys.executable, "-m", "orchestrator", "flower",
                "--address", "127.0.0.1", "--port", str(self.flower_port)]  # fmt: skip
        return Child(
            "flower",
            argv,
            {**env, "ORCHESTRATOR_FLOWER_BASIC_AUTH": credentials},
            logs / "flower.log",
            http_ok(f"http://127.0.0.1:{self.flower_port}/healthcheck"),
        )

    def _wait_ready(self, children: list[Child], timeout: float = READY_TIMEOUT_S) -> None:
        pending = list(children)
        deadline = time.monotonic() + timeout
        while pending:
            if self._stopping:
                raise DevError("stopped while starting")
            for child in list(pending):
                self._check_alive(child, "while starting")
                if child.ready():
                    pending.remove(child)
            if not pending:
                return
            if time.monotonic() >= deadline:
                names = ", ".join(c.name for c in pending)
                tails = "\n".join(f"--- {c.log_path}:\n{c.tail()}" for c in pending)
                raise DevError(f"not ready after {timeout:g}s: {names}\n{tails}")
            time.sleep(POLL_S)

    def _check_alive(self, child: Child, when: str) -> None:
        code = child.exited()
        if code is not None:
            raise DevError(
                f"{child.name} exited with code {code} {when}; last lines of "
                f"{child.log_path}:\n{child.tail()}"
            )

    def _deploy(self) -> None:
        if not self.deploy_paths:
            return
        client = Client(self.settings.model_copy(update=self._stack_settings(self.stack_redis_url)))
        try:
            for path in self.deploy_paths:
                try:
                    deployed = client.deploy(path)
                except DefinitionError as exc:  # the stack stays up: fix the file, deploy again
                    self.err.print(f"dev: {path} was not deployed:", style="red", markup=False)
                    for problem in exc.problems:
                        self.err.print(str(problem), markup=False)
                    continue
                for d in deployed:
                    self.out.print(
                        f"Deployed {d.name} (version {d.version}) from {path}", markup=False
                    )
        finally:
            client.close()

    def _stack_settings(self, redis_url: str) -> dict[str, str]:
        """The stack's Redis; the broker and result backend follow it unless configured
        to be somewhere else than the state Redis."""
        update = {"redis_url": redis_url}
        for name in ("broker_url", "result_backend"):
            if getattr(self.settings, name) == self.settings.redis_url:
                update[name] = redis_url
        return update

    # -- running --------------------------------------------------------------------------

    def _banner(self) -> None:
        api = f"http://127.0.0.1:{self.api_port}"
        redis_line = redact(self.stack_redis_url)
        if self.redis_child is not None:
            redis_line += f"  (private, append-only file in {self.data_dir / 'redis'})"
        rows = [
            ("Redis", redis_line),
            ("API", f"{api}  (OpenAPI at {api}/docs; loopback dev mode: no token)"),
            ("Dashboard", f"{api}/ui"),
        ]
        if self.flower:
            rows.append(
                (
                    "Flower",
                    f"http://127.0.0.1:{self.flower_port}  user {FLOWER_USER}, password "
                    f"{self.flower_password}  (shown only here)",
                )
            )
        for name, args in self.pools.items():
            rows.append(
                (f"Worker {name}", f"orchestrator worker --pool {name}  ({' '.join(args)})")
            )
        rows += [
            ("Beat", f"orchestrator beat  (tick every {self.settings.tick_s:g}s)"),
            ("Task modules", self.task_modules or "-"),
            ("Logs", f"{self.data_dir / 'logs'}/"),
        ]
        self.out.print("[bold green]orchestrator dev: the stack is up[/bold green]")
        for name, value in rows:
            self.out.print(f"  {name:<16} {value}", markup=False)
        self.out.print(
            f"  Use it from another shell: export ORCHESTRATOR_REDIS_URL={self.stack_redis_url}",
            markup=False,
        )
        self.out.print("Ctrl-C stops everything.")

    def _supervise(self) -> int:
        children = self._children()
        while not self._stopping:
            for child in children:
                code = child.exited()
                if code is not None:
                    self.err.print(
                        f"[red]dev: {child.name} (pid {child.pid}) exited on its own with code "
                        f"{code}; stopping the stack. Last lines of {child.log_path}:[/red]"
                    )
                    self.err.print(child.tail(), markup=False)
                    return 1
            time.sleep(POLL_S)
        return 0

    # -- stop -----------------------------------------------------------------------------

    def _children(self) -> list[Child]:
        return [*self.services, *self.workers, *([self.redis_child] if self.redis_child else [])]

    def _stop_all(self) -> None:
        """SIGTERM in order (services, workers, Redis), each group bounded; then kill."""
        self._stopping = True
        redis_group = [self.redis_child] if self.redis_child else []
        for group in (self.services, self.workers, redis_group):
            started = [c for c in group if c.proc is not None]
            for child in started:
                child.terminate()
            deadline = time.monotonic() + self.stop_timeout
            while any(c.running() for c in started):
                if self._force or time.monotonic() >= deadline:
                    late = [c.name for c in started if c.running()]
                    if late and not self._force:
                        self.err.print(
                            f"dev: killing {', '.join(late)} after {self.stop_timeout:g}s"
                        )
                    break
                time.sleep(POLL_S)
            for child in started:
                child.kill()  # whatever is left of its process group
        if self._children():
            self.out.print("orchestrator dev: stopped")


# -- helpers -------------------------------------------------------------------------------


def pool_names(pools_file: str | os.PathLike[str]) -> list[str]:
    """The pool names of a pools file (``cli.pool_args`` checks each pool's fields)."""
    try:
        return load_pools(pools_file).names()
    except PoolsFileError as exc:
        raise click.BadParameter(str(exc), param_hint="--pools-file") from exc


def _fresh(path: Path) -> Callable[[], bool]:
    return lambda: liveness_check(path, max_age=60)[0]


__all__ = ["DevError", "DevStack", "pool_names"]
