"""Any ``orchestrator ...`` command line as a managed test process.

:class:`CommandProcess` is :class:`tests.support.WorkerProcess` (own process group, log
file, warm stop with SIGTERM then SIGKILL of the group) for a command given whole,
e.g. ``orchestrator worker --pool io`` or the ``command:`` of a compose service, with a
readiness test of its own (a log line, or an HTTP endpoint that answers).
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any

from tests.support import WorkerProcess, wait_for


class CommandProcess(WorkerProcess):
    """``argv`` run like a worker; ready when ``ready()`` holds, else at ``ready_mark``."""

    def __init__(
        self,
        argv: Iterable[str],
        *,
        ready: Callable[[], bool] | None = None,
        ready_mark: str = WorkerProcess.READY_MARK,
        **kwargs: Any,
    ) -> None:
        super().__init__(["-"], **kwargs)
        self.argv = list(argv)
        self.ready = ready
        self.READY_MARK = ready_mark

    @property
    def command(self) -> list[str]:
        return self.argv

    def spawn(self) -> CommandProcess:
        """Start the process without waiting; :meth:`wait_ready` waits (so several start
        at once)."""
        self._spawning = True
        try:
            self.start()
        finally:
            self._spawning = False
        return self

    def wait_ready(self, timeout: float = 60) -> CommandProcess:
        wait_for(
            self._is_ready,
            timeout=timeout,
            interval=0.1,
            message=lambda: f"{self.argv} not ready; log tail:\n{self.log_tail()}",
        )
        return self

    def _is_ready(self) -> bool:
        if getattr(self, "_spawning", False):
            return True
        if self.ready is None:
            return super()._is_ready()
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(
                f"{self.argv} exited with {self.proc.returncode} before it was ready; "
                f"log tail:\n{self.log_tail()}"
            )
        return self.ready()


def http_ok(url: str) -> Callable[[], bool]:
    """A readiness test: ``url`` answers 200."""

    def probe() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    return probe
