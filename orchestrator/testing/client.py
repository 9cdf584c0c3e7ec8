"""The client the fixtures of :mod:`orchestrator.testing` return (imported when one runs)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..client import Client, Deployed
from ..scheduler import TICK_TASK

if TYPE_CHECKING:
    from celery import Celery

    from ..devstack.processes import WorkerProcess
    from ..settings import Settings


class FlowClient(Client):
    """A :class:`~orchestrator.Client` on a test's private namespace.

    ``deployed`` is what the fixture deployed, ``workers`` the worker subprocesses
    running the steps (empty in-process), and :meth:`tick` stands in for Celery beat.
    """

    def __init__(self, settings: Settings, app: Celery | None = None):
        super().__init__(settings, app=app)
        self.deployed: list[Deployed] = []
        self.workers: list[WorkerProcess] = []

    def tick(self) -> None:
        """Send one ``orchestrator.tick`` (what beat sends every ``tick_s``).

        It wakes the parked steps whose timer is due (sleeps, approval and wait
        timeouts) and fires due schedules; a test with short timers calls it (in a
        bounded poll) instead of running beat.
        """
        self.app.send_task(TICK_TASK, queue=self.settings.default_queue, ignore_result=True)
